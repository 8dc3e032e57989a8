"""The authority journal on SQLite and a real PostgreSQL: round trips and compare-and-set."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from meshca.adapters.storage import create_schema, make_engine, sqlite_url_for
from meshca.adapters.storage.journal import SqlAuthorityJournal
from meshca.core.errors import JournalConflict
from meshca.core.rotation import AuthorityState, Transition
from tests.core.builders import NOW
from tests.core.test_rotation import H, intermediate, root

ACTIVE, PREPARED, RETIRED = AuthorityState.ACTIVE, AuthorityState.PREPARED, AuthorityState.RETIRED


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = sqlite_url_for(tmp_path)
    else:
        url = request.getfixturevalue("postgres_database_url")
    engine = make_engine(url)
    create_schema(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def test_entries_round_trip_with_their_chain_and_times(engine: Engine) -> None:
    journal = SqlAuthorityJournal(engine)
    parent = root()
    child = intermediate(parent, PREPARED, at=NOW + H, n=3)
    from dataclasses import replace

    child = replace(child, chain=(parent.certificate,))
    journal.record([parent, child], [], NOW)
    loaded = SqlAuthorityJournal(engine).load()
    assert loaded.get(parent.id) == parent
    again = loaded.get(child.id)
    assert again is not None and again.chain == (parent.certificate,)
    assert again.prepared_at == NOW + H and again.prepared_at.tzinfo is not None


def test_a_move_applies_only_from_the_expected_state_and_all_or_nothing(engine: Engine) -> None:
    journal = SqlAuthorityJournal(engine)
    old, new = root(), root(PREPARED, at=NOW + H, n=2)
    journal.record([old, new], [], NOW)
    journal.record(
        [],
        [
            Transition(new.id, PREPARED, ACTIVE),
            Transition(old.id, ACTIVE, RETIRED),
        ],
        NOW + 2 * H,
    )
    loaded = journal.load()
    promoted, retired = loaded.get(new.id), loaded.get(old.id)
    assert promoted is not None and promoted.state == ACTIVE
    assert promoted.activated_at == NOW + 2 * H
    assert retired is not None and retired.retired_at == NOW + 2 * H
    # A second process that read the old state loses, and changes nothing at all.
    late = root(PREPARED, at=NOW + 3 * H, n=3)
    with pytest.raises(JournalConflict, match="no longer prepared"):
        journal.record([late], [Transition(new.id, PREPARED, ACTIVE)], NOW + 3 * H)
    assert journal.load().get(late.id) is None
    with pytest.raises(JournalConflict, match="already in the journal"):
        journal.record([old], [], NOW)


def test_a_taint_is_marked_and_recorded_in_one_transaction_once(engine: Engine) -> None:
    import threading

    from sqlalchemy import func, select

    from meshca.adapters.storage.tables import IssuanceRecordRow
    from meshca.core.taint import check_taint, taint_record

    journal = SqlAuthorityJournal(engine)
    parent = root()
    child = intermediate(parent, n=5)
    journal.record([parent, child], [], NOW)
    request = check_taint(
        journal.load(),
        child,
        reason="leaked",
        requested_by="sec",
        emergency=False,
        peers_may_fail=False,
        self_managed_roots=True,
    )
    record = taint_record(request, NOW + H)
    # Two racing taints: exactly one marks and records.
    outcomes: list[object] = []

    def attempt() -> None:
        try:
            outcomes.append(SqlAuthorityJournal(engine).taint(child.id, NOW + H, record))
        except JournalConflict as error:
            outcomes.append(error)

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    leaves = [o for o in outcomes if isinstance(o, int)]
    assert len(leaves) == 1 and sum(isinstance(o, JournalConflict) for o in outcomes) == 1
    loaded = journal.load().get(child.id)
    assert loaded is not None and loaded.tainted_at == NOW + H
    with engine.connect() as connection:
        rows = connection.execute(select(func.count()).select_from(IssuanceRecordRow)).scalar()
        stored = connection.execute(
            select(IssuanceRecordRow.leaf_index, IssuanceRecordRow.fingerprint_sha256)
        ).one()
    assert rows == 1 and stored == (leaves[0], child.fingerprint)
    # Unknown and removed entries are refused and record nothing.
    with pytest.raises(JournalConflict):
        journal.taint("0" * 16, NOW + H, record)
    journal.record([], [Transition(child.id, ACTIVE, RETIRED)], NOW + H)
    journal.record([], [Transition(child.id, RETIRED, AuthorityState.REMOVED)], NOW + 2 * H)
    other = intermediate(parent, n=6)
    journal.record([other], [], NOW)
    journal.record([], [Transition(other.id, ACTIVE, RETIRED)], NOW + H)
    journal.record([], [Transition(other.id, RETIRED, AuthorityState.REMOVED)], NOW + 2 * H)
    with pytest.raises(JournalConflict):
        journal.taint(other.id, NOW + 3 * H, record)
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(IssuanceRecordRow)).scalar() == 1
