"""kill -9 under load: 64 proxies, a random kill, a restart on the same data directory.

Used by ``tests/integration/test_kill_trials.py`` (50 trials) and ``bench/kill_trials.py``
(1,000). The server is a real ``meshca serve``: plaintext, SQLite in its data directory,
two worker processes on one fixed port, and its supervisor writing the issuance records.
64 proxies, each with its own channel (its own TCP connection) and its own service-account
token, loop on ``Sign`` and Istio's ``CreateCertificate`` in turn, all in one event loop.

One trial: a random moment after the server serves, SIGKILL one worker, the supervisor's
whole process group, or the supervisor alone (``KILL_KINDS``). Every process of the tree
must be gone within ``DEATH_LIMIT``. Once it is, and before anything writes again, the
data directory must hold an ISSUED record with the same serial and fingerprint for every
certificate any proxy received so far; ``meshca audit verify --data-dir`` must pass; the
leaf indexes must be 0..n-1 with no gap or duplicate. Then the server restarts on the
same directory and port and the proxies go on. Records of certificates no proxy received (their
responses died with the server) are expected.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import signal
import socket
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc
from meshca.adapters.grpc._gen.meshca.v1 import ca_pb2, ca_pb2_grpc
from meshca.adapters.storage.engine import make_engine
from meshca.config import Settings
from tests.integration.log_checks import LogCheck, audit_verify, check_log
from tests.integration.serve_process import ServeProcess, group_alive, launch
from tests.integration.server_harness import TRUST_DOMAIN, TokenMinter, serve_command

__all__ = ["KILL_KINDS", "KillTrials", "TrialResult"]

PROXIES = 64
WORKERS = 2
#: "worker": SIGKILL one worker process (the supervisor then stops the rest and exits 1);
#: "server": SIGKILL the supervisor's whole process group, as a host or container dies;
#: "supervisor": SIGKILL the supervisor alone (the OOM killer's pick): its workers, left
#: without their record writer, must stop by themselves.
KILL_KINDS = ("worker", "server", "supervisor")
#: The kill lands uniformly this many seconds after the (re)started server serves.
KILL_WINDOW = (0.05, 0.5)
#: A restart that does not serve within this long is a failed trial.
RESTART_LIMIT = 30.0
#: How long the processes may take to be gone after a kill (a worker's survivor drains).
DEATH_LIMIT = 15.0
#: Client-side failures expected while the server dies: the connection or the server went.
EXPECTED_ERRORS = frozenset({"UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED"})

_CHANNEL_OPTIONS = [
    # Each proxy its own connection, as separate pods would have.
    ("grpc.use_local_subchannel_pool", 1),
    # Reconnect within a fraction of the restart time, not gRPC's default second.
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
]


@dataclass(frozen=True)
class TrialResult:
    """One kill and what the data directory held afterwards."""

    index: int
    kind: str
    killed_after: float
    exit_code: int | None
    #: Certificates received during this trial / all received on this data directory.
    received: int
    checked: int
    records: int
    #: Records of refusals (none expected: every proxy's request is valid).
    refused: int
    missing: list[str]
    index_problems: list[str]
    verify_code: int
    verify_output: str
    #: Seconds from the restart's exec to every worker serving; None if it failed.
    restart_seconds: float | None
    errors: dict[str, int] = field(default_factory=dict)
    #: Processes of the tree still running ``DEATH_LIMIT`` after the kill (then killed).
    outlived: bool = False
    #: Seconds from the kill until every process was gone, and for the checks.
    death_seconds: float = 0.0
    check_seconds: float = 0.0

    @property
    def unexpected_errors(self) -> dict[str, int]:
        return {code: n for code, n in self.errors.items() if code not in EXPECTED_ERRORS}

    @property
    def ok(self) -> bool:
        return (
            not self.missing
            and not self.index_problems
            and self.verify_code == 0
            and self.restart_seconds is not None
            and self.exit_code == _EXPECTED_EXIT[self.kind]
            and not self.unexpected_errors
            and not self.outlived
        )

    def describe(self) -> str:
        problems = [
            *(f"certificate without its record: {s}" for s in self.missing[:5]),
            *self.index_problems,
            *(
                [f"audit verify exited {self.verify_code}:\n{self.verify_output}"]
                * bool(self.verify_code)
            ),
            *(["the restart did not serve"] if self.restart_seconds is None else []),
            *([f"processes of the tree outlived the kill by {DEATH_LIMIT}s"] * self.outlived),
            *(
                [f"the supervisor exited {self.exit_code}, not {_EXPECTED_EXIT[self.kind]}"]
                if self.exit_code != _EXPECTED_EXIT[self.kind]
                else []
            ),
            *(
                [f"unexpected client errors {self.unexpected_errors}"]
                * bool(self.unexpected_errors)
            ),
        ]
        return (
            f"trial {self.index}: kill {self.kind} after {self.killed_after:.3f}s, "
            f"{self.received} certificates received ({self.checked} checked, "
            f"{self.records} records)" + "".join(f"\n  {p}" for p in problems)
        )


#: The supervisor's exit: 1 when it stopped its workers because one died.
_EXPECTED_EXIT = {
    "worker": 1,
    "server": -signal.SIGKILL,
    "supervisor": -signal.SIGKILL,
    "sigterm": 0,
}


@dataclass
class _Proxy:
    token: str
    channel: grpc.aio.Channel
    csr_der: bytes
    csr_pem: str
    calls: int = 0


class ProxyLoad:
    """``size`` proxies calling while ``gate`` is open; what each received, by serial."""

    def __init__(self, target: str, minter: TokenMinter, size: int = PROXIES) -> None:
        self.gate = asyncio.Event()
        #: serial -> SHA-256 fingerprint of every certificate received.
        self.received: dict[str, str] = {}
        #: Serials received twice (must stay empty).
        self.repeated: list[str] = []
        self.errors: Counter[str] = Counter()
        self._stopping = False
        self._proxies = []
        for i in range(size):
            key = ec.generate_private_key(ec.SECP256R1())
            csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            signed = csr.sign(key, hashes.SHA256())
            self._proxies.append(
                _Proxy(
                    token=minter.mint(f"ns{i % 4}", f"sa{i}"),
                    channel=grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS),
                    csr_der=signed.public_bytes(Encoding.DER),
                    csr_pem=signed.public_bytes(Encoding.PEM).decode(),
                )
            )
        self._tasks = [asyncio.create_task(self._run(p)) for p in self._proxies]

    async def close(self) -> None:
        self._stopping = True
        self.gate.set()
        await asyncio.gather(*self._tasks)
        for proxy in self._proxies:
            await proxy.channel.close()

    async def _run(self, proxy: _Proxy) -> None:
        metadata = (("authorization", f"Bearer {proxy.token}"),)
        sign = ca_pb2_grpc.CertificateServiceStub(proxy.channel).Sign
        create = istio_grpc.IstioCertificateServiceStub(proxy.channel).CreateCertificate
        while True:
            await self.gate.wait()
            if self._stopping:
                return
            proxy.calls += 1
            try:
                if proxy.calls % 2:
                    response = await sign(
                        ca_pb2.SignRequest(csr=proxy.csr_der), metadata=metadata, timeout=10
                    )
                    leaf_pem, serial = response.certificate, response.serial
                else:
                    chain = await create(
                        istio_pb2.IstioCertificateRequest(csr=proxy.csr_pem),
                        metadata=metadata,
                        timeout=10,
                    )
                    leaf_pem, serial = chain.cert_chain[0], None
            except grpc.aio.AioRpcError as error:
                self.errors[error.code().name] += 1
                await asyncio.sleep(0.02)
                continue
            self._note(leaf_pem, serial)

    def _note(self, leaf_pem: str, serial: str | None) -> None:
        body = "".join(line for line in leaf_pem.splitlines() if not line.startswith("-----"))
        der = base64.b64decode(body)
        leaf_serial = f"{x509.load_der_x509_certificate(der).serial_number:x}"
        assert serial in (None, leaf_serial), (serial, leaf_serial)
        if leaf_serial in self.received:
            self.repeated.append(leaf_serial)
        self.received[leaf_serial] = hashlib.sha256(der).hexdigest()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class KillTrials:
    """One data directory, one port, one ``meshca serve`` at a time, and its proxies.

    ``start`` serves; each ``trial`` kills, checks and restarts; ``finish`` stops the
    server with SIGTERM and checks once more, now with every late response counted.
    """

    def __init__(self, base: Path, rng: random.Random, proxies: int = PROXIES) -> None:
        self.base = base
        self.data_dir = base / "data"
        self.rng = rng
        self.minter, self.jwks = TokenMinter.create(base)
        self.port = _free_port()
        self.proxies = proxies
        self.server: ServeProcess | None = None
        self.load: ProxyLoad | None = None
        self.trials = 0
        url = Settings(data_dir=self.data_dir, trust_domain=TRUST_DOMAIN).effective_database_url
        self._url = url

    def _command(self) -> list[str]:
        return serve_command(
            self.data_dir,
            self.jwks,
            workers=WORKERS,
            listen=f"127.0.0.1:{self.port}",
            # The leader signs a head as it starts (over what the last crash left), then
            # hourly: verify checks every one of those heads, and none is signed mid-check.
            extra=["--plaintext", "--tree-head-interval", "1h", "--log-level", "info"],
        )

    def _launch(self) -> float | None:
        """Start the server and wait until it serves; its start time, None if it did not."""
        started = time.monotonic()
        self.server = launch(
            f"meshca-{self.trials}",
            self.data_dir,
            self._command(),
            workers=WORKERS,
            wait=None,
        )
        serving = self.server.serving.wait(RESTART_LIMIT)
        if not (serving and self.server.alive and self.server.port == self.port):
            return None
        return time.monotonic() - started

    async def start(self) -> None:
        if await asyncio.to_thread(self._launch) is None:
            assert self.server is not None
            raise RuntimeError(f"meshca serve did not start:\n{self.server.log()}")
        self.load = ProxyLoad(f"127.0.0.1:{self.port}", self.minter, self.proxies)
        self.load.gate.set()

    async def trial(self) -> TrialResult:
        assert self.server is not None and self.load is not None
        self.trials += 1
        kind = self.rng.choice(KILL_KINDS)
        delay = self.rng.uniform(*KILL_WINDOW)
        victim_pick = self.rng.random()
        before = len(self.load.received)
        errors_before = Counter(self.load.errors)
        await asyncio.sleep(delay)
        server = self.server
        if kind == "worker":
            workers = server.worker_pids()
            assert len(workers) == WORKERS, (workers, server.log())
            os.kill(workers[int(victim_pick * len(workers))], signal.SIGKILL)
        elif kind == "server":
            os.killpg(server.process.pid, signal.SIGKILL)
        else:
            os.kill(server.process.pid, signal.SIGKILL)
        # No new calls; those in flight finish (a worker kill's survivor drains them).
        self.load.gate.clear()
        killed = time.monotonic()
        exit_code, outlived = await asyncio.to_thread(self._await_death, server)
        dead = time.monotonic()
        # Nothing writes now: the records are what the crash left.
        received = dict(self.load.received)
        check, (verify_code, verify_output) = await asyncio.to_thread(self._check, received)
        checked = time.monotonic()
        restart = await asyncio.to_thread(self._launch)
        errors = self.load.errors - errors_before
        if restart is not None:
            self.load.gate.set()
        return TrialResult(
            index=self.trials,
            kind=kind,
            killed_after=delay,
            exit_code=exit_code,
            received=len(received) - before,
            checked=len(received),
            records=check.records,
            refused=check.records - check.issued,
            missing=check.missing + [f"{s} (received twice)" for s in self.load.repeated],
            index_problems=check.index_problems,
            verify_code=verify_code,
            verify_output=verify_output,
            restart_seconds=restart,
            errors=dict(errors),
            outlived=outlived,
            death_seconds=dead - killed,
            check_seconds=checked - dead,
        )

    def _await_death(self, server: ServeProcess) -> tuple[int | None, bool]:
        """The supervisor's exit code, and whether any process of its tree outlived
        ``DEATH_LIMIT`` (then it is killed, so that the next start is not disturbed)."""
        deadline = time.monotonic() + DEATH_LIMIT
        try:
            code: int | None = server.process.wait(DEATH_LIMIT)
        except subprocess.TimeoutExpired:
            code = None
        while group_alive(server.process.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        outlived = group_alive(server.process.pid)
        server.kill()  # whatever is left; reaps the supervisor and closes its output
        return code, outlived

    def _check(self, received: dict[str, str]) -> tuple[LogCheck, tuple[int, str]]:
        engine = make_engine(self._url)
        try:
            check = check_log(engine, dict(received))
        finally:
            engine.dispose()
        return check, audit_verify("--data-dir", str(self.data_dir))

    async def finish(self) -> TrialResult:
        """SIGTERM the server, then the final check with every response counted."""
        assert self.load is not None and self.server is not None
        self.load.gate.clear()
        code = await asyncio.to_thread(self.server.stop, DEATH_LIMIT)
        self.server = None
        load, self.load = self.load, None
        await load.close()
        received = dict(load.received)
        check, (verify_code, verify_output) = await asyncio.to_thread(self._check, received)
        return TrialResult(
            index=self.trials + 1,
            kind="sigterm",
            killed_after=0.0,
            exit_code=code,
            received=0,
            checked=len(received),
            records=check.records,
            refused=check.records - check.issued,
            missing=check.missing + [f"{s} (received twice)" for s in load.repeated],
            index_problems=check.index_problems,
            verify_code=verify_code,
            verify_output=verify_output,
            restart_seconds=0.0,
        )

    async def abort(self) -> None:
        """Kill whatever still runs and close the proxies (teardown, whatever happened)."""
        if self.server is not None:
            self.server.kill()
            self.server = None
        if self.load is not None:
            load, self.load = self.load, None
            await load.close()
