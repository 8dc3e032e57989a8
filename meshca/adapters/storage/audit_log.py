"""The issuance record over SQLAlchemy, with group commit.

``append`` hands its record to one writer thread per store. The writer takes whatever is
queued (up to ``max_batch`` records, waiting at most ``max_wait`` seconds for more once
it has one), writes it in one transaction and only then wakes each waiting caller on its
own event loop. Many concurrent appends therefore share one commit, and so one fsync,
while each caller still returns only after its own record is durable. The mechanism is
``group_commit.GroupCommitWriter``, shared with the decision log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from sqlalchemy import Engine, Select, select
from sqlalchemy.exc import SQLAlchemyError

from meshca.adapters.storage.engine import error_summary
from meshca.adapters.storage.group_commit import GroupCommitWriter
from meshca.adapters.storage.record_rows import (
    insert_records,
    row_to_record,
    storable,
    stored_record,
)
from meshca.adapters.storage.tables import IssuanceRecordRow
from meshca.core.audit import AuditRecord
from meshca.core.errors import BackendUnavailable

__all__ = ["SqlAuditLog"]


class SqlAuditLog:
    """``AuditLog`` over a SQLAlchemy engine (SQLite or PostgreSQL), with group commit.

    ``append`` returns only after the transaction holding its record has committed, and
    raises ``BackendUnavailable`` if that transaction failed. A failed batch fails every
    record in it, except that on an error other than a lost or locked database the
    records are retried one per transaction, so one unstorable record cannot fail its
    neighbours. The writer keeps running after failures and serves later appends once the
    database is back. (The batching is ``GroupCommitWriter``'s.)

    Appends may come from any number of event loops and threads. Several stores, in one
    process or many, may write the same database. Create a store per process after any
    fork: the writer thread does not survive one. The engine stays the caller's to dispose
    of, after ``close``.

    Text is stored as given, except that NUL characters and unpaired surrogates, which
    PostgreSQL (or UTF-8) cannot hold, are written as backslash escapes; the same is done
    to filter values so that they still match.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int = 256,
        max_wait: float = 0.002,
        on_commit: Callable[[int, int], None] | None = None,
    ) -> None:
        self._engine = engine
        self._writer = GroupCommitWriter(
            engine,
            # Each record becomes the log's next leaf inside its write transaction.
            insert_records,
            what="issuance record",
            max_batch=max_batch,
            max_wait=max_wait,
            thread_name="meshca-audit-writer",
            on_commit=on_commit,
        )

    @property
    def write_failures(self) -> int:
        """Appends that raised (their records not committed) since this store was made."""
        return self._writer.counters.failed

    @property
    def writer_problem(self) -> str | None:
        """Why nothing can be appended now (closed, writer thread gone); else None."""
        return self._writer.problem

    def start(self) -> None:
        """Start the writer thread now rather than on the first ``append``.

        Raises ``BackendUnavailable`` after ``close``.
        """
        self._writer.start()

    async def append(self, record: AuditRecord) -> None:
        """Return only once ``record`` is durably committed.

        Raises ``BackendUnavailable`` if it was not (or the store is closed) and
        ``InternalError`` for a naive datetime in ``record``. Cancelling the caller does
        not withdraw a record that is already queued.
        """
        await self._writer.write(stored_record(record))

    async def list(
        self,
        *,
        limit: int = 50,
        spiffe_id: str | None = None,
        serial: str | None = None,
    ) -> Sequence[AuditRecord]:
        """Up to ``limit`` records, newest first, filtered by exact SPIFFE ID and serial.

        Filter values are bound parameters compared for equality, never patterns. A
        ``limit`` below 1 returns nothing. Works after ``close`` while the engine is open.
        Raises ``BackendUnavailable`` if the database cannot be read.
        """
        if limit < 1:
            return ()
        statement = (
            select(IssuanceRecordRow)
            .order_by(IssuanceRecordRow.time.desc(), IssuanceRecordRow.leaf_index.desc())
            .limit(limit)
        )
        if spiffe_id is not None:
            statement = statement.where(IssuanceRecordRow.spiffe_id == storable(spiffe_id))
        if serial is not None:
            statement = statement.where(IssuanceRecordRow.serial == storable(serial))
        return await asyncio.to_thread(self._select, statement)

    def close(self) -> None:
        """Write every record already accepted, then stop the writer. Idempotent.

        Blocks until the queue is drained; from a coroutine, prefer ``aclose``. Appends
        after this raise ``BackendUnavailable``.
        """
        self._writer.close()

    async def aclose(self) -> None:
        """``close`` without blocking the event loop."""
        await asyncio.to_thread(self.close)

    # -- reading -------------------------------------------------------------------------

    def _select(self, statement: Select[IssuanceRecordRow]) -> Sequence[AuditRecord]:
        try:
            with self._engine.connect() as connection:
                rows = connection.execute(statement).mappings()
                return tuple(row_to_record(row) for row in rows)
        except SQLAlchemyError as error:
            raise BackendUnavailable(
                f"cannot read the issuance record: {_summary(error, self._engine)}"
            ) from error


def _summary(error: BaseException, engine: Engine) -> str:
    return error_summary(error, secret=engine.url.password)
