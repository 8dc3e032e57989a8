"""Cold-start storm (issue 8, target 5): 10,000 distinct proxies ask a fresh meshca at once.

    .venv/bin/python bench/storm.py [--proxies 10000] [--runs 3]

Everything a proxy sends is made before the timed window: its own service-account token
(signed by the dev cluster key), its own EC P-256 key and CSR, its own framed
``IstioCertificateRequest`` (``storm_workload.py``). meshca is started over TLS (its
default) in jwks mode with two workers. Then the load-generator processes fire: every proxy
opens its own TCP connection, does its own TLS handshake (ALPN h2) and sends one
``CreateCertificate`` with its own ``authorization`` header, and reads the whole response,
trailers included. The time to the last certificate runs from the first connection attempt
to the last successful response. After the window every answer is parsed and checked, and
meshca's issuance record must have grown by exactly one row per proxy. See bench/STORM.md.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The bench's own modules sit next to this file; meshca is imported from the repo root
# even when it is not installed into the venv.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, func, select
from sqlalchemy.pool import NullPool

from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc.client import channel_to, create_certificate
from meshca.adapters.k8s.dev_issuer import DevTokenIssuer
from meshca.adapters.storage.tables import IssuanceRecordRow
from meshca.core.audit import Outcome
from storm_workload import (
    ERRORS,
    Answer,
    Proxies,
    grpc_messages,
    make_proxies,
    read_results,
    spread,
)

from loadgen import percentile
from meshca_ca import WORKERS, serve_argv, trust_bundle
from procs import LOCALHOST, free_port, group_cpu_seconds, machine_cpu, managed_group
from workload import NAMESPACE, SERVICE_ACCOUNT, SPIFFE_ID, make_csr

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
METHOD = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
AUDIENCE = "meshca"
SERVER_NAME = "localhost"  # meshca's default --server-name; its certificate also has 127.0.0.1
START_TIMEOUT = 60.0
TARGET_SECONDS = 5.0

# --- the load generator ----------------------------------------------------------------

CLIENT_SOURCE = BENCH / "storm_client.c"
# Debian's packages for each TLS library the C client can be built against: headers,
# library directory, and the package that holds them.
TLS_LIBRARIES = {
    "boringssl": (
        "/usr/include/android",
        "/usr/lib/x86_64-linux-gnu/android",
        "android-libboringssl-dev",
    ),
    "openssl": ("/usr/include", None, "libssl-dev"),
}
CLIENTS = ("c", "grpcio")


def _apt_install(packages: Sequence[str]) -> None:
    print(f"installing {' '.join(packages)} with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env)


def build_client(tls_library: str) -> Path:
    """The C load generator, compiled on first use into ~/.cache (keyed by its source).

    Installs gcc, nghttp2's and the TLS library's development packages if missing.
    """
    include, libdir, package = TLS_LIBRARIES[tls_library]
    missing = []
    if not shutil.which("gcc"):
        missing.append("gcc")
    if not Path("/usr/include/nghttp2/nghttp2.h").exists():
        missing.append("libnghttp2-dev")
    if not Path(include, "openssl", "ssl.h").exists():
        missing.append(package)
    if missing:
        _apt_install(missing)
    flags = ["-O2", "-Wall", "-Wextra", f"-I{include}"]
    libs = ["-lnghttp2", "-lssl", "-lcrypto"]
    if libdir:
        libs = [f"-L{libdir}", f"-Wl,-rpath,{libdir}", *libs]
    digest = hashlib.sha256(CLIENT_SOURCE.read_bytes() + repr((flags, libs)).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "meshca-bench"
    binary = cache / f"storm_client-{tls_library}-{digest.hexdigest()[:12]}"
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(f".{os.getpid()}.tmp")
        print(f"building {binary.name}", flush=True)
        subprocess.run(["gcc", *flags, "-o", str(partial), str(CLIENT_SOURCE), *libs], check=True)
        os.replace(partial, binary)
    return binary


def client_command(client: str, tls_library: str) -> list[str]:
    """The argv prefix of one generator process; all clients take the same flags."""
    match client:
        case "c":
            return [str(build_client(tls_library))]
        case "grpcio":
            return [sys.executable, str(BENCH / "storm_client_grpcio.py")]
    raise ValueError(f"unknown client {client!r}")


# --- meshca over TLS --------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """A started meshca: where it listens, what it trusts, how to read its record."""

    port: int
    pgid: int
    bundle_path: Path
    database: Path
    backlog: tuple[int, ...]  # each listening socket's accept-queue limit, from ss


@contextlib.contextmanager
def meshca_tls(workdir: Path, issuer: DevTokenIssuer) -> Iterator[Server]:
    """``meshca serve`` over TLS, jwks mode, two workers, in ``workdir``; ready to use.

    Ready means: both workers listen, the trust bundle is out, grpc.health.v1 answers
    SERVING over TLS, and one real CreateCertificate over TLS returned the right leaf.
    All of meshca's processes are stopped when the block exits.
    """
    data_dir = workdir / "meshca-data"
    port = free_port()
    argv, cwd = serve_argv(
        f"{LOCALHOST}:{port}", data_dir, issuer, ["--server-name", SERVER_NAME]
    )
    # Flags only: a MESHCA_* variable in the caller's environment must not change the setup.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")}
    with managed_group(argv, workdir / "meshca.log", env=env, cwd=cwd) as proc:
        alive = lambda: proc.poll() is None  # noqa: E731
        deadline = time.monotonic() + START_TIMEOUT
        _wait(lambda: _listeners(port) >= WORKERS, alive, deadline, "both workers listening")
        roots = trust_bundle(data_dir, env, alive, deadline - time.monotonic())
        bundle_path = workdir / "bundle.pem"
        bundle_path.write_bytes(roots)
        target = f"{LOCALHOST}:{port}"
        _wait(lambda: _serving(target, roots), alive, deadline, "health SERVING over TLS")
        token = issuer.mint(NAMESPACE, SERVICE_ACCOUNT, AUDIENCE, now=datetime.now(UTC))
        with channel_to(target, roots, SERVER_NAME) as channel:
            chain = create_certificate(channel, token, make_csr(), ttl_seconds=3600)
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        if _uri_sans(leaf) != [SPIFFE_ID]:
            raise RuntimeError(f"meshca's first leaf has URI SANs {_uri_sans(leaf)}")
        yield Server(port, proc.pid, bundle_path, data_dir / "meshca.db", _backlogs(port))


def _wait(ready: Callable[[], bool], alive: Callable[[], bool], deadline: float, what: str) -> None:
    while not ready():
        if not alive():
            raise RuntimeError(f"meshca exited before {what} (see meshca.log)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"meshca: no {what} after {START_TIMEOUT:.0f}s")
        time.sleep(0.2)


def _listeners(port: int) -> int:
    """Listening TCP sockets on ``port`` (IPv4 or IPv6), from /proc/net/tcp{,6}."""
    count = 0
    suffix = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[1].endswith(suffix) and fields[3] == "0A":
                    count += 1
    return count


def _backlogs(port: int) -> tuple[int, ...]:
    """The accept-queue limit of each listener on ``port`` (``ss``'s Send-Q column)."""
    if not shutil.which("ss"):
        return ()
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=False
    ).stdout
    return tuple(int(line.split()[2]) for line in out.splitlines() if line.strip())


