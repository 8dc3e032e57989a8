"""The deny-list in the database: entries and their log records, together or not at all."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, func, select

from meshca.adapters.storage import make_engine, sqlite_url_for
from meshca.adapters.storage.audit_query import SqlAuditReader
from meshca.adapters.storage.deny_list import SqlDenyList
from meshca.adapters.storage.migrate import MIGRATIONS, head_revision, schema_state, upgrade
from meshca.adapters.storage.record_rows import insert_records, stored_record
from meshca.adapters.storage.tables import IssuanceRecordRow
from meshca.adapters.storage.transparency import SqlTransparencyLog
from meshca.core.audit import AuditQuery, Outcome
from meshca.core.denylist import DenyKind, DenyRequest
from meshca.core.errors import BackendUnavailable, InvalidRequest
from tests.adapters.storage.log_fixtures import T0, make_record

WEB = "spiffe://mesh.test/ns/cart/sa/web"


def _request(kind: DenyKind = DenyKind.SPIFFE_ID, value: str = WEB, **kw: object) -> DenyRequest:
    values: dict[str, object] = dict(
        kind=kind, value=value, reason="key leaked", requested_by="alice"
    )
    values.update(kw)
    return DenyRequest(**values)  # type: ignore[arg-type]


def _records(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(IssuanceRecordRow)).scalar())


def test_add_and_lift_are_log_records_and_move_the_revision(engine: Engine) -> None:
    with engine.begin() as connection:
        insert_records(connection, [stored_record(make_record(n)) for n in range(3)])
    store = SqlDenyList(engine)
    assert store.revision() == -1 and store.load().entries == ()

    entry = store.add(_request(until=T0 + timedelta(days=1)), T0)
    assert entry.leaf_index == 3 and store.revision() == 3
    loaded = store.load()
    assert loaded.revision == 3 and loaded.entries == (entry,)
    assert loaded.is_denied(WEB, None, None, T0) == entry
    key = store.add(_request(DenyKind.KEY_SHA256, "ab" * 32), T0 + timedelta(seconds=1))
    assert (key.id, key.leaf_index, store.revision()) == (entry.id + 1, 4, 4)

    lifted = store.lift(entry.id, "bob", "rotated", T0 + timedelta(minutes=1))
    assert lifted.lifted_by == "bob" and lifted.lifted_at == T0 + timedelta(minutes=1)
    assert store.revision() == 5
    assert store.load().entries == (key,)
    assert [e.id for e in store.entries()] == [entry.id, key.id]

    page = SqlAuditReader(engine).query(AuditQuery(spiffe_id=WEB))
    assert [e.record.outcome for e in page.entries] == [Outcome.LIFTED, Outcome.REVOKED]
    assert [e.leaf_index for e in page.entries] == [5, 3]
    assert page.entries[1].record.detail.startswith(f"deny-list entry {entry.id}: spiffe-id")
    assert "until 2026-03-02T12:00:00.250000Z" in page.entries[1].record.detail


def test_the_log_still_verifies_after_deny_list_changes(engine: Engine) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    log = SqlTransparencyLog(engine, key)
    with engine.begin() as connection:
        insert_records(connection, [stored_record(make_record(n)) for n in range(20)])
    log.sign_head(T0)
    store = SqlDenyList(engine)
    entry = store.add(_request(), T0)
    store.lift(entry.id, "bob", "", T0)
    log.sign_head(T0 + timedelta(seconds=1))
    report = log.verify(key.public_key())
    assert report.ok, report
    assert log.state().tree_size == 22


@pytest.mark.parametrize("entry_id", [0, 999, -3])
def test_lifting_an_unknown_entry_is_refused_and_writes_nothing(
    engine: Engine, entry_id: int
) -> None:
    with pytest.raises(InvalidRequest, match=f"no deny-list entry {entry_id}"):
        SqlDenyList(engine).lift(entry_id, "bob", "", T0)
    assert _records(engine) == 0


def test_lifting_twice_is_refused_and_two_racing_lifts_make_one(engine: Engine) -> None:
    store = SqlDenyList(engine)
    entries = [store.add(_request(value=f"{WEB}{n}"), T0) for n in range(4)]
    store.lift(entries[0].id, "bob", "", T0)
    with pytest.raises(InvalidRequest, match=r"already lifted .* by bob"):
        store.lift(entries[0].id, "carol", "", T0)

    results: list[str] = []
    barrier = threading.Barrier(4)

    def lift(who: str) -> None:
        barrier.wait()
        try:
            store.lift(entries[1].id, who, "", T0)
            results.append("lifted")
        except InvalidRequest:
            results.append("refused")

    threads = [threading.Thread(target=lift, args=(f"op{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results) == ["lifted", "refused", "refused", "refused"]
    # Four adds and two lifts: six records, whatever raced.
    assert _records(engine) == 6
    assert {e.id for e in store.load().entries} == {entries[2].id, entries[3].id}


def test_a_database_before_the_deny_list_says_to_upgrade_then_upgrades(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url_for(tmp_path / "data"))
    try:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0002")
            insert_records(connection, [stored_record(make_record(n)) for n in range(5)])
        with pytest.raises(BackendUnavailable, match="run 'meshca db upgrade'"):
            SqlDenyList(engine).revision()

        before, after = upgrade(engine)
        assert (before.current, after.current) == ("0002", head_revision())
        entry = SqlDenyList(engine).add(_request(), T0)
        assert entry.leaf_index == 5 and schema_state(engine).up_to_date
    finally:
        engine.dispose()
