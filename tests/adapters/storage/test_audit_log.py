"""SqlAuditLog and make_engine on SQLite (tmp_path) and on a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, event, func, inspect, select, text

from meshca.adapters.storage import SqlAuditLog, create_schema, make_engine, sqlite_url_for
from meshca.adapters.storage.tables import IssuanceRecordRow
from meshca.core.audit import AuditRecord, Outcome
from meshca.core.errors import BackendUnavailable, InternalError
from tests.fixtures_pg import PostgresServer

REPO_ROOT = Path(__file__).resolve().parents[3]
T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
# Long enough for a slow CI machine, short enough that a hang fails the test quickly.
NO_HANG = 15.0


def record(n: int = 0, **changes: Any) -> AuditRecord:
    base = AuditRecord(
        time=T0 + timedelta(seconds=n),
        outcome=Outcome.ISSUED,
        api="meshca.v1",
        reason="ok",
        spiffe_id=f"spiffe://mesh.test/ns/default/sa/app-{n}",
        serial=f"{0x1000 + n:x}",
    )
    return dataclasses.replace(base, **changes)


def count_rows(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.scalar(select(func.count()).select_from(IssuanceRecordRow)) or 0


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url_for(tmp_path / "data")
    url: str = request.getfixturevalue("postgres_database_url")
    return url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    create_schema(engine)
    yield engine
    engine.dispose()


@pytest.fixture
async def store(engine: Engine) -> AsyncIterator[SqlAuditLog]:
    store = SqlAuditLog(engine)
    yield store
    await store.aclose()


# -- round trip, order, filters ------------------------------------------------------------


def test_table_has_a_column_for_every_record_field() -> None:
    columns = {column.name for column in IssuanceRecordRow.__table__.columns}
    log_columns = {"id", "leaf_index", "leaf_hash"}
    assert columns == {field.name for field in dataclasses.fields(AuditRecord)} | log_columns


async def test_every_field_round_trips(store: SqlAuditLog) -> None:
    plus_two = timezone(timedelta(hours=2))
    full = AuditRecord(
        time=datetime(2025, 3, 1, 14, 0, 0, 999999, tzinfo=plus_two),
        outcome=Outcome.ISSUED,
        api="istio.v1.auth.IstioCertificateService/CreateCertificate",
        reason="ok",
        detail="issued for 1h",
        spiffe_id="spiffe://mesh.test/ns/prod/sa/web",
        serial="5a3c9f00000000000000000000000001",
        fingerprint_sha256="ab" * 32,
        not_before=datetime(2025, 3, 1, 11, 59, tzinfo=UTC),
        not_after=datetime(2025, 3, 1, 12, 59, tzinfo=UTC),
        namespace="prod",
        service_account="web",
        pod_name="web-7d9c-abcde",
        pod_uid="8c5a0f0e-7d0a-4b59-9a8f-0d7f4b0d2f11",
        node_name="node-1",
        peer="ipv4:10.0.0.7:51234",
        csr_sha256="cd" * 32,
    )
    minimal = AuditRecord(
        time=T0 + timedelta(hours=1), outcome=Outcome.REFUSED, api="meshca.v1", reason="x"
    )
    await store.append(full)
    await store.append(minimal)

    got_minimal, got_full = await store.list()

    assert got_minimal == minimal
    assert got_full == dataclasses.replace(full, time=full.time.astimezone(UTC))
    for value in (got_full.time, got_full.not_before, got_full.not_after, got_minimal.time):
        assert value is not None
        assert value.tzinfo is UTC
    assert got_full.time == datetime(2025, 3, 1, 12, 0, 0, 999999, tzinfo=UTC)


async def test_newest_first_with_filters_and_limit(store: SqlAuditLog) -> None:
    alice = "spiffe://mesh.test/ns/a/sa/alice"
    # Appended out of time order; same-time records come back newest-appended first.
    for n, spiffe_id, serial in [
        (2, alice, "a2"),
        (0, alice, "a0"),
        (5, "spiffe://mesh.test/ns/b/sa/bob", "b5"),
        (2, alice, "a2bis"),
        (9, None, None),
    ]:
        await store.append(record(n, spiffe_id=spiffe_id, serial=serial))

    assert [r.serial for r in await store.list()] == [None, "b5", "a2bis", "a2", "a0"]
    assert [r.serial for r in await store.list(limit=2)] == [None, "b5"]
    assert [r.serial for r in await store.list(spiffe_id=alice)] == ["a2bis", "a2", "a0"]
    assert [r.serial for r in await store.list(spiffe_id=alice, limit=1)] == ["a2bis"]
    assert [r.serial for r in await store.list(serial="a2")] == ["a2"]
    assert [r.serial for r in await store.list(spiffe_id=alice, serial="b5")] == []
    assert await store.list(limit=0) == ()
    assert await store.list(limit=-1) == ()


HOSTILE = [
    "spiffe://mesh.test/ns/o'brien/sa/x",
    "spiffe://mesh.test/ns/%",
    "spiffe://mesh.test/ns/_",
    "spiffe://mesh.test/ns/a%b_c",
    "x'; DROP TABLE issuance_record; --",
    'x"); DROP TABLE issuance_record; --',
    "back\\slash\\%",
    "",
]


async def test_hostile_filter_values_are_bound_parameters(
    store: SqlAuditLog, engine: Engine
) -> None:
    # Decoys that a LIKE or a spliced string would also match.
    decoys = ["spiffe://mesh.test/ns/abc", "spiffe://mesh.test/ns/a", "spiffe://mesh.test/ns/axb-c"]
    for n, value in enumerate(HOSTILE + decoys):
        await store.append(record(n, spiffe_id=value, serial=value))

    for value in HOSTILE:
        by_id = await store.list(spiffe_id=value)
        by_serial = await store.list(serial=value)
        assert [r.spiffe_id for r in by_id] == [value]
        assert [r.serial for r in by_serial] == [value]
    assert inspect(engine).has_table("issuance_record")
    assert count_rows(engine) == len(HOSTILE) + len(decoys)


async def test_nul_and_lone_surrogates_are_stored_escaped(store: SqlAuditLog) -> None:
    # PostgreSQL text cannot hold NUL and UTF-8 cannot hold a lone surrogate; a refusal
    # quoting such input must still be recorded rather than fail the write.
    await store.append(record(1, spiffe_id="a\x00b", detail="bad \ud800 input\x00"))

    (got,) = await store.list(spiffe_id="a\x00b")
    assert got.spiffe_id == "a\\x00b"
    assert got.detail == "bad \\ud800 input\\x00"


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(value=st.text(st.characters(codec="utf-8", exclude_characters="\x00")))
def test_any_text_round_trips_and_filters_exactly(engine: Engine, value: str) -> None:
    async def check() -> None:
        store = SqlAuditLog(engine, max_wait=0)
        try:
            await store.append(record(0, spiffe_id=value, serial=value, detail=value))
            found = await store.list(spiffe_id=value, serial=value, limit=1000)
            assert found
            assert all(r.spiffe_id == value and r.detail == value for r in found)
        finally:
            await store.aclose()

    # Each example runs on its own event loop, so this also covers many loops per engine.
    asyncio.run(check())


async def test_naive_datetime_is_refused_before_anything_is_written(
    store: SqlAuditLog, engine: Engine
) -> None:
    with pytest.raises(InternalError, match="naive"):
        await store.append(record(0, time=datetime(2025, 1, 1)))
    with pytest.raises(InternalError, match="not_after"):
        await store.append(record(0, not_after=datetime(2025, 1, 1)))
    assert count_rows(engine) == 0


# -- group commit and concurrency ----------------------------------------------------------


async def test_concurrent_appends_share_few_transactions(database_url: str, engine: Engine) -> None:
    commits = 0

    def count_commit(_connection: Any) -> None:
        nonlocal commits
        commits += 1

    event.listen(engine, "commit", count_commit)
    store = SqlAuditLog(engine)
    try:
        await asyncio.wait_for(
            asyncio.gather(*(store.append(record(n)) for n in range(500))), NO_HANG
        )
    finally:
        await store.aclose()
        event.remove(engine, "commit", count_commit)

    assert commits <= 25, f"500 records took {commits} transactions"
    # Every append returned, so every record is committed: a separate engine sees them.
    other = make_engine(database_url)
    try:
        assert count_rows(other) == 500
    finally:
        other.dispose()


async def test_two_stores_write_one_database(database_url: str, engine: Engine) -> None:
    other_engine = make_engine(database_url)
    first, second = SqlAuditLog(engine), SqlAuditLog(other_engine)
    try:
        await asyncio.wait_for(
            asyncio.gather(
                *(first.append(record(n, api="first")) for n in range(200)),
                *(second.append(record(n, api="second")) for n in range(200)),
            ),
            NO_HANG,
        )
        seen_by_first = await first.list(limit=1000)
        seen_by_second = await second.list(limit=1000)
    finally:
        await first.aclose()
        await second.aclose()
        other_engine.dispose()

    assert len(seen_by_first) == len(seen_by_second) == 400
    assert sorted(r.api for r in seen_by_first).count("second") == 200


_CHILD = """
import asyncio, sys
from datetime import UTC, datetime
from meshca.adapters.storage import SqlAuditLog, make_engine
from meshca.core.audit import AuditRecord, Outcome

