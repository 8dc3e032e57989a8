"""meshca as the system under test: ``meshca serve`` in jwks mode, two workers.

Requests go through Istio's CA API (IstioCertificateService/CreateCertificate) as a proxy
would send them. A dev token issuer signs the service-account token; meshca checks it
offline against the issuer's JWKS file and caches the result after the first check.

Three set-ups share this code: plaintext on SQLite (``meshca``), TLS on SQLite
(``meshca-tls``, meshca's default transport) and plaintext on PostgreSQL (``meshca-pg``,
with ``bench_postgres`` and ``dedicated_database`` below).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc.client import channel_to, create_certificate
from meshca.adapters.k8s.dev_issuer import DevTokenIssuer
from meshca.adapters.storage.tables import IssuanceRecordRow
from meshca.core.audit import Outcome

from procs import LOCALHOST, free_port, managed_group
from target import Counter, Target
from workload import (
    NAMESPACE,
    SERVICE_ACCOUNT,
    SPIFFE_ID,
    TRUST_DOMAIN,
    TTL_SECONDS,
    grpc_frame,
    leaf_uri_sans,
)

if TYPE_CHECKING:
    from tests.fixtures_pg import PostgresServer

__all__ = [
    "AUDIENCE",
    "METHOD",
    "WORKERS",
    "BenchPostgres",
    "bench_postgres",
    "dedicated_database",
    "meshca_ca",
    "serve_argv",
    "trust_bundle",
]

METHOD = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
AUDIENCE = "meshca"
WORKERS = 2
START_TIMEOUT = 60.0
REPO = Path(__file__).resolve().parents[1]


def _meshca_argv() -> tuple[list[str], Path | None]:
    """``.venv/bin/meshca`` when installed; else ``python -m meshca`` from the repo root."""
    script = Path(sys.executable).parent / "meshca"
    if script.exists():
        return [str(script)], None
    return [sys.executable, "-m", "meshca"], REPO


@contextlib.contextmanager
def meshca_ca(
    workdir: Path,
    csr_pem: str,
    *,
    name: str = "meshca",
    tls: bool = False,
    database_url: str | None = None,
    extra_trees: tuple[int, ...] = (),
    extra_args: Sequence[str] = (),
) -> Iterator[Target]:
    """Start meshca on a free 127.0.0.1 port, wait until it serves, check one issuance.

    All of meshca's processes are stopped when the block exits. Its data directory (CA
    files and, without ``database_url``, the SQLite issuance record) is
    ``workdir/<name>-data``. ``tls`` serves with meshca's own serving certificate instead
    of ``--plaintext``; the checks then trust meshca's bundle (``meshca ca bundle``).
    ``extra_trees`` are process trees that belong to this set-up (its PostgreSQL).
    ``extra_args`` go on ``meshca serve``'s command line.
    """
    data_dir = workdir / f"{name}-data"
    issuer = DevTokenIssuer(workdir / f"{name}-dev-issuer")
    token = issuer.mint(NAMESPACE, SERVICE_ACCOUNT, AUDIENCE, now=datetime.now(UTC))
    port = free_port()
    target = f"{LOCALHOST}:{port}"
    argv, cwd = serve_argv(
        target,
        data_dir,
        issuer,
        [
            *([] if tls else ["--plaintext"]),
            *(["--database-url", database_url] if database_url else []),
            *extra_args,
        ],
    )
    # Flags only: a MESHCA_* variable in the caller's environment must not change the setup.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")}
    body = workdir / f"{name}-body.bin"
    request = istio_pb2.IstioCertificateRequest(csr=csr_pem, validity_duration=TTL_SECONDS)
    body.write_bytes(grpc_frame(request.SerializeToString()))
    with managed_group(argv, workdir / f"{name}.log", env=env, cwd=cwd) as proc:
        alive = lambda: proc.poll() is None  # noqa: E731
        roots = trust_bundle(data_dir, env, alive, START_TIMEOUT) if tls else None
        _wait_serving(target, alive, START_TIMEOUT, roots)
        _check_one(target, token, csr_pem, roots)
        records = _IssuedCounter(database_url or data_dir / "meshca.db")
        try:
            yield Target(
                name=name,
                url=f"{'https' if tls else 'http'}://{target}{METHOD}",
                headers=[
                    "content-type: application/grpc",
                    "te: trailers",
                    f"authorization: Bearer {token}",
                ],
                body=body,
                http1=False,
                pgid=proc.pid,
                counters=(Counter(f"issued rows in {records.where}", records.count),),
                extra_trees=extra_trees,
            )
        finally:
            records.close()


def serve_argv(
    listen: str, data_dir: Path, issuer: DevTokenIssuer, extra: list[str]
) -> tuple[list[str], Path | None]:
    """``meshca serve`` as the bench runs it (jwks mode against ``issuer``, ``WORKERS``
    workers, warnings only) plus ``extra``; and the directory to run it in."""
    command, cwd = _meshca_argv()
    argv = [
        *command,
        "serve",
        "--listen",
        listen,
        "--data-dir",
        str(data_dir),
        "--trust-domain",
        TRUST_DOMAIN,
        "--k8s-mode",
        "jwks",
        "--k8s-issuer",
        issuer.issuer,
        "--k8s-jwks-file",
        str(issuer.jwks_path),
        "--k8s-audience",
        AUDIENCE,
        *extra,
        "--workers",
        str(WORKERS),
        "--log-level",
        "warning",
    ]
    return argv, cwd


def trust_bundle(
    data_dir: Path, env: Mapping[str, str], alive: Callable[[], bool], timeout: float
) -> bytes:
    """meshca's roots as PEM, from ``meshca ca bundle`` once the starting server made them."""
    command, cwd = _meshca_argv()
    argv = [*command, "ca", "bundle", "--data-dir", str(data_dir)]
    deadline = time.monotonic() + timeout
    while True:
        if (data_dir / "meshca.db").exists():
            out = subprocess.run(
                argv, capture_output=True, env=dict(env), cwd=cwd, timeout=60, check=False
            )
            if out.returncode == 0 and b"BEGIN CERTIFICATE" in out.stdout:
                return out.stdout
        if not alive():
            raise RuntimeError("meshca exited during start-up (see its log)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no trust bundle from meshca in {data_dir} after {timeout:.0f}s")
        time.sleep(0.5)


