"""The cold-start storm's proxies, made before the timed window, and their answers, read after.

Every proxy is distinct: its own namespace and service account (so its own SPIFFE ID), its
own pod, its own service-account token signed by the dev cluster key, its own EC P-256 key
and CSR, and its own framed ``IstioCertificateRequest``.

Two binary files connect this module with the load generator (``storm_client.c``); all
integers are little-endian:

- requests: ``STORMRQ1``, u32 count, then per proxy: u32 length + the ``authorization``
  header value (``Bearer <token>``), u32 length + the gRPC-framed request body.
- results (one file per generator process): ``STORMRS1``, u32 count, then per proxy:
  u32 index, i32 grpc-status (-1 if none came), i32 HTTP status (0 if none came),
  u32 error (``ERRORS``), u64 start, connected, TLS done and end (CLOCK_MONOTONIC ns,
  0 when not reached), u32 length + the response's DATA bytes, u16 length + error text.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import resource
import struct
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.k8s.dev_issuer import DevTokenIssuer

from workload import TRUST_DOMAIN, TTL_SECONDS, grpc_frame

__all__ = [
    "ACCOUNTS_PER_NAMESPACE",
    "ERRORS",
    "Answer",
    "Proxies",
    "ProxyOutcome",
    "grpc_messages",
    "identity",
    "make_proxies",
    "read_requests",
    "read_results",
    "run_client",
    "spiffe_id",
    "spread",
    "write_results",
]

ACCOUNTS_PER_NAMESPACE = 100
REQUESTS_MAGIC = b"STORMRQ1"
RESULTS_MAGIC = b"STORMRS1"
# The generator's error codes; 0 means the call completed at the HTTP/2 level (its
# grpc-status still has to be 0).
ERRORS = {
    0: "none",
    1: "connect",
    2: "tls",
    3: "alpn",
    4: "http2",
    5: "stream-reset",
    6: "timeout",
    7: "closed-early",
}
_RECORD = struct.Struct("<IiiIQQQQ")


def identity(index: int) -> tuple[str, str, str]:
    """Proxy ``index``'s namespace, service account and pod name."""
    namespace, account = divmod(index, ACCOUNTS_PER_NAMESPACE)
    return f"storm-{namespace:03d}", f"proxy-sa-{account:02d}", f"proxy-{index:05d}"


def spiffe_id(index: int) -> str:
    namespace, account, _ = identity(index)
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{account}"


@dataclass(frozen=True)
class Proxies:
    """What the storm sends (``requests_path``) and what each proxy must get back."""

    count: int
    requests_path: Path
    spiffe_ids: tuple[str, ...]
    key_sha256: tuple[bytes, ...]  # SHA-256 of each proxy's SubjectPublicKeyInfo DER
    namespaces: int


def make_proxies(count: int, workdir: Path, issuer_dir: Path, audience: str, jobs: int) -> Proxies:
    """Mint ``count`` tokens, keys and CSRs with ``jobs`` processes; write the requests file.

    The issuer's key is created here, before the pool starts, so every process signs with
    the one key that the server's JWKS file holds.
    """
    issuer = DevTokenIssuer(issuer_dir)
    issuer.ensure()
    now = datetime.now(UTC)
    chunks = [range(start, min(start + 250, count)) for start in range(0, count, 250)]
    path = workdir / "storm-requests.bin"
    ids: list[str] = []
    keys: list[bytes] = []
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool, path.open("wb") as out:
        out.write(REQUESTS_MAGIC + struct.pack("<I", count))
        futures = [
            pool.submit(_make_chunk, chunk, str(issuer_dir), issuer.issuer, audience, now)
            for chunk in chunks
        ]
        for future in futures:
            for authorization, body, spiffe, key_hash in future.result():
                out.write(struct.pack("<I", len(authorization)) + authorization)
                out.write(struct.pack("<I", len(body)) + body)
                ids.append(spiffe)
                keys.append(key_hash)
    return Proxies(
        count=count,
        requests_path=path,
        spiffe_ids=tuple(ids),
        key_sha256=tuple(keys),
        namespaces=math.ceil(count / ACCOUNTS_PER_NAMESPACE),
    )


def _make_chunk(
    indices: range, issuer_dir: str, issuer_name: str, audience: str, now: datetime
) -> list[tuple[bytes, bytes, str, bytes]]:
    issuer = DevTokenIssuer(Path(issuer_dir), issuer_name)
    made = []
    for index in indices:
        namespace, account, pod = identity(index)
        token = issuer.mint(namespace, account, audience, pod_name=pod, now=now)
        key = ec.generate_private_key(ec.SECP256R1())
        spiffe = spiffe_id(index)
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        request = istio_pb2.IstioCertificateRequest(
            csr=csr.public_bytes(serialization.Encoding.PEM).decode(),
            validity_duration=TTL_SECONDS,
        )
        made.append(
            (
                f"Bearer {token}".encode(),
                grpc_frame(request.SerializeToString()),
                spiffe,
                _spki_sha256(key.public_key()),
            )
        )
    return made


def _spki_sha256(key: ec.EllipticCurvePublicKey) -> bytes:
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


@dataclass(frozen=True)
class Answer:
    """One proxy's outcome as the generator saw it. Times are CLOCK_MONOTONIC ns."""

    index: int
    grpc_status: int
    http_status: int
    error: int
    start_ns: int
    connected_ns: int
    tls_ns: int
    end_ns: int
    body: bytes
    error_text: str

    @property
    def completed(self) -> bool:
        return self.error == 0 and self.grpc_status == 0 and self.end_ns > 0

    @property
    def latency_ms(self) -> float:
        """Connect attempt to the response's last frame (trailers): connect + TLS + call."""
        return (self.end_ns - self.start_ns) / 1e6


