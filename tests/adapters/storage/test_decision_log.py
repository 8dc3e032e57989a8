"""The decision log: recorded without waiting, group-committed, queried newest first."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from meshca.adapters.storage import create_schema, make_engine
from meshca.adapters.storage.decision_log import SqlDecisionLog, record_from_dict, record_to_dict
from meshca.adapters.storage.tables import DecisionRecordRow
from meshca.core.policy import DecisionRecord

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def decision(n: int = 0, **changes: Any) -> DecisionRecord:
    values: dict[str, Any] = dict(
        time=T0 + timedelta(seconds=n),
        api="envoy.ext_authz.v3",
        allowed=n % 2 == 0,
        reason="allowed-by-policy" if n % 2 == 0 else "denied-by-policy",
        version="abc123",
        policy=f"shop/p{n % 3}",
        rule=n % 2,
        source_principal="spiffe://cluster.local/ns/shop/sa/web",
        destination_principal=f"spiffe://cluster.local/ns/shop/sa/api{n % 2}",
        method="GET",
        path=f"/items/{n}?q=1",
        host="api.shop",
        headers={"x-tenant": "acme"},
        source_ip="10.0.0.1",
        destination_port=8080,
        request_id=f"req-{n}",
        audit=("watch",) if n == 3 else (),
        detail="why",
    )
    values.update(changes)
    return DecisionRecord(**values)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'meshca.db'}"
    else:
        url = request.getfixturevalue("postgres_database_url")
    engine = make_engine(url)
    create_schema(engine)
    yield engine
    engine.dispose()


def test_table_has_a_column_for_every_record_field() -> None:
    columns = {c.name for c in DecisionRecordRow.__table__.columns}
    assert columns == {f.name for f in dataclasses.fields(DecisionRecord)} | {"id"}


async def test_records_round_trip_newest_first_with_filters(engine: Engine) -> None:
    store = SqlDecisionLog(engine)
    for n in range(10):
        store.record(decision(n))
    store.record(decision(10, path="/nul\x00", headers={"x": "\udcff"}))
    await store.aclose()
    assert store.counters.written == 11 and store.counters.failed == 0
    records = await store.list(limit=100)
    assert [r.request_id for r in records[:3]] == ["req-10", "req-9", "req-8"]
    assert records[-1] == decision(0)
    assert records[0].path == "/nul\\x00"
    assert [r.request_id for r in await store.list(denied_only=True, limit=2)] == [
        "req-9",
        "req-7",
    ]
    assert {r.policy for r in await store.list(policy="shop/p1")} == {"shop/p1"}
    dest = "spiffe://cluster.local/ns/shop/sa/api1"
    assert all(r.destination_principal == dest for r in await store.list(destination=dest))
    assert await store.list(limit=0) == ()
    assert await store.list(source="spiffe://nobody") == ()


def test_json_export_round_trips() -> None:
    record = decision(3)
    assert record_from_dict(record_to_dict(record)) == record
    with pytest.raises(ValueError):
        record_from_dict({"time": T0.isoformat()})


async def test_many_records_share_commits(engine: Engine) -> None:
    store = SqlDecisionLog(engine)
    for n in range(2000):
        store.record(decision(n))
    await store.aclose()
    with engine.connect() as connection:
        assert connection.execute(text("select count(*) from decision_record")).scalar() == 2000


async def test_a_full_queue_drops_and_counts(engine: Engine) -> None:
    store = SqlDecisionLog(engine, max_queued=0)
    store.record(decision(1))
    await store.aclose()
    assert store.counters.dropped == 1 and store.counters.written == 0


async def test_a_failed_write_is_counted_not_raised(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    with engine.begin() as connection:
        connection.execute(text("drop table decision_record"))
    store = SqlDecisionLog(engine)
    store.record(decision(1))
    await store.aclose()
    assert store.counters.failed == 1
    assert "decision record(s) not committed" in caplog.text


async def test_a_naive_time_is_logged_and_skipped(engine: Engine) -> None:
    store = SqlDecisionLog(engine)
    store.record(decision(1, time=datetime(2026, 1, 1)))
    await store.aclose()
    assert await store.list() == ()


async def test_records_after_close_are_dropped(engine: Engine) -> None:
    store = SqlDecisionLog(engine)
    store.close()
    store.record(decision(1))
    await asyncio.sleep(0)
    assert store.counters.dropped == 1