async def main(url, name, count):
    engine = make_engine(url)
    store = SqlAuditLog(engine)
    now = datetime.now(UTC)
    records = [AuditRecord(time=now, outcome=Outcome.ISSUED, api=name, reason="ok",
                           serial=f"{name}-{n}") for n in range(count)]
    await asyncio.gather(*(store.append(r) for r in records))
    await store.aclose()
    engine.dispose()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_several_processes_write_one_database(database_url: str, engine: Engine) -> None:
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CHILD, database_url, f"proc{i}", "150", cwd=REPO_ROOT
        )
        for i in range(3)
    ]
    codes = await asyncio.wait_for(asyncio.gather(*(c.wait() for c in children)), 60)

    assert codes == [0, 0, 0]
    assert count_rows(engine) == 450


async def test_appends_from_several_threads_and_loops(store: SqlAuditLog, engine: Engine) -> None:
    errors: list[BaseException] = []

    def worker(base: int) -> None:
        async def run() -> None:
            await asyncio.gather(*(store.append(record(base + n)) for n in range(50)))

        try:
            asyncio.run(run())
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i * 1000,)) for i in range(4)]
    for thread in threads:
        thread.start()
    await asyncio.gather(*(store.append(record(10_000 + n)) for n in range(50)))

    def join_all() -> None:
        for thread in threads:
            thread.join(NO_HANG)

    await asyncio.to_thread(join_all)

    assert errors == []
    assert count_rows(engine) == 250


