"""Slow clients and floods: what abusers get, and what they cost everyone else.

    flock /tmp/meshca-bench.lock .venv/bin/python bench/floods.py [--runs 3] [--tls]
        [--idle 5000] [--hold 25] [--never-read-streams 1000] [--garbage-mib 10]
        [--serve-arg=--connection-idle-timeout=15s ...]

One ``meshca serve --workers 2`` (SQLite; plaintext, or meshca's own TLS with ``--tls``)
answers a steady, well-behaved load: h2load, 16 connections with one stream each (16
proxies), in back-to-back chunks of 400 requests, each request a real CreateCertificate
checked against the issuance record. While that load runs, each abuse is applied in turn,
every one on 127.0.0.1 and bounded in count and time:

- ``idle-tcp``: ``--idle`` TCP connections that send nothing (no TLS, no HTTP/2 preface);
- ``idle-h2``: as many that complete the handshake (TLS with ALPN h2, the preface, the
  SETTINGS exchange) and then send nothing, as an idle proxy would;
- ``never-read``: two connections that each open ``--never-read-streams`` streams of
  valid CreateCertificate requests (a token for another service account), advertise an
  HTTP/2 stream window of 0 so that no answer can be sent, and never read the socket;
- ``garbage``: ``--garbage-mib`` MiB of random bytes on one connection; then the same
  after a valid HTTP/2 preface (plaintext only: inside TLS it would be TLS garbage);
- ``http1``: 200 HTTP/1.1 requests (POST to the gRPC method, and GET /), 20 at a time.

Each abuse is watched for at most ``--hold`` seconds (the never-reading client: up to
``--slow-hold``). Reported for each: what the abuser got (bytes, frames, when the server
closed the connection), meshca's resident memory summed over all its processes (before;
peak during; after, once the abuser has gone), and the load's p50/p99 latency and errors
in the window before versus during the abuse. Errors are h2load failures plus answers
that carried no certificate (2xx answers minus new rows for the load's identity in the
issuance record). Results: bench/results/floods-<timestamp>.json, and a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import create_engine, func, select
from sqlalchemy.pool import NullPool

from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.k8s.dev_issuer import DevTokenIssuer
from meshca.adapters.storage.tables import IssuanceRecordRow
from meshca.core.audit import Outcome

from loadgen import ensure_h2load, percentile
from meshca_ca import AUDIENCE, METHOD, meshca_ca
from soak import rss_kib
from target import Target
from workload import NAMESPACE, SPIFFE_ID, TRUST_DOMAIN, TTL_SECONDS, grpc_frame, make_csr

RESULTS = Path(__file__).resolve().parent / "results"
LOAD_CLIENTS = 16
CHUNK = 400
BASELINE_SECONDS = 5.0
SETTLE_SECONDS = 3.0
ABUSER_ACCOUNT = "abuser"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_STATUS_2XX = re.compile(r"status codes: (\d+) 2xx")
# HTTP/2 frame types and flags (RFC 9113, section 6).
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0, 1, 3, 4, 6, 7
ACK, END_STREAM, END_HEADERS = 1, 1, 4
SETTINGS_INITIAL_WINDOW_SIZE = 4
FRAME_NAMES = {0: "DATA", 1: "HEADERS", 3: "RST_STREAM", 4: "SETTINGS", 6: "PING", 7: "GOAWAY"}
FRAME_NAMES |= {8: "WINDOW_UPDATE"}
H2_ERRORS = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR"}
H2_ERRORS |= {7: "REFUSED_STREAM", 8: "CANCEL", 11: "ENHANCE_YOUR_CALM"}


# --- HTTP/2 by hand: the abusers need to break the rules a client library keeps ---


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    header = struct.pack(">I", len(payload))[1:] + bytes([kind, flags])
    return header + struct.pack(">I", stream) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def hpack_literal(headers: list[tuple[str, str]]) -> bytes:
    """Header block of literal fields without indexing, no Huffman (RFC 7541, 6.2.2)."""
    block = bytearray()
    for name, value in headers:
        block.append(0)
        for text in (name.encode(), value.encode()):
            block += _hpack_int(len(text), 7) + text
    return bytes(block)


def parse_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of each complete frame in ``data``."""
    frames, pos = [], 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        if pos + 9 + length > len(data):
            break
        kind, flags = data[pos + 3], data[pos + 4]
        stream = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        frames.append((kind, flags, stream, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return frames


def describe_h2(data: bytes) -> str:
    """What an HTTP/2 peer sent: frame counts by type; a GOAWAY's code and message."""
    counts: dict[str, int] = {}
    goaway = ""
    rst_codes: dict[str, int] = {}
    for kind, _flags, _stream, payload in parse_frames(data):
        name = FRAME_NAMES.get(kind, f"type{kind}")
        counts[name] = counts.get(name, 0) + 1
        if kind == GOAWAY and len(payload) >= 8:
            code = int.from_bytes(payload[4:8], "big")
            debug = payload[8:].decode(errors="replace")[:80]
            goaway = f" GOAWAY {H2_ERRORS.get(code, code)} {debug!r}"
        if kind == RST_STREAM and len(payload) >= 4:
            code_name = H2_ERRORS.get(int.from_bytes(payload[:4], "big"), "?")
            rst_codes[code_name] = rst_codes.get(code_name, 0) + 1
    listed = ", ".join(f"{n} {c}" for n, c in counts.items()) or "no frames"
    rst = f" RST codes {rst_codes}" if rst_codes else ""
    return f"{listed}{goaway}{rst}"


def describe_bytes(data: bytes) -> str:
    if not data:
        return "nothing"
    if data.startswith(b"HTTP/"):
        return repr(data.split(b"\r\n", 1)[0].decode(errors="replace"))
    if len(data) >= 9 and data[3] in FRAME_NAMES:
        return f"{len(data)} B of HTTP/2: {describe_h2(data)}"
    return f"{len(data)} B: {data[:24]!r}"


# --- the server under test ---


@dataclass
class Server:
    target: Target
    host: str
    port: int
    tls: bool
    workdir: Path
    data_dir: Path
    abuser_token: str
    abuser_body: bytes

    def tls_context(self, alpn: str = "h2") -> ssl.SSLContext:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols([alpn])
        return context

    async def open(
        self, alpn: str = "h2", *, raw: bool = False
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection, through TLS (offering ``alpn``) if meshca serves TLS, unless ``raw``."""
        tls = self.tls and not raw
        return await asyncio.open_connection(
            self.host,
            self.port,
            ssl=self.tls_context(alpn) if tls else None,
            server_hostname="localhost" if tls else None,
            ssl_handshake_timeout=30 if tls else None,
        )

    def request_headers(self, token: str) -> list[tuple[str, str]]:
        return [
            (":method", "POST"),
            (":scheme", "https" if self.tls else "http"),
            (":path", METHOD),
            (":authority", f"{self.host}:{self.port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("authorization", f"Bearer {token}"),
        ]


def abuser_request(server_workdir: Path) -> tuple[str, bytes]:
    """A token and a framed request for another service account of the same namespace."""
    issuer = DevTokenIssuer(server_workdir / "meshca-dev-issuer")
    token = issuer.mint(NAMESPACE, ABUSER_ACCOUNT, AUDIENCE, now=datetime.now(UTC))
    spiffe_id = f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{ABUSER_ACCOUNT}"
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    pem = csr.public_bytes(serialization.Encoding.PEM).decode()
    request = istio_pb2.IstioCertificateRequest(csr=pem, validity_duration=TTL_SECONDS)
    return token, grpc_frame(request.SerializeToString())


class IssuedRows:
    """Issued rows per SPIFFE ID in the SQLite issuance record (read only)."""

    def __init__(self, database: Path) -> None:
        self._engine = create_engine(
            f"sqlite:///file:{database}?mode=ro&uri=true", poolclass=NullPool
        )

    def count(self, spiffe_id: str) -> int:
        query = (
            select(func.count())
            .select_from(IssuanceRecordRow)
            .where(IssuanceRecordRow.outcome == Outcome.ISSUED.value)
            .where(IssuanceRecordRow.spiffe_id == spiffe_id)
        )
        with self._engine.connect() as connection:
            return int(connection.execute(query).scalar_one())

    def close(self) -> None:
        self._engine.dispose()


# --- the well-behaved load and the memory watch, both in background threads ---


@dataclass
class Chunk:
    started: float
    ended: float
    latencies: list[tuple[float, float]]  # (start, ms) of each 2xx request
    errors: int


class Load:
    """h2load chunks back to back until stopped; every request timed, every answer counted."""

    def __init__(self, h2load: str, target: Target, rows: IssuedRows, workdir: Path) -> None:
        self._argv = [
            h2load,
            *("-n", str(CHUNK), "-c", str(LOAD_CLIENTS), "-m", "1", "-t", "1"),
            *("-d", str(target.body)),
            *(arg for header in target.headers for arg in ("-H", header)),
        ]
        self._url = target.url
        self._rows = rows
        self._log = workdir / "load.log"
        self.chunks: list[Chunk] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            issued = self._rows.count(SPIFFE_ID)
            started = time.time()
            self._log.unlink(missing_ok=True)
            done = subprocess.run(
                [*self._argv, f"--log-file={self._log}", self._url],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            ended = time.time()
            counts = _REQUESTS.search(done.stdout)
            status = _STATUS_2XX.search(done.stdout)
            ok = int(status.group(1)) if status else 0
            latencies = []
            if self._log.exists():
                for line in self._log.read_text().splitlines():
                    parts = line.split("\t")
                    if len(parts) >= 3 and parts[1].startswith("2"):
                        latencies.append((int(parts[0]) / 1e6, int(parts[2]) / 1000))
            # Not answered with 2xx, plus 2xx answers without a certificate (gRPC errors).
            without_certificate = ok - (self._rows.count(SPIFFE_ID) - issued)
            failed = CHUNK - ok if counts else CHUNK
            self.chunks.append(Chunk(started, ended, latencies, failed + without_certificate))

    def window(self, start: float, end: float) -> dict[str, Any]:
        latencies = sorted(
            ms for chunk in self.chunks for t, ms in chunk.latencies if start <= t < end
        )
        errors = sum(c.errors for c in self.chunks if start <= c.started < end)
        if not latencies:
            return {"requests": 0, "errors": errors, "p50_ms": None, "p99_ms": None}
        return {
            "requests": len(latencies),
            "errors": errors,
            "p50_ms": round(percentile(latencies, 50), 2),
            "p99_ms": round(percentile(latencies, 99), 2),
        }


class Memory:
    """Resident memory of all of meshca's processes (KiB), sampled every 0.25 s."""

    def __init__(self, pgid: int) -> None:
        self._pgid = pgid
        self.samples: list[tuple[float, int, int]] = []  # time, total KiB, processes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def __enter__(self) -> Memory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            found = rss_kib(self._pgid)
            self.samples.append((time.time(), sum(found.values()), len(found)))

    def between(self, start: float, end: float) -> list[int]:
        return [kib for t, kib, _ in self.samples if start <= t < end]

    def processes(self) -> int:
        return self.samples[-1][2] if self.samples else 0


# --- the abuses ---


@dataclass
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    opened: float
    received: bytearray = field(default_factory=bytearray)
    closed_after: float | None = None

    async def drain_until_closed(
        self, deadline: float, until: asyncio.Future[float] | None = None
    ) -> None:
        """Read (keeping up to 64 KiB) until the server closes or ``deadline`` (monotonic);
        with ``until``, the deadline is the time that future gives, once it has one."""
        if until is not None:
            watching = asyncio.ensure_future(self.drain_until_closed(float("inf")))
            await asyncio.wait([watching, until], return_when=asyncio.FIRST_COMPLETED)
            if not watching.done():
                remaining = max(0.0, until.result() - time.monotonic())
                await asyncio.wait([watching], timeout=remaining)
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
            return
        with contextlib.suppress(TimeoutError, OSError, ssl.SSLError, asyncio.IncompleteReadError):
            async with asyncio.timeout_at(deadline):
                while True:
                    data = await self.reader.read(65536)
                    if not data:
                        break
                    if len(self.received) < 65536:
                        self.received += data[: 65536 - len(self.received)]
                self.closed_after = time.monotonic() - self.opened
                return
        if self.reader.at_eof() and self.closed_after is None:
            self.closed_after = time.monotonic() - self.opened

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


def _closes(connections: list[Connection], hold: float) -> dict[str, Any]:
    times = sorted(c.closed_after for c in connections if c.closed_after is not None)
    return {
        "closed_by_server": len(times),
        "still_open_after_hold": len(connections) - len(times),
        "hold_s": hold,
        "close_after_s": (
            {
                "first": round(times[0], 2),
                "median": round(statistics.median(times), 2),
                "last": round(times[-1], 2),
            }
            if times
            else None
        ),
    }


def _replies(connections: list[Connection]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for c in connections:
        kind = describe_bytes(bytes(c.received))
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:4])


async def _open_many(
    server: Server,
    count: int,
    setup: Callable[[Connection], Awaitable[None]],
    raw: bool,
    hold: float,
) -> tuple[list[Connection], dict[str, int], float]:
    """Open ``count`` connections, 100 at a time; each is watched (read until the server
    closes it) from the moment it is set up until ``hold`` after the last one opened.
    Returns them, the failures to open by kind, and the seconds opening took."""
    connections: list[Connection] = []
    failures: dict[str, int] = {}
    gate = asyncio.Semaphore(100)
    watching: list[asyncio.Task[None]] = []
    all_open = asyncio.get_running_loop().create_future()

    async def watch(connection: Connection) -> None:
        await connection.drain_until_closed(float("inf"), until=all_open)

    async def one() -> None:
        async with gate:
            try:
                reader, writer = await server.open(raw=raw)
                connection = Connection(reader, writer, time.monotonic())
                await setup(connection)
            except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError) as exc:
                name = type(exc).__name__
                failures[name] = failures.get(name, 0) + 1
                return
            connections.append(connection)
            watching.append(asyncio.create_task(watch(connection)))

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(count)))
    opened_in = time.monotonic() - started
    all_open.set_result(time.monotonic() + hold)
    await asyncio.gather(*watching)
    return connections, failures, opened_in


