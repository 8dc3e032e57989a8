"""A migrated database on SQLite or PostgreSQL, and records to fill it with."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from meshca.adapters.storage import make_engine, sqlite_url_for
from meshca.adapters.storage.migrate import prepare_schema
from meshca.core.audit import AuditRecord, Outcome

T0 = datetime(2026, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)
TRUST_DOMAIN = "spiffe://mesh.test"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url_for(tmp_path / "data")
    url: str = request.getfixturevalue("postgres_database_url")
    return url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    prepare_schema(engine, "meshca db upgrade")
    yield engine
    engine.dispose()


def make_record(n: int, **changes: Any) -> AuditRecord:
    """Record ``n``: issued or refused, spread over namespaces, pods and APIs."""
    namespace = ("shop", "pay", "ops")[n % 3]
    service_account = ("web", "db")[n % 2]
    refused = n % 5 == 4
    base = AuditRecord(
        time=T0 + timedelta(minutes=n),
        outcome=Outcome.REFUSED if refused else Outcome.ISSUED,
        api=("meshca.v1.Sign", "istio.v1.auth.CreateCertificate")[n % 2],
        reason="not-authorized" if refused else "ok",
        detail="CSR names another identity" if refused else "",
        spiffe_id=f"{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}",
        serial=None if refused else f"{0xABC000 + n:x}",
        fingerprint_sha256=None if refused else f"{n:064x}",
        not_before=None if refused else T0 + timedelta(minutes=n - 1),
        not_after=None if refused else T0 + timedelta(minutes=n, hours=1),
        namespace=namespace,
        service_account=service_account,
        pod_name=f"{service_account}-{n % 4}",
        pod_uid=f"uid-{n % 4}",
        node_name="node-1",
        peer=f"ipv4:10.0.0.{n % 7}:5000",
        csr_sha256=None if refused else f"{n:064x}"[::-1],
    )
    return dataclasses.replace(base, **changes)
