"""PostgreSQL advisory locks: one rotation leader and one CA step at a time, across hosts.

With the journal in PostgreSQL, replicas on several hosts share nothing else, so file
locks in a data directory cannot exclude each other. These are session-level advisory
locks, each on a connection of its own: PostgreSQL drops them when that connection ends,
so a replica killed with -9, or cut off, frees them without anyone's help. (A pooler in
transaction mode, such as PgBouncer's, would break that: see docs/operations.md.)

The locks are the first line; the journal is the second. Its state moves are
compare-and-set and at most one root can be prepared, so even two processes that both
believe they hold the lock (one whose connection died mid-step) cannot apply a step twice.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

from meshca.adapters.storage.engine import error_summary
from meshca.core.errors import BackendUnavailable

__all__ = ["PgLeaderLock", "pg_step_lock"]

log = logging.getLogger(__name__)

#: Advisory locks are keyed by two int4s; the first says "meshca" ("msca" as ASCII).
_NAMESPACE = int.from_bytes(b"msca", "big")
STEP_LOCK = 1
LEADER_LOCK = 2


def _dedicated(engine: Engine) -> Connection:
    # Autocommit: the lock is the session's, and no transaction should sit open under it.
    return engine.connect().execution_options(isolation_level="AUTOCOMMIT")


@contextlib.contextmanager
def pg_step_lock(engine: Engine) -> Iterator[None]:
    """Hold the CA's step lock: wait for it, release it after the step (or with the session)."""
    try:
        connection = _dedicated(engine)
        connection.execute(text("SELECT pg_advisory_lock(:ns, :key)"), _key(STEP_LOCK))
    except SQLAlchemyError as error:
        raise BackendUnavailable(f"cannot take the CA step lock: {error_summary(error)}") from error
    try:
        yield
    finally:
        try:
            connection.execute(text("SELECT pg_advisory_unlock(:ns, :key)"), _key(STEP_LOCK))
            connection.close()
        except SQLAlchemyError:
            # The session is gone, and the lock with it; never hand this one back.
            connection.invalidate()


class PgLeaderLock:
    """Whoever holds this runs the rotator and signs tree heads; the others follow.

    ``held()`` checks that the holding session is still alive, and otherwise tries to
    take the lock, so when the leader dies another replica takes over on its next poll.
    Blocking (one round trip): call it off the event loop.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._connection: Connection | None = None
        # The rotator and the log's maintenance ask from their own threads.
        self._guard = threading.Lock()

    def held(self) -> bool:
        with self._guard:
            return self._held()

    def _held(self) -> bool:
        try:
            if self._connection is not None:
                self._connection.execute(text("SELECT 1"))
                return True
            connection = _dedicated(self._engine)
        except SQLAlchemyError as error:
            self._lose(f"the leader's session ended: {error_summary(error)}")
            return False
        try:
            won = connection.execute(
                text("SELECT pg_try_advisory_lock(:ns, :key)"), _key(LEADER_LOCK)
            ).scalar()
        except SQLAlchemyError:
            connection.invalidate()
            return False
        if not won:
            connection.close()
            return False
        log.info("this process leads CA rotation and tree-head signing")
        self._connection = connection
        return True

    def release(self) -> None:
        with self._guard:
            self._release()

    def _release(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(SQLAlchemyError):
                self._connection.execute(
                    text("SELECT pg_advisory_unlock(:ns, :key)"), _key(LEADER_LOCK)
                )
            self._close()

    def _lose(self, why: str) -> None:
        if self._connection is not None:
            log.warning("lost CA leadership: %s", why)
            self._connection.invalidate()
            self._connection = None

    def _close(self) -> None:
        assert self._connection is not None
        with contextlib.suppress(SQLAlchemyError):
            self._connection.close()
        self._connection = None


def _key(which: int) -> dict[str, int]:
    return {"ns": _NAMESPACE, "key": which}
