"""meshca as the system under test: ``meshca serve`` in jwks mode, plaintext, two workers.

Requests go through Istio's CA API (IstioCertificateService/CreateCertificate) as a proxy
would send them. A dev token issuer signs the service-account token; meshca checks it
offline against the issuer's JWKS file and caches the result after the first check.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, func, select
from sqlalchemy.pool import NullPool

from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc.client import channel_to, create_certificate
from meshca.adapters.k8s.dev_issuer import DevTokenIssuer
from meshca.adapters.storage.tables import IssuanceRecordRow
from meshca.core.audit import Outcome

from procs import LOCALHOST, free_port, managed_group
from target import Target
from workload import (
    NAMESPACE,
    SERVICE_ACCOUNT,
    SPIFFE_ID,
    TRUST_DOMAIN,
    TTL_SECONDS,
    grpc_frame,
    leaf_uri_sans,
)

__all__ = ["AUDIENCE", "METHOD", "WORKERS", "meshca_ca"]

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
def meshca_ca(workdir: Path, csr_pem: str) -> Iterator[Target]:
    """Start meshca on a free 127.0.0.1 port, wait until it serves, check one issuance.

    All of meshca's processes are stopped when the block exits. Its data directory (CA
    files and the SQLite issuance record) lives in ``workdir``.
    """
    data_dir = workdir / "meshca-data"
    issuer = DevTokenIssuer(workdir / "dev-issuer")
    token = issuer.mint(NAMESPACE, SERVICE_ACCOUNT, AUDIENCE, now=datetime.now(UTC))
    port = free_port()
    target = f"{LOCALHOST}:{port}"
    command, cwd = _meshca_argv()
    argv = [
        *command,
        "serve",
        "--listen",
        target,
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
        "--plaintext",
        "--workers",
        str(WORKERS),
        "--log-level",
        "warning",
    ]
    # Flags only: a MESHCA_* variable in the caller's environment must not change the setup.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")}
    body = workdir / "meshca-body.bin"
    request = istio_pb2.IstioCertificateRequest(csr=csr_pem, validity_duration=TTL_SECONDS)
    body.write_bytes(grpc_frame(request.SerializeToString()))
    with managed_group(argv, workdir / "meshca.log", env=env, cwd=cwd) as proc:
        _wait_serving(target, lambda: proc.poll() is None, START_TIMEOUT)
        _check_one(target, token, csr_pem)
        records = _IssuedCounter(data_dir / "meshca.db")
        try:
            yield Target(
                name="meshca",
                url=f"http://{target}{METHOD}",
                headers=[
                    "content-type: application/grpc",
                    "te: trailers",
                    f"authorization: Bearer {token}",
                ],
                body=body,
                http1=False,
                pgid=proc.pid,
                issued_count=records.count,
            )
        finally:
            records.close()


def _wait_serving(target: str, alive: Callable[[], bool], timeout: float) -> None:
    """Poll grpc.health.v1 (the overall "" service) until SERVING."""
    deadline = time.monotonic() + timeout
    with channel_to(target, None) as channel:
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


def _check_one(target: str, token: str, csr_pem: str) -> None:
    """One CreateCertificate with the real gRPC client; the leaf must carry our SPIFFE ID."""
    with channel_to(target, None) as channel:
        chain = create_certificate(channel, token, csr_pem, ttl_seconds=TTL_SECONDS)
    if not chain:
        raise RuntimeError("meshca returned an empty certificate chain")
    uris = leaf_uri_sans(chain[0])
    if uris != [SPIFFE_ID]:
        raise RuntimeError(f"meshca's leaf has URI SANs {uris}, expected {SPIFFE_ID}")


class _IssuedCounter:
    """Counts ``outcome == 'issued'`` rows of meshca's issuance record (SQLite, read only)."""

    def __init__(self, db: Path) -> None:
        if not db.exists():
            raise RuntimeError(f"meshca's issuance record is not at {db}")
        self._engine = create_engine(f"sqlite:///file:{db}?mode=ro&uri=true", poolclass=NullPool)
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
