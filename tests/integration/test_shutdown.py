"""Graceful shutdown of ``meshca serve --workers 2`` and ``meshca dev serve``, for real.

Each test runs the server as a subprocess, drives concurrent CreateCertificate calls from
this process (one channel per client), sends SIGTERM, and checks that every call either
returned a certificate whose serial has an ISSUED record in the database or failed with
UNAVAILABLE, and that the process and its children were gone within the grace period.
Slow calls come from the Kubernetes API stand-in answering TokenReviews late.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import create_engine, text

from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc
from meshca.adapters.k8s.dev_issuer import DevTokenIssuer
from tests.fixtures_k8s import K8sApiStandIn
from tests.integration.server_harness import TokenMinter, serve_command

pytestmark = pytest.mark.integration

GRACE = 4.0
#: The supervisor's writer margin (1 s) and interpreter exit, on a shared, noisy machine.
EXIT_MARGIN = 2.0
CLIENTS = 48
OK, UNAVAILABLE = "OK", "UNAVAILABLE"


@dataclass
class Served:
    """A server subprocess in its own session, its output collected as it comes."""

    process: subprocess.Popen[str]
    output: list[str]
    data_dir: Path
    port: int = 0
    reader: threading.Thread | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self, last: int = 60) -> str:
        return "".join(self.output[-last:])

    def descendants(self) -> list[int]:
        """Every process below the server (workers, multiprocessing's helpers)."""
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            found += [int(c) for c in children]
            todo += [int(c) for c in children]
        return found


def _start(
    command: Sequence[str], data_dir: Path, port_pattern: str, ready: str, count: int
) -> Served:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")}
    process = subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environ,
        start_new_session=True,
    )
    served = Served(process, [], data_dir)
    listening = threading.Event()

    def collect() -> None:
        assert process.stdout is not None
        seen = 0
        for line in process.stdout:
            served.output.append(line)
            found = re.search(port_pattern, line)
            if found:
                served.port = int(found.group(1))
            seen += ready in line
            if seen >= count and served.port:
                listening.set()
        listening.set()

    served.reader = threading.Thread(target=collect, name="served-output", daemon=True)
    served.reader.start()
    assert listening.wait(60) and process.poll() is None and served.port, served.log()
    return served


def _end(served: Served) -> None:
    if served.process.poll() is None:
        os.killpg(served.process.pid, signal.SIGKILL)
    for pid in served.descendants():
        with _gone_already():
            os.kill(pid, signal.SIGKILL)
    served.process.wait()
    if served.reader is not None:
        served.reader.join(10)
    if served.process.stdout is not None:
        served.process.stdout.close()


class _gone_already:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, *_: object) -> bool:
        return kind is ProcessLookupError


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent's wait is left


def _wait_gone(pids: Sequence[int], since: float) -> float:
    """Seconds from ``since`` until every one of ``pids`` has exited (at most ~30)."""
    while any(_alive(pid) for pid in pids) and time.monotonic() - since < 30:
        time.sleep(0.02)
    return time.monotonic() - since


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[Served, TokenMinter]]:
    minter, jwks = TokenMinter.create(tmp_path)
    command = serve_command(
        tmp_path / "data",
        jwks,
        workers=2,
        extra=["--plaintext", "--shutdown-grace", f"{GRACE}s"],
    )
    served = _start(
        command, tmp_path / "data", r"started \d+ workers on [\d.]+:(\d+)", "serving on", 2
    )
    try:
        yield served, minter
    finally:
        _end(served)


@pytest.fixture
def dev_serve(tmp_path: Path) -> Iterator[Served]:
    served = _start(
        _dev_command(tmp_path / "dev"),
        tmp_path / "dev",
        r"serving on [\d.]+:(\d+)",
        "serving on",
        1,
    )
    try:
        yield served
    finally:
        _end(served)


def _dev_command(data_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "meshca",
        "dev",
        "serve",
        "--data-dir",
        str(data_dir),
        "--listen",
        "127.0.0.1:0",
        "--plaintext",
        "--shutdown-grace",
        f"{GRACE}s",
        *extra,
    ]


