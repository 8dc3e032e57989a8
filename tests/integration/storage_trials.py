"""Storage fault trials: a real ``meshca serve --workers 2`` under concurrent proxies while
its database goes away (PostgreSQL stopped, SQLite's disk full) and comes back.

Used by ``tests/integration/test_storage_faults.py`` (one trial each, with assertions)
and ``bench/storage_faults.py`` (repeated trials, with medians). Everything runs on
127.0.0.1. ``Served`` records when each line of the server's output arrived, so the
time a worker reported "not ready" can be compared with the moment of the fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text

from meshca.adapters.grpc._gen.meshca.v1 import ca_pb2, ca_pb2_grpc
from meshca.adapters.storage import make_engine
from meshca.cli import main as meshca_main
from tests.integration.server_harness import TokenMinter, serve_command

if TYPE_CHECKING:
    from tests.fixtures_pg import PostgresServer

__all__ = [
    "Call",
    "Load",
    "RecordCheck",
    "Served",
    "Trial",
    "audit_verify",
    "check_records",
    "disk_full_trial",
    "fill",
    "free_port",
    "integrity_check",
    "pg_ctl",
    "postgres_trial",
    "readiness_seen",
    "small_tmpfs",
    "start_served",
]

READY = "meshca.ready"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WORKERS = 2
#: A proxy's pause after a refusal before it asks again (a real one backs off longer).
RETRY_PAUSE = 0.05
CALL_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@dataclass
class Served:
    """One ``meshca serve`` process tree in its own session; output lines with arrival times."""

    process: subprocess.Popen[str]
    health_port: int
    output: list[tuple[float, str]] = field(default_factory=list)
    port: int = 0
    reader: threading.Thread | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self, last: int = 60) -> str:
        return "".join(line for _, line in self.output[-last:])

    def lines_after(self, since: float, pattern: str) -> list[tuple[float, str]]:
        """Lines matching ``pattern`` that arrived at or after ``since`` (monotonic)."""
        return [
            (at, line) for at, line in list(self.output) if at >= since and re.search(pattern, line)
        ]

    def worker_times(self, since: float, pattern: str) -> dict[str, float]:
        """For each worker, when it first printed a line matching ``pattern`` after ``since``."""
        seen: dict[str, float] = {}
        for at, line in self.lines_after(since, pattern):
            worker = re.search(r" (worker-\d+) ", line)
            if worker is not None:
                seen.setdefault(worker.group(1), at)
        return seen

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then wait; SIGKILL the whole group if it does not exit in time."""
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self._close_output()

    def kill(self) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._close_output()

    def _close_output(self) -> None:
        if self.reader is not None:
            self.reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_served(data_dir: Path, jwks: Path, extra: Sequence[str]) -> Served:
    """``meshca serve --workers 2 --plaintext`` with a health port; returns once both serve."""
    health_port = free_port()
    command = serve_command(
        data_dir,
        jwks,
        workers=WORKERS,
        extra=[
            "--plaintext",
            "--health-listen",
            f"127.0.0.1:{health_port}",
            # Readiness rounds every 0.2 s, so a change shows within a fraction of a second.
            "--journal-poll",
            "0.2s",
            *extra,
        ],
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")}
    # The spawned workers import meshca from the same tree as this process.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    served = Served(process, health_port)
    listening = threading.Event()

    def collect() -> None:
        assert process.stdout is not None
        serving = 0
        for line in process.stdout:
            served.output.append((time.monotonic(), line))
            found = re.search(r"started \d+ workers on [\d.]+:(\d+)", line)
            if found:
                served.port = int(found.group(1))
            serving += "serving on" in line
            if serving == WORKERS:
                listening.set()
        listening.set()

    served.reader = threading.Thread(target=collect, name="serve-output", daemon=True)
    served.reader.start()
    if not (listening.wait(60) and served.alive and served.port):
        served.kill()
        raise AssertionError(f"meshca serve did not start:\n{served.log()}")
    return served


@dataclass(frozen=True)
class Call:
    """One Sign call as a proxy saw it: when, the status name, and what it received."""

    started: float
    ended: float
    code: str
    detail: str = ""
    serial: str | None = None
    fingerprint: str | None = None


class Load:
    """``clients`` proxies, each with its own connection, key and token, signing in a loop.

    A proxy pauses ``RETRY_PAUSE`` after a refusal and not at all after a certificate.
    """

    def __init__(self, target: str, minter: TokenMinter, clients: int) -> None:
        self.calls: list[Call] = []
        self._target = target
        self._proxies = []
        for i in range(clients):
            key = ec.generate_private_key(ec.SECP256R1())
            csr = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([]))
                .sign(key, hashes.SHA256())
                .public_bytes(Encoding.DER)
            )
            self._proxies.append((minter.mint(f"ns{i % 4}", f"sa{i}"), csr))

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._proxy(token, csr, stop) for token, csr in self._proxies))

    def first_ok_after(self, since: float) -> float | None:
        ends = [c.ended for c in self.calls if c.code == "OK" and c.started >= since]
        return min(ends) if ends else None

    def first_refusal_after(self, since: float) -> Call | None:
        refused = [c for c in self.calls if c.code != "OK" and c.started >= since]
        return min(refused, key=lambda c: c.ended) if refused else None

    async def _proxy(self, token: str, csr: bytes, stop: asyncio.Event) -> None:
        # A connection of its own, as each sidecar has.
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(self._target, options=options) as channel:
            stub = ca_pb2_grpc.CertificateServiceStub(channel)
            metadata = [("authorization", f"Bearer {token}")]
            while not stop.is_set():
                started = time.monotonic()
                try:
                    response = await stub.Sign(
                        ca_pb2.SignRequest(csr=csr), metadata=metadata, timeout=CALL_TIMEOUT
                    )
                except grpc.aio.AioRpcError as error:
                    self.calls.append(
                        Call(started, time.monotonic(), error.code().name, error.details() or "")
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), RETRY_PAUSE)
                    continue
                leaf = x509.load_pem_x509_certificate(response.certificate.encode())
                fingerprint = hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()
                self.calls.append(
                    Call(
                        started,
                        time.monotonic(),
                        "OK",
                        serial=response.serial,
                        fingerprint=fingerprint,
                    )
                )