# -- failures and recovery -----------------------------------------------------------------


async def test_missing_table_fails_append_then_recovers(store: SqlAuditLog, engine: Engine) -> None:
    await store.append(record(0))
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE issuance_record"))

    results = await asyncio.wait_for(
        asyncio.gather(*(store.append(record(n)) for n in range(20)), return_exceptions=True),
        NO_HANG,
    )
    assert all(isinstance(r, BackendUnavailable) for r in results), results
    with pytest.raises(BackendUnavailable, match="cannot read"):
        await store.list()
    # Refused records are counted (readiness reads this); the writer itself lives on.
    assert (store.write_failures, store.writer_problem) == (20, None)

    create_schema(engine)
    await asyncio.wait_for(store.append(record(99)), NO_HANG)
    assert [r.serial for r in await store.list()] == [record(99).serial]
    assert store.write_failures == 20


async def test_one_unstorable_record_fails_alone(engine: Engine) -> None:
    def refuse_poison(_conn: Any, _cursor: Any, _statement: str, parameters: Any, *_: Any) -> None:
        if "poison" in repr(parameters):
            raise RuntimeError("the database refuses this record")

    event.listen(engine, "before_cursor_execute", refuse_poison)
    # A long wait so that all 21 appends land in one batch.
    store = SqlAuditLog(engine, max_wait=0.05)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(
                *(store.append(record(n)) for n in range(10)),
                store.append(record(10, detail="poison")),
                *(store.append(record(n)) for n in range(11, 21)),
                return_exceptions=True,
            ),
            NO_HANG,
        )
    finally:
        await store.aclose()
        event.remove(engine, "before_cursor_execute", refuse_poison)

    assert isinstance(results[10], BackendUnavailable)
    assert results[:10] + results[11:] == [None] * 20
    assert count_rows(engine) == 20