def _serving(target: str, roots: bytes) -> bool:
    with channel_to(target, roots, SERVER_NAME) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class IssuanceRecord:
    """meshca's ``issuance_record`` (SQLite, opened read only): issued rows after a mark."""

    def __init__(self, database: Path) -> None:
        self._engine = create_engine(
            f"sqlite:///file:{database}?mode=ro&uri=true", poolclass=NullPool
        )

    def mark(self) -> int:
        """The highest row id now (0 if none)."""
        with self._engine.connect() as connection:
            query = select(func.coalesce(func.max(IssuanceRecordRow.id), 0))
            return int(connection.execute(query).scalar_one())

    def issued_since(self, mark: int) -> list[str]:
        """The SPIFFE IDs of the ``issued`` rows added after ``mark``, one per row."""
        query = select(IssuanceRecordRow.spiffe_id).where(
            IssuanceRecordRow.id > mark,
            IssuanceRecordRow.outcome == Outcome.ISSUED.value,
        )
        with self._engine.connect() as connection:
            return [str(row) for row in connection.execute(query).scalars()]

    def close(self) -> None:
        self._engine.dispose()


# --- kernel counters --------------------------------------------------------------------

_KERNEL_COUNTERS = (
    ("TcpExt", "ListenOverflows"),
    ("TcpExt", "ListenDrops"),
    ("TcpExt", "TCPReqQFullDoCookies"),
    ("TcpExt", "TCPReqQFullDrop"),
    ("TcpExt", "SyncookiesSent"),
    ("TcpExt", "TCPSynRetrans"),
    ("TcpExt", "TCPLossProbes"),
    ("TcpExt", "TCPTimeouts"),
    ("Tcp", "RetransSegs"),
    ("Tcp", "AttemptFails"),
    ("Tcp", "EstabResets"),
)


