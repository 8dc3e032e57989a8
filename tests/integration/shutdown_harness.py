"""``meshca serve`` and ``meshca dev serve`` as subprocesses, SIGTERM under load, and
the checks after it: shared by tests/integration/test_shutdown.py and
bench/shutdown_trials.py."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import create_engine, text

from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc

OK, UNAVAILABLE = "OK", "UNAVAILABLE"
#: ``meshca serve`` says this once it has started its workers, with the port.
SERVE_PORT = r"started \d+ workers on [\d.]+:(\d+)"
#: ``meshca dev serve`` says this once it serves, with the port.
DEV_PORT = r"serving on [\d.]+:(\d+)"


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


def start_served(
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


def end_served(served: Served) -> None:
    if served.process.poll() is None:
        os.killpg(served.process.pid, signal.SIGKILL)
    for pid in served.descendants():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    served.process.wait()
    if served.reader is not None:
        served.reader.join(10)
    if served.process.stdout is not None:
        served.process.stdout.close()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent's wait is left


def wait_gone(pids: Sequence[int], since: float) -> float:
    """Seconds from ``since`` until every one of ``pids`` has exited (at most ~30)."""
    while any(alive(pid) for pid in pids) and time.monotonic() - since < 30:
        time.sleep(0.02)
    return time.monotonic() - since


def dev_command(data_dir: Path, grace: float, *extra: str) -> list[str]:
    """``meshca dev serve`` on a free 127.0.0.1 port, in plaintext."""
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
        f"{grace}s",
        *extra,
    ]


def csr_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class Load:
    """Clients that each call CreateCertificate in a loop on a channel of their own,
    until their first failure (after SIGTERM: the server no longer takes calls).

    ``in_flight`` counts calls sent and not yet answered, as the clients see them.
    """

    target: str
    tokens: Sequence[str]
    in_flight: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    serials: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    async def client(self, token: str) -> None:
        request = istio_pb2.IstioCertificateRequest(csr=csr_pem())
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


async def sigterm_under_load(served: Served, load: Load, warmup: float) -> Stopped:
    """Run ``load`` for ``warmup`` seconds (every call must succeed), send SIGTERM, and
    wait for the process, its descendants and every client to end."""
    clients = [asyncio.create_task(load.client(token)) for token in load.tokens]
    await asyncio.sleep(warmup)
    assert sum(load.outcomes.values()) == load.outcomes[OK] > 0, load.details
    descendants = served.descendants()
    in_flight = load.in_flight
    started = time.monotonic()
    served.process.send_signal(signal.SIGTERM)
    exit_code = await asyncio.to_thread(served.process.wait, 60)
    exited = time.monotonic() - started
    gone = await asyncio.to_thread(wait_gone, descendants, started)
    await asyncio.wait_for(asyncio.gather(*clients), 30)
    return Stopped(in_flight, exit_code, exited, gone)


def issued_serials(data_dir: Path) -> set[str]:
    engine = create_engine(f"sqlite:///{data_dir / 'meshca.db'}")
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT serial FROM issuance_record WHERE outcome = 'issued'")
            )
            return {row[0] for row in rows}
    finally:
        engine.dispose()