async def idle(server: Server, count: int, hold: float, *, handshake: bool) -> dict[str, Any]:
    """``count`` TCP connections that send nothing; or, with ``handshake``, that complete
    TLS (if served) and the HTTP/2 handshake (preface, SETTINGS both ways, acknowledged)
    and then go quiet."""

    async def setup(connection: Connection) -> None:
        if not handshake:
            return
        connection.writer.write(PREFACE + frame(SETTINGS, 0, 0))
        async with asyncio.timeout(30):
            while True:
                header = await connection.reader.readexactly(9)
                payload = await connection.reader.readexactly(int.from_bytes(header[:3], "big"))
                if header[3] == SETTINGS and not header[4] & ACK:
                    break
                del payload
        connection.writer.write(frame(SETTINGS, ACK, 0))
        await connection.writer.drain()

    # Without the handshake, not even TLS's: a bare TCP connection.
    connections, failures, opened_in = await _open_many(
        server, count, setup, raw=not handshake, hold=hold
    )
    result = {
        "connections": count,
        "opened": len(connections),
        "failed_to_open": sum(failures.values()),
        "open_failures": failures,
        "open_seconds": round(opened_in, 2),
        **_closes(connections, hold),
        "abuser_got": _replies(connections),
    }
    for c in connections:
        c.close()
    return result


