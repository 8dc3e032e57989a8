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