def kernel_counters() -> dict[str, int]:
    """Machine-wide TCP counters (this network namespace) that show queue overflows."""
    values: dict[str, int] = {}
    for table in ("/proc/net/netstat", "/proc/net/snmp"):
        with contextlib.suppress(OSError), open(table) as stream:
            lines = stream.read().splitlines()
        for names, numbers in zip(lines[::2], lines[1::2], strict=False):
            prefix, _, keys = names.partition(":")
            for key, value in zip(keys.split(), numbers.split(":")[1].split(), strict=False):
                values[f"{prefix}.{key}"] = int(value)
    return {f"{prefix}.{key}": values.get(f"{prefix}.{key}", 0) for prefix, key in _KERNEL_COUNTERS}


# --- one storm --------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """How the generator runs: which client, how many processes, how many in flight."""

    client: str
    command: tuple[str, ...]
    procs: int
    max_inflight: int  # over all processes; 0 = no limit
    verify: str
    timeout: float


def fire(load: Load, proxies: Proxies, server: Server, workdir: Path) -> dict[str, Any]:
    """Start the generator processes, release them together, wait; returns raw figures.

    Nothing is parsed or checked between the start signal and the last ``done`` line.
    """
    slices = spread(proxies.count, load.procs)
    per_proc = 0 if load.max_inflight <= 0 else max(1, load.max_inflight // len(slices))
    procs = []
    for number, part in enumerate(slices):
        argv = [
            *load.command,
            "--requests",
            str(proxies.requests_path),
            "--first",
            str(part.start),
            "--count",
            str(len(part)),
            "--port",
            str(server.port),
            "--ca",
            str(server.bundle_path),
            "--server-name",
            SERVER_NAME,
            "--out",
            str(workdir / f"storm-results-{number}.bin"),
            "--timeout",
            str(int(load.timeout)),
            "--verify",
            load.verify,
        ]
        if per_proc:
            argv += ["--max-inflight", str(per_proc)]
        procs.append(
            subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=BENCH
            )
        )
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"load generator did not start: {line!r}")
        kernel_before = kernel_counters()
        meshca_before = group_cpu_seconds(server.pgid)
        machine_before = machine_cpu()
        own_before = time.process_time()
        started = time.monotonic()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        reports = []
        for proc in procs:
            assert proc.stdout is not None
            reports.append(proc.stdout.readline().split())
        window = time.monotonic() - started
        meshca_cpu = group_cpu_seconds(server.pgid) - meshca_before
        machine_after = machine_cpu()
        own_cpu = time.process_time() - own_before
        kernel_after = kernel_counters()
        for proc in procs:
            proc.wait(timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for report, proc in zip(reports, procs, strict=True):
        if len(report) < 3 or report[0] != "done" or proc.returncode != 0:
            raise RuntimeError(f"load generator failed: {report!r}, exit {proc.returncode}")
    generator_cpu = sum(float(r[1]) + float(r[2]) for r in reports)
    return {
        "window_s": window,
        "meshca_cpu_s": meshca_cpu,
        "generator_cpu_s": generator_cpu,
        "generator_full_chain_verifications": sum(int(r[4]) for r in reports if len(r) > 4),
        "driver_cpu_s": own_cpu,
        "machine_busy_cores": machine_after.busy_fraction_since(machine_before)
        * (os.cpu_count() or 1),
        "steal_fraction": machine_after.steal_fraction_since(machine_before),
        "kernel": {k: kernel_after[k] - kernel_before[k] for k in kernel_before},
        "results": [workdir / f"storm-results-{n}.bin" for n in range(len(slices))],
    }


# --- checking and figures ---------------------------------------------------------------


def _uri_sans(cert: x509.Certificate) -> list[str]:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(sans.get_values_for_type(x509.UniformResourceIdentifier))


def _spki_sha256(cert: x509.Certificate) -> bytes:
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def check_answer(
    answer: Answer, proxies: Proxies, roots: set[bytes], issuers_seen: set[bytes]
) -> tuple[str | None, int | None]:
    """Why ``answer`` is not a good certificate for its own proxy (None if it is), and
    the leaf's serial number.

    Good: grpc-status 0 after HTTP 200, one gRPC message, a chain whose leaf carries exactly
    this proxy's SPIFFE ID and public key, each certificate signed by the next, and the
    last one in meshca's trust bundle.
    """
    if answer.error:
        return f"{ERRORS.get(answer.error, answer.error)}: {answer.error_text}", None
    if answer.http_status != 200 or answer.grpc_status != 0:
        return (
            f"HTTP {answer.http_status}, grpc-status {answer.grpc_status}: {answer.error_text}",
            None,
        )
    try:
        messages = grpc_messages(answer.body)
        if len(messages) != 1:
            return f"{len(messages)} gRPC messages in the response", None
        chain_pem = istio_pb2.IstioCertificateResponse.FromString(messages[0]).cert_chain
        chain = [x509.load_pem_x509_certificate(pem.encode()) for pem in chain_pem]
    except ValueError as exc:
        return f"unreadable response: {exc}", None
    if len(chain) < 2:
        return f"a chain of {len(chain)} certificate(s)", None
    leaf = chain[0]
    if _uri_sans(leaf) != [proxies.spiffe_ids[answer.index]]:
        return f"leaf URI SANs {_uri_sans(leaf)}", leaf.serial_number
    if _spki_sha256(leaf) != proxies.key_sha256[answer.index]:
        return "the leaf's public key is not the proxy's", leaf.serial_number
    try:
        for cert, issuer in itertools.pairwise(chain):
            pair = cert.fingerprint(hashes.SHA256()) + issuer.fingerprint(hashes.SHA256())
            if cert is leaf or pair not in issuers_seen:
                cert.verify_directly_issued_by(issuer)
                if cert is not leaf:
                    issuers_seen.add(pair)
    except (InvalidSignature, ValueError, TypeError) as exc:
        return f"chain does not verify: {type(exc).__name__} {exc}", leaf.serial_number
    if chain[-1].public_bytes(serialization.Encoding.DER) not in roots:
        return "the chain does not end in meshca's trust bundle", leaf.serial_number
    return None, leaf.serial_number


def _write_per_proxy(path: Path, answers: Sequence[Answer], problems: Mapping[int, str]) -> None:
    first = min((a.start_ns for a in answers if a.start_ns), default=0)

    def at(ns: int) -> str:
        return f"{(ns - first) / 1e6:.3f}" if ns else ""

    path.parent.mkdir(exist_ok=True)
    with path.open("w", newline="") as stream:
        out = csv.writer(stream, lineterminator="\n")
        out.writerow(
            ["proxy", "start_ms", "connected_ms", "tls_ms", "end_ms", "latency_ms", "problem"]
        )
        for a in sorted(answers, key=lambda a: a.index):
            latency = f"{a.latency_ms:.3f}" if a.start_ns and a.end_ns else ""
            out.writerow(
                [
                    a.index,
                    at(a.start_ns),
                    at(a.connected_ns),
                    at(a.tls_ns),
                    at(a.end_ns),
                    latency,
                    problems.get(id(a), ""),
                ]
            )


def _sample(answer: Answer, why: str, first_ns: int) -> dict[str, Any]:
    """A failed proxy, with its stage times in ms since the storm's first connect."""

    def at(ns: int) -> float | None:
        return round((ns - first_ns) / 1e6, 1) if ns else None

    return {
        "index": answer.index,
        "why": why[:300],
        "start_ms": at(answer.start_ns),
        "connected_ms": at(answer.connected_ns),
        "tls_ms": at(answer.tls_ns),
        "end_ms": at(answer.end_ns),
    }


def _distribution(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "max": ordered[-1],
    }


def evaluate(
    raw: dict[str, Any],
    proxies: Proxies,
    server: Server,
    record: IssuanceRecord,
    mark: int,
    per_proxy_csv: Path,
) -> dict[str, Any]:
    """Every answer checked, the record compared, and the run's figures.

    Every proxy's times (ms since the storm's first connect attempt) and outcome go to
    ``per_proxy_csv``.
    """
    answers = [a for path in raw.pop("results") for a in read_results(path)]
    roots = {
        c.public_bytes(serialization.Encoding.DER)
        for c in x509.load_pem_x509_certificates(server.bundle_path.read_bytes())
    }
    issuers_seen: set[bytes] = set()
    problems: Counter[str] = Counter()
    serials: list[int] = []
    good: list[Answer] = []
    failed: list[tuple[Answer, str]] = []
    for answer in answers:
        problem, serial = check_answer(answer, proxies, roots, issuers_seen)
        if serial is not None:
            serials.append(serial)
        if problem is None:
            good.append(answer)
        else:
            problems[problem[:160]] += 1
            failed.append((answer, problem))
    _write_per_proxy(per_proxy_csv, answers, {id(a): why for a, why in failed})
    indices = sorted(a.index for a in answers)
    invalid = []
    if indices != list(range(proxies.count)):
        invalid.append("the generator did not report every proxy exactly once")
    recorded = record.issued_since(mark)
    if len(recorded) != proxies.count:
        invalid.append(f"issuance record grew by {len(recorded)}, not {proxies.count}")
    elif sorted(recorded) != sorted(proxies.spiffe_ids):
        invalid.append("the issuance record's SPIFFE IDs are not the proxies' IDs")
    if len(set(serials)) != len(serials):
        invalid.append(f"{len(serials) - len(set(serials))} repeated serial numbers")
    failures = proxies.count - len(good)
    first = min((a.start_ns for a in answers if a.start_ns), default=0)
    last_good = max((a.end_ns for a in good), default=0)
    time_to_last = (last_good - first) / 1e9 if good else None
    window = raw["window_s"]
    per_proxy_ms = 1000 * raw["generator_cpu_s"] / max(1, proxies.count)
    result: dict[str, Any] = {
        "proxies": proxies.count,
        "served": len(good),
        "failures": failures,
        "failure_kinds": dict(problems.most_common(10)),
        "time_to_last_s": time_to_last,
        "certs_per_s": proxies.count / time_to_last if time_to_last else None,
        "latency_ms": _distribution([a.latency_ms for a in good]),
        "finished_at_ms": _distribution([(a.end_ns - first) / 1e6 for a in good]),
        "started_at_ms": _distribution([(a.start_ns - first) / 1e6 for a in good]),
        "stage_ms": {
            "tcp_connect": _distribution([(a.connected_ns - a.start_ns) / 1e6 for a in good]),
            "tls_handshake": _distribution([(a.tls_ns - a.connected_ns) / 1e6 for a in good]),
            "grpc_call": _distribution([(a.end_ns - a.tls_ns) / 1e6 for a in good]),
        }
        if good and all(a.connected_ns and a.tls_ns for a in good)
        else None,
        "failed_samples": [_sample(a, why, first) for a, why in failed[:20]],
        "issued_rows_added": len(recorded),
        "window_s": window,
        "cpu": {
            "meshca_s": raw["meshca_cpu_s"],
            "meshca_cores": raw["meshca_cpu_s"] / window,
            "meshca_ms_per_cert": 1000 * raw["meshca_cpu_s"] / max(1, len(good)),
            "generator_s": raw["generator_cpu_s"],
            "generator_cores": raw["generator_cpu_s"] / window,
            "generator_ms_per_proxy": per_proxy_ms,
            "driver_s": raw["driver_cpu_s"],
            "machine_busy_cores": raw["machine_busy_cores"],
            "other_cores": raw["machine_busy_cores"]
            - (raw["meshca_cpu_s"] + raw["generator_cpu_s"] + raw["driver_cpu_s"]) / window,
            "steal_fraction": raw["steal_fraction"],
        },
        "generator_full_chain_verifications": raw["generator_full_chain_verifications"],
        "kernel": raw["kernel"],
        "listen_backlog": list(server.backlog),
        "valid": not invalid,
        "invalid_reasons": invalid,
    }
    result["met"] = bool(
        result["valid"]
        and failures == 0
        and time_to_last is not None
        and time_to_last < TARGET_SECONDS
    )
    return result


# --- runs, medians, output --------------------------------------------------------------

_MEDIAN_PATHS = (
    ("time_to_last_s",),
    ("certs_per_s",),
    ("failures",),
    ("latency_ms", "p50"),
    ("latency_ms", "p90"),
    ("latency_ms", "p99"),
    ("latency_ms", "max"),
    ("finished_at_ms", "p50"),
    ("finished_at_ms", "p99"),
    ("cpu", "meshca_s"),
    ("cpu", "meshca_cores"),
    ("cpu", "meshca_ms_per_cert"),
    ("cpu", "generator_s"),
    ("cpu", "generator_cores"),
    ("cpu", "generator_ms_per_proxy"),
    ("cpu", "other_cores"),
    ("cpu", "steal_fraction"),
)


def _get(run: Mapping[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = run
    for key in path:
        if not isinstance(value, Mapping) or value.get(key) is None:
            return None
        value = value[key]
    return float(value)


def medians(runs: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Each figure's median over the runs that measured it."""
    out: dict[str, float | None] = {}
    for path in _MEDIAN_PATHS:
        values = [v for run in runs if (v := _get(run, path)) is not None]
        out[".".join(path)] = statistics.median(values) if values else None
    return out


def verdict(runs: Sequence[Mapping[str, Any]], summary: Mapping[str, float | None]) -> bool:
    """Met when every run was valid, served every proxy with no failure, and the median
    time to the last certificate is under the target."""
    median_time = summary["time_to_last_s"]
    return bool(
        runs
        and all(run["valid"] and run["failures"] == 0 for run in runs)
        and median_time is not None
        and median_time < TARGET_SECONDS
    )


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(
    runs: Sequence[Mapping[str, Any]], summary: Mapping[str, float | None], met: bool
) -> str:
    count = runs[0]["proxies"] if runs else 0
    per_run = ", ".join(_fmt(r["time_to_last_s"], ".2f") for r in runs)
    lines = [
        f"Cold-start storm: {count:,} proxies, meshca over TLS with {WORKERS} workers, "
        f"medians of {len(runs)} run(s)",
        "",
        "| figure | median |",
        "|---|---:|",
        f"| time to the last certificate | {_fmt(summary['time_to_last_s'], '.2f')} s "
        f"(runs: {per_run}) |",
        f"| throughput | {_fmt(summary['certs_per_s'], ',.0f')} certs/s |",
        f"| failures | {_fmt(summary['failures'], '.0f')} "
        f"(runs: {', '.join(str(r['failures']) for r in runs)}) |",
        "| latency p50 / p90 / p99 / max (connect + TLS + call) | "
        + " / ".join(_fmt(summary[f"latency_ms.{q}"], ",.0f") for q in ("p50", "p90", "p99", "max"))
        + " ms |",
        f"| meshca CPU | {_fmt(summary['cpu.meshca_s'], '.2f')} s = "
        f"{_fmt(summary['cpu.meshca_cores'], '.2f')} cores, "
        f"{_fmt(summary['cpu.meshca_ms_per_cert'], '.2f')} ms per certificate |",
        f"| load generator CPU | {_fmt(summary['cpu.generator_s'], '.2f')} s = "
        f"{_fmt(summary['cpu.generator_cores'], '.2f')} cores, "
        f"{_fmt(summary['cpu.generator_ms_per_proxy'], '.2f')} ms per proxy |",
        f"| other CPU on the machine | {_fmt(summary['cpu.other_cores'], '.2f')} cores |",
        "",
        f"Target 5 (all {count:,} served, no failures, under {TARGET_SECONDS:g} s): "
        + ("MET" if met else "NOT MET"),
    ]
    for number, run in enumerate(runs, 1):
        if not run["valid"]:
            lines.append(f"run {number} INVALID: {'; '.join(run['invalid_reasons'])}")
        if run["failure_kinds"]:
            lines.append(f"run {number} failures: {run['failure_kinds']}")
    return "\n".join(lines)


def run_once(
    load: Load, proxies: Proxies, issuer_dir: Path, workdir: Path, prefix: Path
) -> dict[str, Any]:
    """A fresh meshca (new data directory, new CA), one storm, every answer checked.

    Every proxy's times go to ``<prefix>-proxies.csv``; meshca's log is copied to
    ``<prefix>-meshca.log`` when the run had a failure or was invalid.
    """
    keep_log = prefix.with_name(prefix.name + "-meshca.log")
    issuer = DevTokenIssuer(issuer_dir)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    result: dict[str, Any] | None = None
    try:
        with meshca_tls(run_dir, issuer) as server:
            record = IssuanceRecord(server.database)
            try:
                mark = record.mark()
                raw = fire(load, proxies, server, run_dir)
                per_proxy = prefix.with_name(prefix.name + "-proxies.csv")
                result = evaluate(raw, proxies, server, record, mark, per_proxy)
                return result
            finally:
                record.close()
    finally:
        if result is None or result["failures"] or not result["valid"]:
            with contextlib.suppress(OSError):
                keep_log.parent.mkdir(exist_ok=True)
                shutil.copyfile(run_dir / "meshca.log", keep_log)
                print(f"  meshca's log: {keep_log.relative_to(REPO)}", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--proxies", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--client", choices=CLIENTS, default="c", help="load generator")
    parser.add_argument(
        "--tls-library",
        choices=tuple(TLS_LIBRARIES),
        default="boringssl",
        help="TLS library of the C client",
    )
    parser.add_argument("--procs", type=int, default=2, help="load-generator processes")
    parser.add_argument(
        "--max-inflight",
        type=int,
        default=1024,
        help="proxies between connect and response at once, over all processes (0: all)",
    )
    parser.add_argument(
        "--verify",
        choices=("cached", "full"),
        default="cached",
        help="server chain check per connection: full, or reuse the verdict for a chain "
        "already verified (see STORM.md)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per storm")
    args = parser.parse_args()
    if args.proxies <= 0 or args.runs <= 0 or args.procs <= 0:
        parser.error("--proxies, --runs and --procs must be positive")

    load = Load(
        client=args.client,
        command=tuple(client_command(args.client, args.tls_library)),
        procs=args.procs,
        max_inflight=args.max_inflight,
        verify=args.verify,
        timeout=args.timeout,
    )
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="meshca-storm-") as tmp:
        workdir = Path(tmp)
        issuer_dir = workdir / "dev-issuer"
        print(f"preparing {args.proxies:,} proxies (tokens, keys, CSRs)", flush=True)
        clock = time.monotonic()
        proxies = make_proxies(args.proxies, workdir, issuer_dir, AUDIENCE, os.cpu_count() or 1)
        prepare_s = time.monotonic() - clock
        print(f"prepared in {prepare_s:.1f} s", flush=True)
        for number in range(1, args.runs + 1):
            print(f"run {number}/{args.runs}", flush=True)
            prefix = RESULTS / f"storm-{stamp}-run{number}"
            run = run_once(load, proxies, issuer_dir, workdir, prefix)
            runs.append(run)
            print(
                f"  last certificate after {_fmt(run['time_to_last_s'], '.2f')} s, "
                f"{run['served']:,} served, {run['failures']} failed, "
                f"meshca {run['cpu']['meshca_s']:.1f} CPU s, "
                f"generator {run['cpu']['generator_s']:.1f} CPU s"
                + ("" if run["valid"] else f", INVALID: {'; '.join(run['invalid_reasons'])}"),
                flush=True,
            )
    summary = medians(runs)
    met = verdict(runs, summary)
    print()
    print(markdown(runs, summary, met))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"storm-{stamp}.json"
    document = {
        "started": started.isoformat(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "host": {"node": platform.node(), "cpus": os.cpu_count()},
        "load": {
            "client": load.client,
            "tls_library": args.tls_library if load.client == "c" else None,
            "procs": load.procs,
            "max_inflight": load.max_inflight,
            "verify": load.verify,
        },
        "proxies": args.proxies,
        "namespaces": proxies.namespaces,
        "prepare_s": prepare_s,
        "target": {"seconds": TARGET_SECONDS, "met": met},
        "medians": summary,
        "runs": runs,
    }
    out.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"\nwritten to {out.relative_to(REPO)}")
    return 0 if all(run["valid"] for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
