"""One leader and one CA step at a time across hosts (PostgreSQL advisory locks), and the
journal's own fence for the moment two processes both believe they hold the lock."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, text

from meshca.adapters.storage import make_engine
from meshca.adapters.storage.journal import SqlAuthorityJournal
from meshca.adapters.storage.pg_locks import PgLeaderLock, pg_step_lock
from meshca.core.authority import build_root
from meshca.core.errors import JournalConflict
from meshca.core.rotation import (
    AuthorityEntry,
    AuthorityKind,
    AuthoritySource,
    AuthorityState,
    entry_id,
)
from tests.core.builders import TRUST_DOMAIN, signer_key

NOW = datetime(2026, 11, 27, 12, tzinfo=UTC)


@pytest.fixture
def hosts(postgres_database_url: str) -> Iterator[Callable[[int], list[Engine]]]:
    """Separate engines, as separate replicas would have; disposed afterwards."""
    made: list[Engine] = []

    def make(n: int) -> list[Engine]:
        engines = [make_engine(postgres_database_url) for _ in range(n)]
        made.extend(engines)
        return engines

    yield make
    for engine in made:
        engine.dispose()


def _leaders(engines: list[Engine], stack: contextlib.ExitStack) -> list[PgLeaderLock]:
    leaders = [PgLeaderLock(e) for e in engines]
    for leader in leaders:
        stack.callback(leader.release)
    return leaders


@pytest.mark.integration
def test_one_leader_and_a_successor_when_its_session_dies(
    postgres_database_url: str, hosts: Callable[[int], list[Engine]]
) -> None:
    stack = contextlib.ExitStack()
    a, b, c = _leaders(hosts(3), stack)
    assert a.held()
    assert not b.held() and not c.held()
    assert a.held()  # still, on every poll

    # The leader's session ends as it would when its host dies.
    (admin,) = hosts(1)
    with admin.begin() as connection:
        killed = connection.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_locks "
                "WHERE locktype = 'advisory' AND objid = 2 AND granted"
            )
        ).scalar()
    assert killed == 1
    deadline = time.monotonic() + 5
    while not (b.held() or c.held()):
        assert time.monotonic() < deadline, "nobody took over"
        time.sleep(0.05)
    assert not a.held(), "the old leader must notice it lost its session"
    assert b.held() != c.held()
    stack.close()


@pytest.mark.integration
def test_release_hands_leadership_over(hosts: Callable[[int], list[Engine]]) -> None:
    with contextlib.ExitStack() as stack:
        a, b = _leaders(hosts(2), stack)
        assert a.held() and not b.held()
        a.release()
        assert b.held() and not a.held()


@pytest.mark.integration
def test_steps_run_one_at_a_time_across_hosts(hosts: Callable[[int], list[Engine]]) -> None:
    engines = hosts(4)
    inside, most = 0, 0
    guard = threading.Lock()

    def step(engine: Engine) -> None:
        nonlocal inside, most
        for _ in range(5):
            with pg_step_lock(engine):
                with guard:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0.01)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=step, args=(e,)) for e in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert most == 1
    with engines[0].connect() as connection:
        held = connection.execute(
            text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 1")
        ).scalar()
    assert held == 0, "every step lock is released"


def _prepared_root(n: int) -> AuthorityEntry:
    certificate = build_root(signer_key("ec-p256", n), TRUST_DOMAIN, NOW, timedelta(days=1), n)
    return AuthorityEntry(
        id=entry_id(certificate),
        kind=AuthorityKind.ROOT,
        state=AuthorityState.PREPARED,
        source=AuthoritySource.SELF,
        certificate=certificate,
        parent_id=None,
        key_ref=f"sealed:root-{n}",
        prepared_at=NOW,
    )


def test_a_second_prepared_root_is_refused_by_the_journal(engine: Engine) -> None:
    """Two leaders at once (one of them stale) cannot both prepare a root."""
    journal = SqlAuthorityJournal(engine)
    journal.record([_prepared_root(1)], [], NOW)
    with pytest.raises(JournalConflict):
        journal.record([_prepared_root(2)], [], NOW)
    assert len(journal.load().entries) == 1