async def readiness_seen(served: Served, wanted: int, deadline: float) -> float | None:
    """Poll ``meshca.ready`` over fresh connections until one answers ``wanted``.

    Returns when that was seen (monotonic), or None at the deadline. Liveness must answer
    SERVING on every poll: a database outage must never make a replica look dead.
    """
    while time.monotonic() < deadline:
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{served.health_port}", options=options
        ) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            live = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert live.status == SERVING, "liveness went NOT_SERVING"
            ready = await stub.Check(health_pb2.HealthCheckRequest(service=READY), timeout=5)
            if ready.status == wanted:
                return time.monotonic()
        await asyncio.sleep(0.05)
    return None


@dataclass(frozen=True)
class RecordCheck:
    """What the database holds for the certificates the proxies received."""

    certificates: int
    records: int
    missing: list[str]
    mismatched: list[str]
    leaf_gaps: bool


def check_records(database_url: str, calls: Sequence[Call]) -> RecordCheck:
    """Every certificate received has an ISSUED record with its fingerprint; leaves gapless."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT serial, fingerprint_sha256 FROM issuance_record "
                    "WHERE outcome = 'issued'"
                )
            ).all()
            count, low, high = connection.execute(
                text("SELECT count(*), min(leaf_index), max(leaf_index) FROM issuance_record")
            ).one()
    finally:
        engine.dispose()
    recorded = {serial: fingerprint for serial, fingerprint in rows}
    received = [c for c in calls if c.code == "OK"]
    missing = [c.serial or "?" for c in received if c.serial not in recorded]
    mismatched = [
        c.serial or "?"
        for c in received
        if c.serial in recorded and recorded[c.serial] != c.fingerprint
    ]
    return RecordCheck(
        certificates=len(received),
        records=int(count),
        missing=missing,
        mismatched=mismatched,
        leaf_gaps=(low, high) != (0, count - 1),
    )


def audit_verify(*source: str) -> tuple[int, str]:
    """``meshca audit verify`` against the database; the exit code and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = meshca_main(["audit", "verify", *source])
    return code, out.getvalue()


# -- the trials -------------------------------------------------------------------------