async def test_sqlite_locked_by_another_process_fails_fast_then_recovers(tmp_path: Path) -> None:
    url = sqlite_url_for(tmp_path)
    engine = make_engine(url, busy_timeout=0.2)
    create_schema(engine)
    store = SqlAuditLog(engine)
    locker = sqlite3.connect(tmp_path / "meshca.db", isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="locked"):
            await asyncio.wait_for(store.append(record(0)), NO_HANG)
        assert time.monotonic() - started < 5
        locker.execute("ROLLBACK")

        await asyncio.wait_for(store.append(record(1)), NO_HANG)
        assert [r.serial for r in await store.list()] == [record(1).serial]
    finally:
        locker.close()
        await store.aclose()
        engine.dispose()


@pytest.mark.integration
async def test_postgres_crash_outage_and_recovery(dedicated_postgres: PostgresServer) -> None:
    engine = make_engine(dedicated_postgres.url())
    create_schema(engine)
    store = SqlAuditLog(engine)
    try:
        await asyncio.gather(*(store.append(record(n)) for n in range(50)))
        # Killed with no checkpoint: what append confirmed must come back from the WAL.
        # No append runs while it is down, so the pooled connections go stale unnoticed.
        await asyncio.to_thread(dedicated_postgres.stop, crash=True)
        await asyncio.to_thread(dedicated_postgres.start)
        await asyncio.wait_for(store.append(record(50)), NO_HANG)

        await asyncio.to_thread(dedicated_postgres.stop, crash=True)
        started = time.monotonic()
        results = await asyncio.wait_for(
            asyncio.gather(*(store.append(record(n)) for n in range(5)), return_exceptions=True),
            NO_HANG,
        )
        assert all(isinstance(r, BackendUnavailable) for r in results), results
        assert time.monotonic() - started < 10
        with pytest.raises(BackendUnavailable):
            await store.list()

        await asyncio.to_thread(dedicated_postgres.start)
        await asyncio.wait_for(store.append(record(100)), NO_HANG)
        records = await store.list(limit=1000)
    finally:
        await store.aclose()
        engine.dispose()

    assert len(records) == 52
    assert records[0].serial == record(100).serial


# -- close and cancellation ----------------------------------------------------------------


async def test_close_completes_pending_appends(engine: Engine) -> None:
    # A long wait keeps the records queued when close() is called.
    store = SqlAuditLog(engine, max_wait=0.2)
    pending = [asyncio.create_task(store.append(record(n))) for n in range(100)]
    await asyncio.sleep(0)  # let every task queue its record

    await asyncio.wait_for(store.aclose(), NO_HANG)

    assert await asyncio.wait_for(asyncio.gather(*pending), NO_HANG) == [None] * 100
    assert count_rows(engine) == 100
    with pytest.raises(BackendUnavailable, match="closed"):
        await store.append(record(1))
    store.close()  # idempotent
    await store.aclose()
    assert len(await store.list(limit=1000)) == 100