def _csr_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class Load:
    """Clients that each call CreateCertificate in a loop on a channel of their own.

    Before SIGTERM any failure ends the test's hopes; after it, a client stops at its
    first failure (the server no longer takes calls).
    """

    target: str
    tokens: Sequence[str]
    in_flight: int = 0
    signalled: bool = False
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    serials: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    async def client(self, token: str) -> None:
        request = istio_pb2.IstioCertificateRequest(csr=_csr_pem())
        metadata = [("authorization", f"Bearer {token}")]
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
        async with grpc.aio.insecure_channel(self.target, options=options) as channel:
            stub = istio_grpc.IstioCertificateServiceStub(channel)
            while True:
                self.in_flight += 1
                try:
                    response = await stub.CreateCertificate(request, metadata=metadata, timeout=30)
                except grpc.aio.AioRpcError as error:
                    self.outcomes[error.code().name] += 1
                    self.details.append(f"{error.code().name}: {error.details()}")
                    return
                finally:
                    self.in_flight -= 1
                self.outcomes[OK] += 1
                leaf = x509.load_pem_x509_certificate(response.cert_chain[0].encode())
                self.serials.append(f"{leaf.serial_number:x}")


@dataclass
class Stopped:
    in_flight_at_signal: int
    exit_code: int
    exit_seconds: float
    tree_gone_seconds: float


async def _sigterm_under_load(served: Served, load: Load, warmup: float) -> Stopped:
    clients = [asyncio.create_task(load.client(token)) for token in load.tokens]
    await asyncio.sleep(warmup)
    assert sum(load.outcomes.values()) == load.outcomes[OK] > 0, load.details
    descendants = served.descendants()
    in_flight = load.in_flight
    started = time.monotonic()
    served.process.send_signal(signal.SIGTERM)
    load.signalled = True
    exit_code = await asyncio.to_thread(served.process.wait, GRACE + EXIT_MARGIN + 10)
    exited = time.monotonic() - started
    gone = await asyncio.to_thread(_wait_gone, descendants, started)
    await asyncio.wait_for(asyncio.gather(*clients), 30)
    return Stopped(in_flight, exit_code, exited, gone)


def _issued_serials(data_dir: Path) -> set[str]:
    engine = create_engine(f"sqlite:///{data_dir / 'meshca.db'}")
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT serial FROM issuance_record WHERE outcome = 'issued'")
            )
            return {row[0] for row in rows}
    finally:
        engine.dispose()


def _check(served: Served, load: Load, stopped: Stopped) -> None:
    report = f"{stopped} {dict(load.outcomes)}\n{served.log()}"
    # Only two endings: a certificate with its record, or UNAVAILABLE.
    assert set(load.outcomes) <= {OK, UNAVAILABLE}, (load.details, report)
    missing = set(load.serials) - _issued_serials(served.data_dir)
    assert not missing, (f"{len(missing)} certificates without a record", report)
    assert stopped.exit_code == 0, report
    assert stopped.tree_gone_seconds < GRACE + EXIT_MARGIN, report
    print(
        f"in flight at SIGTERM {stopped.in_flight_at_signal}; "
        f"{load.outcomes[OK]} OK, {load.outcomes[UNAVAILABLE]} UNAVAILABLE; "
        f"exit after {stopped.exit_seconds:.2f}s, tree gone after {stopped.tree_gone_seconds:.2f}s"
    )


async def test_serve_drains_under_load(serve: tuple[Served, TokenMinter]) -> None:
    served, minter = serve
    tokens = [minter.mint("shop", f"sa{i}") for i in range(CLIENTS)]
    load = Load(served.target, tokens)
    stopped = await _sigterm_under_load(served, load, warmup=1.0)
    _check(served, load, stopped)
    assert stopped.in_flight_at_signal > 0


async def test_dev_serve_drains_under_load(dev_serve: Served) -> None:
    issuer = DevTokenIssuer(dev_serve.data_dir / "dev-issuer")
    now = datetime.now(UTC)
    tokens = [issuer.mint("shop", f"sa{i}", "meshca", now=now) for i in range(CLIENTS)]
    load = Load(dev_serve.target, tokens)
    stopped = await _sigterm_under_load(dev_serve, load, warmup=1.0)
    _check(dev_serve, load, stopped)
    assert stopped.in_flight_at_signal > 0


def _now(api: K8sApiStandIn) -> K8sApiStandIn:
    # The stand-in mints with its own clock; the server checks with the real one.
    api.clock._now = datetime.now(UTC).replace(microsecond=0)
    return api


def _tokenreview_flags(api: K8sApiStandIn, grace: float) -> list[str]:
    return [
        "--trust-domain",
        "example.org",
        "--k8s-mode",
        "tokenreview",
        "--k8s-api-server",
        api.url,
        "--k8s-token-file",
        str(api.caller_token_file),
        "--plaintext",
        "--shutdown-grace",
        f"{grace}s",
    ]