def read_results(path: Path) -> Iterator[Answer]:
    data = path.read_bytes()
    if data[:8] != RESULTS_MAGIC:
        raise ValueError(f"{path} is not a storm results file")
    (count,) = struct.unpack_from("<I", data, 8)
    offset = 12
    for _ in range(count):
        index, status, http, error, start, connected, tls, end = _RECORD.unpack_from(data, offset)
        offset += _RECORD.size
        (size,) = struct.unpack_from("<I", data, offset)
        body = data[offset + 4 : offset + 4 + size]
        offset += 4 + size
        (text_size,) = struct.unpack_from("<H", data, offset)
        text = data[offset + 2 : offset + 2 + text_size].decode(errors="replace")
        offset += 2 + text_size
        yield Answer(index, status, http, error, start, connected, tls, end, body, text)


def grpc_messages(body: bytes) -> list[bytes]:
    """Split DATA bytes into gRPC messages; raises ValueError on a bad or compressed frame."""
    messages = []
    offset = 0
    while offset < len(body):
        if len(body) - offset < 5:
            raise ValueError("truncated gRPC frame header")
        flag = body[offset]
        size = int.from_bytes(body[offset + 1 : offset + 5], "big")
        if flag != 0:
            raise ValueError(f"gRPC frame flag {flag} (compressed) is not expected")
        if len(body) - offset - 5 < size:
            raise ValueError("truncated gRPC message")
        messages.append(body[offset + 5 : offset + 5 + size])
        offset += 5 + size
    return messages


def spread(count: int, parts: int) -> Sequence[range]:
    """``range(count)`` cut into ``parts`` contiguous slices of nearly equal size."""
    parts = max(1, min(parts, count))
    base, extra = divmod(count, parts)
    slices = []
    start = 0
    for part in range(parts):
        size = base + (1 if part < extra else 0)
        slices.append(range(start, start + size))
        start += size
    return slices


# --- the Python load generator (storm_client_grpcio.py) ---------------------------------


@dataclass
class ProxyOutcome:
    """What one proxy saw, filled in by a Python load generator as the call goes."""

    index: int
    grpc_status: int = -1
    http_status: int = 0
    error: int = 0
    start_ns: int = 0
    connected_ns: int = 0
    tls_ns: int = 0
    end_ns: int = 0
    body: bytes = b""
    error_text: str = ""


def read_requests(path: Path) -> list[tuple[bytes, bytes]]:
    """The requests file: per proxy, its ``authorization`` value and its framed body."""
    data = path.read_bytes()
    if data[:8] != REQUESTS_MAGIC:
        raise ValueError(f"{path} is not a storm requests file")
    (count,) = struct.unpack_from("<I", data, 8)
    offset = 12
    requests = []
    for _ in range(count):
        (size,) = struct.unpack_from("<I", data, offset)
        authorization = data[offset + 4 : offset + 4 + size]
        offset += 4 + size
        (size,) = struct.unpack_from("<I", data, offset)
        body = data[offset + 4 : offset + 4 + size]
        offset += 4 + size
        requests.append((authorization, body))
    return requests


def write_results(path: Path, outcomes: Sequence[ProxyOutcome]) -> None:
    with path.open("wb") as out:
        out.write(RESULTS_MAGIC + struct.pack("<I", len(outcomes)))
        for o in outcomes:
            text = o.error_text.encode()[:1000]
            out.write(
                _RECORD.pack(
                    o.index,
                    o.grpc_status,
                    o.http_status,
                    o.error,
                    o.start_ns,
                    o.connected_ns,
                    o.tls_ns,
                    o.end_ns,
                )
            )
            out.write(struct.pack("<I", len(o.body)) + o.body)
            out.write(struct.pack("<H", len(text)) + text)


def client_arguments() -> argparse.Namespace:
    """The flags every load generator takes (see storm_client.c)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=Path, required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--server-name", default="localhost")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-inflight", type=int, default=1_000_000)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--verify", choices=("cached", "full"), default="full")
    return parser.parse_args()


def run_client(
    storm: Callable[
        [argparse.Namespace, list[tuple[bytes, bytes]], list[ProxyOutcome]], Awaitable[None]
    ],
) -> None:
    """Load, say ``ready``, wait for the start line, run ``storm``, write, say ``done``.

    ``storm`` fills in one ``ProxyOutcome`` per proxy of the slice. CPU is counted from the
    start line (imports and loading excluded), for all threads of the process.
    """
    args = client_arguments()
    requests = read_requests(args.requests)[args.first : args.first + args.count]
    outcomes = [ProxyOutcome(index=args.first + i) for i in range(len(requests))]
    try:
        import uvloop

        runner: Callable[[Awaitable[None]], None] = uvloop.run
    except ImportError:
        runner = asyncio.run
    print("ready", flush=True)
    sys.stdin.readline()
    before = resource.getrusage(resource.RUSAGE_SELF)

    async def bounded() -> None:
        try:
            await asyncio.wait_for(storm(args, requests, outcomes), args.timeout)
        except TimeoutError:
            for outcome in outcomes:
                if not outcome.end_ns:
                    outcome.error = 6
                    outcome.error_text = "no complete response before the storm's deadline"

    runner(bounded())
    after = resource.getrusage(resource.RUSAGE_SELF)
    write_results(args.out, outcomes)
    user = after.ru_utime - before.ru_utime
    system = after.ru_stime - before.ru_stime
    print(f"done {user:.6f} {system:.6f} {after.ru_maxrss} 0", flush=True)