async def test_cancelled_append_leaves_the_writer_working(store: SqlAuditLog) -> None:
    task = asyncio.create_task(store.append(record(0)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await asyncio.wait_for(store.append(record(1)), NO_HANG)
    assert record(1).serial in {r.serial for r in await store.list()}


async def test_a_closed_store_reports_why_nothing_is_written(engine: Engine) -> None:
    store = SqlAuditLog(engine)
    assert store.writer_problem is None
    await store.aclose()
    assert store.writer_problem == "the issuance record is closed"
    with pytest.raises(BackendUnavailable):
        await store.append(record(0))
    assert store.write_failures == 1


def test_close_before_any_append(engine: Engine) -> None:
    store = SqlAuditLog(engine)
    store.close()
    with pytest.raises(BackendUnavailable):
        store.start()


def test_create_schema_from_several_processes_at_once(database_url: str) -> None:
    engines = [make_engine(database_url) for _ in range(4)]
    barrier = threading.Barrier(len(engines))
    errors: list[BaseException] = []

    def create(engine: Engine) -> None:
        barrier.wait()
        try:
            create_schema(engine)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=create, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(NO_HANG)
    try:
        assert errors == []
        assert inspect(engines[0]).has_table("issuance_record")
    finally:
        for engine in engines:
            engine.dispose()


# -- make_engine ---------------------------------------------------------------------------


def test_sqlite_url_for() -> None:
    assert sqlite_url_for(Path("/var/lib/meshca")) == "sqlite:////var/lib/meshca/meshca.db"


def test_sqlite_engine_is_durable_and_creates_its_directory(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url_for(tmp_path / "a" / "b"))
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert (tmp_path / "a" / "b" / "meshca.db").is_file()
    finally:
        engine.dispose()


def test_sqlite_that_cannot_be_opened(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(BackendUnavailable, match="cannot create the directory"):
        make_engine(sqlite_url_for(tmp_path / "file" / "data"))
    (tmp_path / "meshca.db").mkdir()
    with pytest.raises(BackendUnavailable, match="cannot open database"):
        make_engine(sqlite_url_for(tmp_path))


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("sqlite://", id="memory-default"),
        pytest.param("sqlite:///:memory:", id="memory"),
        pytest.param("mysql://u:p@h/db", id="other-database"),
        pytest.param("postgresql+psycopg2://u:p@h/db", id="other-driver"),
        pytest.param("not a url s3cret", id="garbage"),
    ],
)
def test_unsupported_urls(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        make_engine(url)
    assert "s3cret" not in str(caught.value)


def test_unreachable_postgres_hides_the_password() -> None:
    # A port nobody listens on: refused at once.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(BackendUnavailable) as caught:
        make_engine(f"postgresql://meshca:s3cret@127.0.0.1:{port}/meshca")
    message = str(caught.value)
    assert "s3cret" not in message
    assert f"postgresql+psycopg://meshca:***@127.0.0.1:{port}/meshca" in message


@pytest.mark.integration
@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "postgresql+psycopg"])
def test_postgres_url_schemes_use_psycopg(postgres_url: str, scheme: str) -> None:
    engine = make_engine(postgres_url.replace("postgresql+psycopg", scheme, 1))
    try:
        assert engine.url.drivername == "postgresql+psycopg"
    finally:
        engine.dispose()


@pytest.mark.integration
async def test_postgres_session_time_zone_does_not_leak(postgres_database_url: str) -> None:
    engine = make_engine(f"{postgres_database_url}?options=-c%20TimeZone%3DAsia/Kolkata")
    create_schema(engine)
    store = SqlAuditLog(engine)
    try:
        await store.append(record(0))
        (got,) = await store.list()
    finally:
        await store.aclose()
        engine.dispose()
    assert got.time == T0
    assert got.time.tzinfo is UTC