@dataclass
class Trial:
    """What one trial saw. Times are monotonic seconds; None where it never happened."""

    calls: list[Call]
    #: The fault began, was complete, began to be undone, was undone.
    fault_began: float
    fault_done: float
    repair_began: float
    repair_done: float
    #: When the health port first answered NOT_SERVING after the fault, SERVING after repair.
    ready_off: float | None
    ready_on: float | None
    #: Per worker, when it logged "not ready" after the fault and "ready" after the repair.
    workers_off: dict[str, float]
    workers_on: dict[str, float]
    alive_throughout: bool
    exit_code: int | None
    records: RecordCheck | None
    verify: tuple[int, str]
    lines: list[str]
    integrity: str = ""

    def log(self, last: int = 60) -> str:
        return "".join(self.lines[-last:])

    def during_fault(self) -> list[Call]:
        """Calls made wholly while the fault was complete and not yet being undone."""
        return [
            c for c in self.calls if c.started >= self.fault_done and c.ended <= self.repair_began
        ]

    def after_repair(self) -> list[Call]:
        return [c for c in self.calls if c.started >= self.repair_done]

    def first_ok_after_repair(self) -> float | None:
        ends = [c.ended for c in self.after_repair() if c.code == "OK"]
        return min(ends) - self.repair_done if ends else None

    def figures(self) -> dict[str, float | int | None]:
        """The trial's numbers; times in seconds.

        ``first_refusal`` and ``ready_off`` count from the start of the fault (``pg_ctl
        stop`` began: PostgreSQL refuses new sessions from then on; the filler began),
        ``first_certificate_after`` and ``ready_on`` from the end of the repair
        (``pg_ctl start`` returned, the filler was deleted). ``ready_off`` and
        ``ready_on`` are those of the slower worker.
        """
        refused = [c.ended for c in self.calls if c.code != "OK" and c.started >= self.fault_began]
        down = self.during_fault()
        return {
            "calls": len(self.calls),
            "certificates": sum(c.code == "OK" for c in self.calls),
            "refused": sum(c.code != "OK" for c in self.calls),
            "calls_while_down": len(down),
            "certificates_while_down": sum(c.code == "OK" for c in down),
            "refused_after_repair": sum(c.code != "OK" for c in self.after_repair()),
            "fault_took": self.fault_done - self.fault_began,
            "first_refusal": min(refused) - self.fault_began if refused else None,
            "ready_off": _latest(self.workers_off, self.fault_began),
            "first_certificate_after": self.first_ok_after_repair(),
            "ready_on": _latest(self.workers_on, self.repair_done),
            "records_missing": None if self.records is None else len(self.records.missing),
        }

    def statuses(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for call in self.calls:
            counts[call.code] = counts.get(call.code, 0) + 1
        return counts

    def problems(self, *, reason: str, clients: int) -> list[str]:
        """Everything this trial did wrong; empty when it held.

        It holds when every call got a certificate or UNAVAILABLE naming ``reason``, most
        calls made while the fault lasted were refused, both workers went unready and
        ready again, a certificate came after the repair, the server lived through it and
        exited cleanly on SIGTERM, every certificate received has its ISSUED record with
        its fingerprint, the leaves are gapless, ``meshca audit verify`` passed and (for
        SQLite) ``PRAGMA integrity_check`` said ok.
        """
        found: list[str] = []
        if not set(self.statuses()) <= {"OK", "UNAVAILABLE"}:
            found.append(f"statuses other than OK and UNAVAILABLE: {self.statuses()}")
        refused = [c for c in self.calls if c.code != "OK"]
        if len(refused) < clients:
            found.append(f"only {len(refused)} calls were refused, too few to judge")
        unclear = {c.detail for c in refused if reason not in c.detail}
        if unclear:
            found.append(f"refusals that do not say {reason!r}: {sorted(unclear)[:3]}")
        down = self.during_fault()
        if sum(c.code == "UNAVAILABLE" for c in down) <= len(down) // 2:
            found.append(f"{len(down)} calls while the fault lasted, most not refused")
        if len(self.workers_off) != WORKERS or self.ready_off is None:
            found.append(f"readiness did not go off on every worker: {self.workers_off}")
        if len(self.workers_on) != WORKERS or self.ready_on is None:
            found.append(f"readiness did not come back on every worker: {self.workers_on}")
        if self.first_ok_after_repair() is None:
            found.append("no certificate after the repair")
        if not self.alive_throughout or self.exit_code != 0:
            found.append(f"server died or exited {self.exit_code}")
        if any("Traceback" in line for line in self.lines):
            found.append("a traceback in the server's output")
        records = self.records
        if records is None or records.certificates == 0:
            found.append("no certificate was received at all")
        elif records.missing or records.mismatched or records.leaf_gaps:
            found.append(
                f"{len(records.missing)} certificates without a record "
                f"{records.missing[:3]}, {len(records.mismatched)} with another "
                f"fingerprint, leaf gaps: {records.leaf_gaps}"
            )
        code, output = self.verify
        if code != 0:
            found.append(f"meshca audit verify failed: {output[-500:]}")
        if self.integrity not in ("", "ok"):
            found.append(f"PRAGMA integrity_check: {self.integrity[:500]}")
        return found


def _latest(times: dict[str, float], since: float) -> float | None:
    """When the last of the workers got there, after ``since``; None if one never did."""
    return max(times.values()) - since if len(times) == WORKERS else None


_PG_CTL = """
import os, pwd, sys, time
from pathlib import Path
from tests.fixtures_pg import PostgresServer

run_as = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
server = PostgresServer(Path(sys.argv[1]), run_as)
server.port = int(sys.argv[2])
began = time.monotonic()
match sys.argv[3]:
    case "start":
        server.start()
    case "stop":
        server.stop()
    case "crash":
        server.stop(crash=True)
print(began, time.monotonic())
"""


def pg_ctl(pg: PostgresServer, action: str) -> tuple[float, float]:
    """``start``, ``stop`` (fast) or ``crash`` (immediate) ``pg``, from a fresh interpreter.

    Returns when ``pg_ctl`` began and when it returned (the host's monotonic clock).
    Switching to the postgres user rules out vfork, and a plain fork of this process,
    with gRPC's threads running, can crash the child before it execs (seen: pg_ctl
    "died with SIGSEGV"); a process that never loaded gRPC forks safely.
    """
    done = subprocess.run(
        [sys.executable, "-c", _PG_CTL, str(pg.base), str(pg.port), action],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        cwd=Path(__file__).resolve().parents[2],
    )
    if done.returncode != 0:
        raise AssertionError(f"PostgreSQL {action} failed:\n{done.stdout}{done.stderr}")
    began, ended = done.stdout.split()[-2:]
    return float(began), float(ended)


async def _until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def postgres_trial(
    pg: PostgresServer,
    base: Path,
    *,
    crash: bool = False,
    clients: int = 32,
    warm: float = 1.0,
    down: float = 1.5,
) -> Trial:
    """Stop PostgreSQL under load (``pg_ctl stop``, mode ``fast``, or ``immediate`` with
    ``crash``: no checkpoint, WAL replay at start), hold it down, start it again."""
    url = pg.url().replace("postgresql+psycopg://", "postgresql://")
    minter, jwks = TokenMinter.create(base)
    data_dir = base / "data"
    served = start_served(data_dir, jwks, ["--database-url", url])
    try:
        assert await readiness_seen(served, SERVING, time.monotonic() + 20), served.log()
        load = Load(served.target, minter, clients)
        stop = asyncio.Event()
        driving = asyncio.create_task(load.run(stop))
        alive = True
        try:
            await asyncio.sleep(warm)
            fault_began, fault_done = await asyncio.to_thread(
                pg_ctl, pg, "crash" if crash else "stop"
            )
            ready_off = await readiness_seen(served, NOT_SERVING, fault_done + 10)
            await _until(
                lambda: len(served.worker_times(fault_began, "not ready: ")) == WORKERS, 10
            )
            await asyncio.sleep(down)
            alive = served.alive
            repair_began, repair_done = await asyncio.to_thread(pg_ctl, pg, "start")
            ready_on = await readiness_seen(served, SERVING, repair_done + 15)
            await _until(lambda: load.first_ok_after(repair_done) is not None, 15)
            await _until(
                lambda: len(served.worker_times(repair_done, r" ready: this replica")) == WORKERS,
                10,
            )
            await asyncio.sleep(0.5)  # issuance under load again, after the recovery
            alive = alive and served.alive
        finally:
            stop.set()
            await driving
        exit_code = await asyncio.to_thread(served.stop)
    finally:
        served.kill()
    return Trial(
        calls=load.calls,
        fault_began=fault_began,
        fault_done=fault_done,
        repair_began=repair_began,
        repair_done=repair_done,
        ready_off=ready_off,
        ready_on=ready_on,
        workers_off=served.worker_times(fault_began, "not ready: "),
        workers_on=served.worker_times(repair_done, r" ready: this replica"),
        alive_throughout=alive,
        exit_code=exit_code,
        records=check_records(url, load.calls),
        verify=audit_verify("--data-dir", str(data_dir), "--database-url", url),
        lines=[line for _, line in served.output],
    )


@contextlib.contextmanager
def small_tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``directory`` (root only), unmounted afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if mounted.returncode != 0:
        # Never skipped: the disk-full trial runs as root, as CI does.
        raise AssertionError(f"cannot mount a tmpfs (run as root): {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(
            ["umount", "-l", str(directory)], check=False, capture_output=True, timeout=30
        )


def fill(path: Path) -> int:
    """Write ``path`` until its filesystem has no byte left; returns the bytes written."""
    written = 0
    with path.open("wb", buffering=0) as filler:
        for chunk in (1 << 20, 1 << 12, 1):
            block = b"\0" * chunk
            while True:
                try:
                    written += filler.write(block) or 0
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    break
    return written


def integrity_check(database: Path) -> str:
    connection = sqlite3.connect(database)
    try:
        return "; ".join(row[0] for row in connection.execute("PRAGMA integrity_check"))
    finally:
        connection.close()


async def disk_full_trial(
    base: Path,
    *,
    clients: int = 32,
    size: str = "16m",
    warm: float = 1.0,
    full: float = 1.5,
    extra: Sequence[str] = (),
) -> Trial:
    """Fill the tmpfs holding the SQLite data dir under load, hold it full, then free it.

    The whole data directory is on the tmpfs: the database, its WAL and shared-memory
    index, the write lock and the keys, as meshca lays them out.
    """
    minter, jwks = TokenMinter.create(base)
    with small_tmpfs(base / "disk", size) as disk:
        data_dir = disk / "data"
        served = start_served(data_dir, jwks, extra)
        try:
            assert await readiness_seen(served, SERVING, time.monotonic() + 20), served.log()
            load = Load(served.target, minter, clients)
            stop = asyncio.Event()
            driving = asyncio.create_task(load.run(stop))
            try:
                await asyncio.sleep(warm)
                fault_began = time.monotonic()
                filler = disk / "filler"
                await asyncio.to_thread(fill, filler)
                fault_done = time.monotonic()
                # The WAL reuses the space it has until its next checkpoint: wait for the
                # first refusal, then hold the disk full.
                await _until(lambda: load.first_refusal_after(fault_done) is not None, 30)
                ready_off = await readiness_seen(served, NOT_SERVING, time.monotonic() + 5)
                await asyncio.sleep(full)
                alive = served.alive
                repair_began = time.monotonic()
                filler.unlink()
                repair_done = time.monotonic()
                ready_on = await readiness_seen(served, SERVING, repair_done + 15)
                await _until(lambda: load.first_ok_after(repair_done) is not None, 15)
                await asyncio.sleep(0.5)
                alive = alive and served.alive
            finally:
                stop.set()
                await driving
            exit_code = await asyncio.to_thread(served.stop)
        finally:
            served.kill()
        database = data_dir / "meshca.db"
        return Trial(
            calls=load.calls,
            fault_began=fault_began,
            fault_done=fault_done,
            repair_began=repair_began,
            repair_done=repair_done,
            ready_off=ready_off,
            ready_on=ready_on,
            workers_off=served.worker_times(fault_began, "not ready: "),
            workers_on=served.worker_times(repair_done, r" ready: this replica"),
            alive_throughout=alive,
            exit_code=exit_code,
            records=check_records(f"sqlite:///{database}", load.calls),
            verify=audit_verify("--data-dir", str(data_dir)),
            lines=[line for _, line in served.output],
            integrity=integrity_check(database),
        )