def _tcp_state(writer: asyncio.StreamWriter) -> int:
    sock = writer.get_extra_info("socket")
    try:
        return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0])
    except (OSError, AttributeError):  # asyncio closed it already: the server reset it
        return 0


_TCP_ESTABLISHED = 1


async def never_read(server: Server, connections: int, streams: int, hold: float) -> dict[str, Any]:
    """Connections whose every stream window is 0 and that never read after SETTINGS.

    Each sends ``streams`` valid CreateCertificate requests (a token for the abuser's
    service account). The server can answer none of them (no DATA fits a 0 window) and its
    pings go unanswered. Watched without reading, through the socket's TCP state, until
    the server closes the connection or ``hold`` ends; then whatever was sent is read.
    """
    window_zero = struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, 0)
    block = hpack_literal(server.request_headers(server.abuser_token))
    opened: list[Connection] = []
    sent_streams = 0
    send_errors: list[str] = []
    for _ in range(connections):
        reader, writer = await server.open()
        connection = Connection(reader, writer, time.monotonic())
        writer.write(PREFACE + frame(SETTINGS, 0, 0, window_zero))
        async with asyncio.timeout(30):
            while True:
                header = await reader.readexactly(9)
                await reader.readexactly(int.from_bytes(header[:3], "big"))
                if header[3] == SETTINGS and not header[4] & ACK:
                    break
        writer.write(frame(SETTINGS, ACK, 0))
        opened.append(connection)
        try:
            for index in range(streams):
                if writer.is_closing():
                    raise ConnectionResetError("closed by the server")
                stream = 1 + 2 * index
                writer.write(frame(HEADERS, END_HEADERS, stream, block))
                writer.write(frame(DATA, END_STREAM, stream, server.abuser_body))
                sent_streams += 1
                if index % 50 == 49:
                    # The server widens its receive window as it reads; let it keep up.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(5):
                            await writer.drain()
                    await asyncio.sleep(0.01)
        except OSError as exc:
            send_errors.append(f"{type(exc).__name__} after {sent_streams} streams")
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline:
        for c in opened:
            if c.closed_after is None and _tcp_state(c.writer) != _TCP_ESTABLISHED:
                c.closed_after = time.monotonic() - c.opened
        if all(c.closed_after is not None for c in opened):
            break
        await asyncio.sleep(0.25)
    # Now read what the server sent, for the report.
    for c in opened:
        with contextlib.suppress(TimeoutError, OSError, ssl.SSLError):
            async with asyncio.timeout(2):
                while data := await c.reader.read(1 << 20):
                    c.received += data
    result = {
        "connections": connections,
        "streams_sent": sent_streams,
        "send_errors": send_errors,
        **_closes(opened, hold),
        "abuser_got": [describe_h2(bytes(c.received)) for c in opened],
    }
    for c in opened:
        c.close()
    return result


