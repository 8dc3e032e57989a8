"""Slow clients and floods: idle connections, garbage, HTTP/1.1 and a client that never
reads each get a bounded refusal, and a well-behaved proxy still gets its certificate.

The figures (5,000 idle connections, latency of a steady load) are measured by
``bench/floods.py``; these tests assert generous bounds only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshca.adapters.grpc.client import create_certificate
from meshca.adapters.grpc.server import ConnectionLimits, build_health_server
from tests.core.builders import csr_pem
from tests.integration.server_harness import TRUST_DOMAIN, TokenMinter, serve_command

pytestmark = pytest.mark.integration

IDLE_LIMIT_SECONDS = 2.0
#: ConnectionLimits' default handshake limit: a socket that never sends the preface.
HANDSHAKE_SECONDS = ConnectionLimits().handshake_seconds
IDLE_CONNECTIONS = 1000
#: Resident memory meshca (all processes) may add while holding the idle connections and
#: taking the floods: bench/floods.py measures ~11 KiB per idle connection (~11 MiB here).
RSS_GROWTH_MIB = 64
#: A well-behaved proxy's certificate, with all of it going on: ~20 ms when quiet.
CERTIFICATE_SECONDS = 5.0

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, GOAWAY = 0, 1, 3, 4, 7
REFUSED_STREAM = 7


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + struct.pack(">I", stream) + payload
    )


def _frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, stream, payload) of each complete HTTP/2 frame in ``data``."""
    found, pos = [], 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        stream = int.from_bytes(data[pos + 5 : pos + 9], "big")
        found.append((data[pos + 3], stream, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return found


def _literal_headers(headers: list[tuple[str, str]]) -> bytes:
    """HPACK literal fields without indexing; every name and value here is < 127 bytes."""
    block = bytearray()
    for name, value in headers:
        block += b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()
    return bytes(block)


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float | None]:
    """Everything the server sends until it closes (time taken), or None at ``timeout``."""
    started = time.monotonic()
    received = bytearray()
    sock.settimeout(timeout)
    try:
        while data := sock.recv(65536):
            received += data
    except TimeoutError:
        return bytes(received), None
    except OSError:  # a reset is a close too
        pass
    return bytes(received), time.monotonic() - started


def _rss_mib(pgid: int) -> float:
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


def _group_size(pgid: int) -> int:
    count = 0
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if (
                entry.name.isdigit()
                and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid
            ):
                count += 1
    return count


@dataclass
class Served:
    port: int
    pgid: int
    minter: TokenMinter
    output: list[str]

    def certificate_seconds(self) -> float:
        """Time for one CreateCertificate over a new plaintext channel; raises on failure."""
        started = time.monotonic()
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            uri = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/web"
            chain = create_certificate(
                channel, self.minter.mint(), csr_pem(uris=[uri]).decode(), timeout=30
            )
        assert chain, "no certificate"
        return time.monotonic() - started


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """``meshca serve --workers 2 --plaintext`` with a short idle limit, in its own group."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    minter, jwks = TokenMinter.create(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")}
    command = serve_command(
        tmp_path / "data",
        jwks,
        workers=2,
        extra=["--plaintext", "--connection-idle-timeout", f"{IDLE_LIMIT_SECONDS}s"],
    )
    command[command.index("127.0.0.1:0")] = f"127.0.0.1:{port}"
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    served = Served(port, process.pid, minter, [])

    def collect() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            served.output.append(line)

    reader = threading.Thread(target=collect, name="serve-output", daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, "".join(served.output)
            try:
                served.certificate_seconds()
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "".join(served.output)
                time.sleep(0.2)
        yield served
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            reader.join(10)
            if process.stdout:
                process.stdout.close()


def _open_idle(port: int, count: int, *, handshake: bool) -> list[socket.socket]:
    """``count`` connections; with ``handshake``, each completes the HTTP/2 handshake
    (preface, SETTINGS both ways, acknowledged) and then goes quiet."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if handshake:
            settings = b""
            while not any(kind == SETTINGS for kind, _, _ in _frames(settings)):
                settings += sock.recv(4096)
            sock.sendall(PREFACE + _frame(SETTINGS, 0, 0) + _frame(SETTINGS, 1, 0))
        sockets.append(sock)
    return sockets


def test_floods_leave_a_proxy_its_certificate(served: Served) -> None:
    before_mib = _rss_mib(served.pgid)
    processes = _group_size(served.pgid)
    opened = time.monotonic()
    quiet = _open_idle(served.port, IDLE_CONNECTIONS // 2, handshake=False)
    idle = _open_idle(served.port, IDLE_CONNECTIONS // 2, handshake=True)
    try:
        # 10 MB of garbage: the server reads a little, then closes the connection.
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
            garbage, sent = os.urandom(10 * 2**20), 0
            with contextlib.suppress(OSError):
                while sent < len(garbage):
                    sent += sock.send(garbage[sent : sent + 65536])
            _, closed_after = _read_until_closed(sock, 10)
            assert closed_after is not None, "the server kept a connection that sent garbage"

        # HTTP/1.1: no HTTP/1.1 answer (the server speaks only HTTP/2), then a close.
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
            sock.sendall(
                b"POST /istio.v1.auth.IstioCertificateService/CreateCertificate HTTP/1.1\r\n"
                b"Host: meshca\r\nContent-Type: application/grpc\r\nContent-Length: 0\r\n\r\n"
            )
            reply, closed_after = _read_until_closed(sock, 10)
            assert closed_after is not None, "the server kept an HTTP/1.1 connection open"
            assert not reply.startswith(b"HTTP/1"), reply[:100]
            assert len(reply) < 1024, "more than the server's SETTINGS for an HTTP/1.1 client"

        # With all that going on, a proxy gets its certificate promptly, and so on.
        for _ in range(3):
            assert served.certificate_seconds() < CERTIFICATE_SECONDS
        growth = _rss_mib(served.pgid) - before_mib
        assert growth < RSS_GROWTH_MIB, f"meshca grew {growth:.0f} MiB"

        # Idle connections past the handshake are closed at the idle limit, with a GOAWAY
        # that says no call was lost (last stream 0); gRPC clients reconnect on their own.
        for sock in idle:
            received, closed_after = _read_until_closed(sock, 3 * IDLE_LIMIT_SECONDS + 5)
            assert closed_after is not None, "an idle connection outlived the idle limit"
            goaways = [p for kind, _, p in _frames(received) if kind == GOAWAY]
            assert goaways and goaways[0][:4] == bytes(4), received[-64:]
        # Sockets that never sent the preface are closed too: at the idle limit here, at
        # the handshake limit when that comes first (timed from when they were opened).
        for sock in quiet:
            remaining = min(HANDSHAKE_SECONDS, 3 * IDLE_LIMIT_SECONDS) + 5
            _, closed_after = _read_until_closed(
                sock, max(0.1, remaining - (time.monotonic() - opened))
            )
            assert closed_after is not None, "a silent socket outlived its limits"
    finally:
        for sock in quiet + idle:
            sock.close()
    assert served.certificate_seconds() < CERTIFICATE_SECONDS
    assert _group_size(served.pgid) == processes, "a meshca process died"


@pytest.fixture
async def health_port() -> AsyncIterator[int]:
    """A server with the same limits code, shortened: pings every 0.5 s, 1 s to answer,
    at most 4 calls per connection."""
    limits = ConnectionLimits(
        keepalive_seconds=0.5, ping_timeout_seconds=1.0, max_streams_per_connection=4
    )
    servicer = health.aio.HealthServicer()
    server, port = build_health_server(servicer, "127.0.0.1:0", limits)
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield port
    finally:
        await server.stop(0)


async def test_a_client_that_never_reads_is_dropped(health_port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", health_port)
    # Stream windows of 0: the server can send no answer's DATA; and no read after this.
    window_zero = struct.pack(">HI", 4, 0)
    writer.write(PREFACE + _frame(SETTINGS, 0, 0, window_zero) + _frame(SETTINGS, 1, 0))
    headers = _literal_headers(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/grpc.health.v1.Health/Watch"),
            (":authority", "meshca"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
    )
    request = health_pb2.HealthCheckRequest(service="").SerializeToString()
    body = b"\x00" + len(request).to_bytes(4, "big") + request
    for index in range(10):
        writer.write(
            _frame(HEADERS, 4, 1 + 2 * index, headers) + _frame(DATA, 1, 1 + 2 * index, body)
        )
    await writer.drain()
    started = time.monotonic()
    # Watched without reading: the kernel knows when the server has closed its end.
    sock = writer.get_extra_info("socket")
    while sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 1:  # ESTABLISHED
        assert time.monotonic() - started < 10, "a client that never reads was kept"
        await asyncio.sleep(0.1)
    received = bytearray()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(2):
            while data := await reader.read(65536):
                received += data
    writer.close()
    frames = _frames(bytes(received))
    refused = [s for kind, s, p in frames if kind == RST_STREAM and p[:4] == b"\x00\x00\x00\x07"]
    assert len(refused) == 10 - 4, "calls past the per-connection limit were not refused"
    assert any(kind == GOAWAY for kind, _, _ in frames)

    # The server itself is fine.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_connections_past_the_cap_are_closed_at_once() -> None:
    servicer = health.aio.HealthServicer()
    server, port = build_health_server(servicer, "127.0.0.1:0", ConnectionLimits(max_connections=4))
    await server.start()
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(4):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(PREFACE + _frame(SETTINGS, 0, 0))
            async with asyncio.timeout(5):
                assert await reader.read(9), "a connection within the cap got nothing"
            held.append(writer)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        held.append(writer)
        async with asyncio.timeout(5):
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read(65536) == b"", "the fifth connection was served"
    finally:
        for writer in held:
            writer.close()
        await server.stop(0)