def _wait_serving(
    target: str, alive: Callable[[], bool], timeout: float, roots_pem: bytes | None = None
) -> None:
    """Poll grpc.health.v1 (the overall "" service) until SERVING; TLS when given roots."""
    deadline = time.monotonic() + timeout
    with channel_to(target, roots_pem) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if not alive():
                raise RuntimeError("meshca exited during start-up (see its log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"meshca at {target} not serving after {timeout:.0f}s")
            time.sleep(0.2)


def _check_one(target: str, token: str, csr_pem: str, roots_pem: bytes | None) -> None:
    """One CreateCertificate with the real gRPC client; the leaf must carry our SPIFFE ID."""
    with channel_to(target, roots_pem) as channel:
        chain = create_certificate(channel, token, csr_pem, ttl_seconds=TTL_SECONDS)
    if not chain:
        raise RuntimeError("meshca returned an empty certificate chain")
    uris = leaf_uri_sans(chain[0])
    if uris != [SPIFFE_ID]:
        raise RuntimeError(f"meshca's leaf has URI SANs {uris}, expected {SPIFFE_ID}")


class _IssuedCounter:
    """Counts ``outcome == 'issued'`` rows of meshca's issuance record.

    ``where`` is the SQLite file (opened read only) or a database URL (PostgreSQL). On
    PostgreSQL one connection is kept open, so no backend process starts or exits around
    a measured run and the server's CPU accounting stays exact.
    """

    def __init__(self, where: Path | str) -> None:
        self._engine: Engine
        if isinstance(where, Path):
            if not where.exists():
                raise RuntimeError(f"meshca's issuance record is not at {where}")
            self.where = f"meshca's issuance record ({where.name}, SQLite)"
            self._engine = create_engine(
                f"sqlite:///file:{where}?mode=ro&uri=true", poolclass=NullPool
            )
        else:
            self.where = "meshca's issuance record (PostgreSQL)"
            self._engine = create_engine(where, pool_size=1, max_overflow=0)
        self._query = (
            select(func.count())
            .select_from(IssuanceRecordRow)
            .where(IssuanceRecordRow.outcome == Outcome.ISSUED.value)
        )

    def count(self) -> int:
        with self._engine.connect() as connection:
            return int(connection.execute(self._query).scalar_one())

    def close(self) -> None:
        self._engine.dispose()


class BenchPostgres:
    """A PostgreSQL 15 cluster for one bench invocation (tests/fixtures_pg.py's server)."""

    def __init__(self, server: PostgresServer) -> None:
        self._server = server

    @property
    def pid(self) -> int:
        """The postmaster's pid: the root of the tree of PostgreSQL's processes.

        Each child (backends, WAL writer, checkpointer) runs in a session of its own, so
        the CPU accounting follows the tree, not a process group.
        """
        return int((self._server.data / "postmaster.pid").read_text().split()[0])

    def create_database(self, prefix: str) -> str:
        """A new, empty database; returns its SQLAlchemy URL."""
        from psycopg import sql

        name = f"{prefix}_{secrets.token_hex(4)}"
        with self._server.admin_connection() as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self._server.url(name)

    def drop_database(self, url: str) -> None:
        from psycopg import sql

        name = url.rsplit("/", 1)[1]
        with self._server.admin_connection() as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextlib.contextmanager
def bench_postgres() -> Iterator[BenchPostgres]:
    """initdb, start (fsync on, as the tests run it), and delete the cluster at the end.

    The fixture reports a failure with ``pytest.fail``; here it becomes a RuntimeError so
    the runner records it like any other set-up failure.
    """
    import pytest  # tests/fixtures_pg.py reports failures through pytest.fail
    from tests.fixtures_pg import PostgresServer

    server: PostgresServer | None = None
    try:
        try:
            server = PostgresServer.create()
            server.start()
        except pytest.fail.Exception as exc:
            raise RuntimeError(f"PostgreSQL did not start: {exc}") from None
        yield BenchPostgres(server)
    finally:
        if server is not None:
            server.destroy()


@contextlib.contextmanager
def dedicated_database(postgres: BenchPostgres, prefix: str) -> Iterator[str]:
    """A fresh database for one run, dropped (connections and all) afterwards."""
    url = postgres.create_database(prefix)
    try:
        yield url
    finally:
        postgres.drop_database(url)