def _garbage_sync(server: Server, size: int, after_preface: bool) -> dict[str, Any]:
    """``size`` random bytes down one blocking socket; how many went in, what came back."""
    sock = socket.create_connection((server.host, server.port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    started = time.monotonic()
    sent, ended_by = 0, "all sent"
    try:
        if after_preface:
            sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        garbage = os.urandom(size)
        view = memoryview(garbage)
        while sent < size:
            sent += sock.send(view[sent : sent + 65536])
    except TimeoutError:
        ended_by = "send timed out (server stopped reading)"
    except OSError as exc:
        ended_by = f"{type(exc).__name__} after {sent / 2**20:.2f} MiB"
    received = bytearray()
    closed_after = None
    try:
        sock.settimeout(15)
        while data := sock.recv(65536):
            received += data[: 65536 - len(received)]
        closed_after = time.monotonic() - started
    except TimeoutError:
        pass
    except OSError:
        closed_after = time.monotonic() - started
    finally:
        sock.close()
    return {
        "bytes": size,
        "sent": sent,
        "ended_by": ended_by,
        "closed_after_s": None if closed_after is None else round(closed_after, 3),
        "abuser_got": describe_bytes(bytes(received)),
    }


async def garbage(
    server: Server, mib: int, after_preface: bool, seconds: float, senders: int = 2
) -> dict[str, Any]:
    """``senders`` connections at a time, each with ``mib`` MiB, new ones for ``seconds``."""
    deadline = time.monotonic() + seconds
    results: list[dict[str, Any]] = []

    async def sender() -> None:
        while time.monotonic() < deadline:
            results.append(
                await asyncio.to_thread(_garbage_sync, server, mib * 2**20, after_preface)
            )

    await asyncio.gather(*(sender() for _ in range(senders)))
    closes = [r["closed_after_s"] for r in results if r["closed_after_s"] is not None]
    endings: dict[str, int] = {}
    for r in results:
        kind = r["ended_by"].split(" after ")[0]
        endings[kind] = endings.get(kind, 0) + 1
    return {
        "connections": len(results),
        "bytes_each": mib * 2**20,
        "median_mib_accepted": round(statistics.median(r["sent"] for r in results) / 2**20, 2),
        "ended_by": endings,
        "closed_by_server": len(closes),
        "median_closed_after_s": round(statistics.median(closes), 3) if closes else None,
        "abuser_got": results[0]["abuser_got"],
    }


async def http1(server: Server, seconds: float, parallel: int = 20) -> dict[str, Any]:
    """HTTP/1.1 requests on the gRPC port for ``seconds``, ``parallel`` at a time, each on a
    new connection (with TLS: ALPN offers only http/1.1)."""
    body = server.abuser_body
    requests = [
        (
            f"POST {METHOD} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
            f"Content-Type: application/grpc\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body,
        f"GET / HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n\r\n".encode(),
    ]
    results: list[Connection] = []
    failures: dict[str, int] = {}
    deadline = time.monotonic() + seconds

    async def client(first: int) -> None:
        index = first
        while time.monotonic() < deadline:
            await one(index)
            index += 1

    async def one(index: int) -> None:
        if True:
            try:
                reader, writer = await server.open(alpn="http/1.1")
            except (OSError, ssl.SSLError) as exc:
                name = f"connect/handshake failed: {type(exc).__name__}: {str(exc)[:60]}"
                failures[name] = failures.get(name, 0) + 1
                return
            connection = Connection(reader, writer, time.monotonic())
            with contextlib.suppress(OSError):
                writer.write(requests[index % 2])
                await writer.drain()
            await connection.drain_until_closed(time.monotonic() + 15)
            connection.close()
            results.append(connection)

    await asyncio.gather(*(client(i) for i in range(parallel)))
    return {
        "requests": len(results) + sum(failures.values()),
        **_closes(results, 15),
        "abuser_got": _replies(results),
        "failed": failures,
    }


# --- one run ---


def _median(values: list[int]) -> int | None:
    return int(statistics.median(values)) if values else None


async def _apply(
    name: str,
    abuse: Callable[[], Awaitable[dict[str, Any]]],
    load: Load,
    memory: Memory,
) -> dict[str, Any]:
    before_start = time.time()
    await asyncio.sleep(BASELINE_SECONDS)
    start = time.time()
    print(f"  {name} ...", flush=True)
    observed = await abuse()
    end = time.time()
    # Once the abuser's sockets are gone: memory that stays is memory kept.
    await asyncio.sleep(SETTLE_SECONDS)
    settled = time.time()
    before, during = load.window(before_start, start), load.window(start, end)
    row = {
        "abuse": name,
        "seconds": round(end - start, 1),
        "observed": observed,
        "rss_mib": {
            "before": _mib(_median(memory.between(before_start, start))),
            "peak": _mib(max(memory.between(start, end), default=None)),
            "after": _mib(_median(memory.between(end + SETTLE_SECONDS - 1, settled))),
        },
        "load_before": before,
        "load_during": during,
        "server_processes": memory.processes(),
    }
    print(f"    {json.dumps(row)}", flush=True)
    return row


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


async def _abuses(
    server: Server, args: argparse.Namespace, load: Load, memory: Memory
) -> list[dict[str, Any]]:
    plan: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
        ("idle-tcp", lambda: idle(server, args.idle, args.hold, handshake=False)),
        ("idle-h2", lambda: idle(server, args.idle, args.hold, handshake=True)),
        ("never-read", lambda: never_read(server, 2, args.never_read_streams, args.slow_hold)),
        ("garbage", lambda: garbage(server, args.garbage_mib, False, args.flood_seconds)),
    ]
    if not server.tls:
        plan.append(
            (
                "garbage-after-preface",
                lambda: garbage(server, args.garbage_mib, True, args.flood_seconds),
            )
        )
    plan.append(("http1", lambda: http1(server, args.flood_seconds)))
    return [await _apply(name, abuse, load, memory) for name, abuse in plan]


def one_run(index: int, h2load: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="meshca-floods-") as tmp:
        workdir = Path(tmp)
        with meshca_ca(workdir, make_csr(), tls=args.tls, flags=tuple(args.serve_arg)) as target:
            host, port = target.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
            token, body = abuser_request(workdir)
            server = Server(
                target, host, int(port), args.tls, workdir, workdir / "meshca-data", token, body
            )
            rows = IssuedRows(server.data_dir / "meshca.db")
            abuser_id = f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{ABUSER_ACCOUNT}"
            try:
                print(f"run {index}: meshca at {host}:{port} ({'TLS' if args.tls else 'h2c'})")
                started_with = len(rss_kib(target.pgid))
                with Memory(target.pgid) as memory, Load(h2load, target, rows, workdir) as load:
                    abuses = asyncio.run(_abuses(server, args, load, memory))
                alive = len(rss_kib(target.pgid))
                return {
                    "run": index,
                    "tls": args.tls,
                    "serve_args": args.serve_arg,
                    "abuses": abuses,
                    "abuser_certificates_recorded": rows.count(abuser_id),
                    "server_processes": [started_with, alive],
                }
            finally:
                rows.close()


# --- report ---


def _med(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 1) if present else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _abuser_summary(rows: list[dict[str, Any]]) -> str:
    first = rows[0]["observed"]
    name = rows[0]["abuse"]
    if name.startswith("idle") or name == "http1":
        closes = [r["observed"]["closed_by_server"] for r in rows]
        total = first.get("opened", first.get("requests"))
        median_close = _med([(r["observed"]["close_after_s"] or {}).get("median") for r in rows])
        got = ", ".join(f"{k} x{v}" for k, v in first["abuser_got"].items())
        return (
            f"{int(statistics.median(closes))}/{total} closed by server within "
            f"{first['hold_s']:g}s (median {_fmt(median_close)}s); got: {got}"
        )
    if name == "never-read":
        closes = [r["observed"]["closed_by_server"] for r in rows]
        median_close = _med([(r["observed"]["close_after_s"] or {}).get("median") for r in rows])
        return (
            f"{int(statistics.median(closes))}/{first['connections']} connections closed "
            f"within {first['hold_s']:g}s (median {_fmt(median_close)}s); "
            f"{first['streams_sent']} streams; got: {first['abuser_got'][0]}"
        )
    accepted = _med([r["observed"]["median_mib_accepted"] for r in rows])
    closed = _med([r["observed"]["median_closed_after_s"] for r in rows])
    count = _med([r["observed"]["connections"] for r in rows])
    return (
        f"{_fmt(count)} connections of {first['bytes_each'] // 2**20} MiB: server read "
        f"{_fmt(accepted)} MiB, closed after {_fmt(closed)} s ({first['ended_by']}); "
        f"got: {first['abuser_got']}"
    )


def markdown(runs: list[dict[str, Any]]) -> str:
    names = [a["abuse"] for a in runs[0]["abuses"]]
    lines = [
        f"Medians over {len(runs)} run(s); {'TLS' if runs[0]['tls'] else 'plaintext (h2c)'}; "
        f"serve args {runs[0]['serve_args'] or '(defaults)'}.",
        "",
        "| abuse | what the abuser got | meshca RSS MiB before / peak / after | "
        "load p50 ms before / during | load p99 ms before / during | load errors during |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        rows = [a for run in runs for a in run["abuses"] if a["abuse"] == name]
        rss = " / ".join(
            _fmt(_med([r["rss_mib"][k] for r in rows])) for k in ("before", "peak", "after")
        )
        p50 = " / ".join(
            _fmt(_med([r[w]["p50_ms"] for r in rows])) for w in ("load_before", "load_during")
        )
        p99 = " / ".join(
            _fmt(_med([r[w]["p99_ms"] for r in rows])) for w in ("load_before", "load_during")
        )
        errors = sum(r["load_during"]["errors"] for r in rows)
        lines.append(
            f"| {name} | {_abuser_summary(rows)} | {rss} | {p50} | {p99} | {errors} (all runs) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tls", action="store_true", help="meshca's own TLS, not --plaintext")
    parser.add_argument("--idle", type=int, default=5000, help="idle connections per idle abuse")
    parser.add_argument("--hold", type=float, default=25.0, help="seconds to watch each abuse")
    parser.add_argument("--slow-hold", type=float, default=100.0, help="... the never-reader")
    parser.add_argument("--never-read-streams", type=int, default=1000)
    parser.add_argument("--garbage-mib", type=int, default=10)
    parser.add_argument(
        "--flood-seconds", type=float, default=8.0, help="garbage and HTTP/1.1 go on this long"
    )
    parser.add_argument(
        "--serve-arg", action="append", default=[], help="passed to meshca serve (repeatable)"
    )
    args = parser.parse_args(argv)
    # 5,000 client sockets here, plus h2load's.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.idle + 1024
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            parser.error(f"--idle {args.idle} needs {wanted} file descriptors; the limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    h2load = ensure_h2load()
    runs = [one_run(i + 1, h2load, args) for i in range(args.runs)]
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"floods-{stamp}.json"
    out.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    print()
    print(markdown(runs))
    print(
        f"\nabuser's certificates recorded (never delivered): "
        f"{[r['abuser_certificates_recorded'] for r in runs]}; results: {out}"
    )
    # Every process meshca started with is still there: no abuse killed a worker.
    return 0 if all(r["server_processes"][0] == r["server_processes"][1] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