async def _slow_calls(target: str, api: K8sApiStandIn, count: int) -> list[asyncio.Task[str]]:
    """``count`` CreateCertificate calls, returned once the stand-in holds all their reviews."""

    async def call(token: str) -> str:
        request = istio_pb2.IstioCertificateRequest(csr=_csr_pem())
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            try:
                response = await istio_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
                    request, metadata=[("authorization", f"Bearer {token}")], timeout=30
                )
            except grpc.aio.AioRpcError as error:
                return error.code().name
        leaf = x509.load_pem_x509_certificate(response.cert_chain[0].encode())
        return f"{leaf.serial_number:x}"

    before = api.review_arrivals
    calls = [asyncio.create_task(call(api.minter.token())) for _ in range(count)]
    deadline = time.monotonic() + 20
    while api.review_arrivals < before + count:
        assert time.monotonic() < deadline, "the calls never reached the API server"
        await asyncio.sleep(0.01)
    return calls


async def test_serve_finishes_a_slow_call_in_flight(tmp_path: Path, k8s_api: K8sApiStandIn) -> None:
    """Calls waiting 2 s on TokenReview when SIGTERM comes still get their certificates."""
    api = _now(k8s_api)
    data_dir = tmp_path / "data"
    command = [
        sys.executable, "-m", "meshca", "serve", "--listen", "127.0.0.1:0",
        "--data-dir", str(data_dir), "--workers", "2", *_tokenreview_flags(api, GRACE),
    ]  # fmt: skip
    served = _start(command, data_dir, r"started \d+ workers on [\d.]+:(\d+)", "serving on", 2)
    try:
        api.delay = 2.0
        calls = await _slow_calls(served.target, api, 8)
        descendants = served.descendants()
        started = time.monotonic()
        served.process.send_signal(signal.SIGTERM)
        # Once the drain began, a new call is refused (by the gate, or by a closed port).
        await asyncio.sleep(0.3)
        late = await _slow_call_refused(served.target, api)
        results = await asyncio.gather(*calls)
        exit_code = await asyncio.to_thread(served.process.wait, 30)
        gone = await asyncio.to_thread(_wait_gone, descendants, started)
        report = f"{results} late={late} exit={exit_code} gone={gone:.2f}s\n{served.log()}"
        assert late == UNAVAILABLE, report
        assert all(re.fullmatch(r"[0-9a-f]+", r) for r in results), report
        assert set(results) <= _issued_serials(data_dir), report
        assert exit_code == 0 and gone < GRACE + EXIT_MARGIN, report
        # The drain waited for the calls (about the rest of the 2 s review), not longer.
        assert gone > 1.0, report
    finally:
        _end(served)


async def _slow_call_refused(target: str, api: K8sApiStandIn) -> str:
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        try:
            await istio_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
                istio_pb2.IstioCertificateRequest(csr=_csr_pem()),
                metadata=[("authorization", f"Bearer {api.minter.token()}")],
                timeout=10,
            )
        except grpc.aio.AioRpcError as error:
            return error.code().name
    return OK


async def test_dev_serve_aborts_calls_past_the_grace(
    tmp_path: Path, k8s_api: K8sApiStandIn
) -> None:
    """A TokenReview slower than the grace: the call fails UNAVAILABLE, and the process
    is gone within the grace although a thread is still stuck in the review."""
    api = _now(k8s_api)
    grace = 1.5
    data_dir = tmp_path / "dev"
    command = _dev_command(data_dir) + _tokenreview_flags(api, grace)
    served = _start(command, data_dir, r"serving on [\d.]+:(\d+)", "serving on", 1)
    try:
        api.delay = 30.0  # longer than the attestor's own 5 s timeout
        calls = await _slow_calls(served.target, api, 4)
        started = time.monotonic()
        served.process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(served.process.wait, 30)
        gone = time.monotonic() - started
        results = await asyncio.gather(*calls)
        report = f"{results} exit={exit_code} gone={gone:.2f}s\n{served.log()}"
        assert results == [UNAVAILABLE] * 4, report
        assert gone < grace + EXIT_MARGIN, report
        assert "4 call(s) still running" in served.log(), report
        # The review's thread outlived the drain: the watchdog ended the process.
        assert exit_code == 1 and "exiting now" in served.log(), report
    finally:
        _end(served)
