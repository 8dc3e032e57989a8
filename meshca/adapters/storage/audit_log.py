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
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, RowMapping, Select, select
from sqlalchemy.exc import SQLAlchemyError

from meshca.adapters.storage.engine import error_summary
from meshca.adapters.storage.group_commit import GroupCommitWriter
from meshca.adapters.storage.tables import IssuanceRecordRow
from meshca.adapters.storage.transparency import assign_leaves
from meshca.core.audit import AuditRecord, Outcome, leaf_body
from meshca.core.errors import BackendUnavailable, InternalError

__all__ = ["SqlAuditLog", "row_to_record", "storable"]


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

    def __init__(self, engine: Engine, *, max_batch: int = 256, max_wait: float = 0.002) -> None:
        self._engine = engine
        self._writer = GroupCommitWriter(
            engine,
            IssuanceRecordRow.__table__,  # type: ignore[arg-type]
            what="issuance record",
            max_batch=max_batch,
            max_wait=max_wait,
            thread_name="meshca-audit-writer",
            # Each record becomes the log's next leaf inside its write transaction.
            prepare=assign_leaves,
        )

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
        row = _to_row(record)
        # Encoded here, off the writer's lock; the writer only prefixes the leaf index.
        row["leaf_body"] = leaf_body(row_to_record(row))
        await self._writer.write(row)

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


# -- rows <-> records ----------------------------------------------------------------------


def storable(text: str) -> str:
    """``text`` with what PostgreSQL or UTF-8 cannot store written as backslash escapes."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _optional(text: str | None) -> str | None:
    return None if text is None else storable(text)


def _aware(name: str, value: datetime | None) -> datetime | None:
    if value is not None and value.utcoffset() is None:
        raise InternalError(f"audit record field {name} is a naive datetime: {value.isoformat()}")
    return value


def _to_row(record: AuditRecord) -> dict[str, Any]:
    return {
        "time": _aware("time", record.time),
        "outcome": Outcome(record.outcome).value,
        "api": storable(record.api),
        "reason": storable(record.reason),
        "detail": storable(record.detail),
        "spiffe_id": _optional(record.spiffe_id),
        "serial": _optional(record.serial),
        "fingerprint_sha256": _optional(record.fingerprint_sha256),
        "not_before": _aware("not_before", record.not_before),
        "not_after": _aware("not_after", record.not_after),
        "namespace": _optional(record.namespace),
        "service_account": _optional(record.service_account),
        "pod_name": _optional(record.pod_name),
        "pod_uid": _optional(record.pod_uid),
        "node_name": _optional(record.node_name),
        "peer": _optional(record.peer),
        "csr_sha256": _optional(record.csr_sha256),
    }


def row_to_record(row: Mapping[str, Any] | RowMapping) -> AuditRecord:
    """The record a stored row (or a row about to be stored) holds."""
    return AuditRecord(
        time=row["time"],
        outcome=Outcome(row["outcome"]),
        api=row["api"],
        reason=row["reason"],
        detail=row["detail"],
        spiffe_id=row["spiffe_id"],
        serial=row["serial"],
        fingerprint_sha256=row["fingerprint_sha256"],
        not_before=row["not_before"],
        not_after=row["not_after"],
        namespace=row["namespace"],
        service_account=row["service_account"],
        pod_name=row["pod_name"],
        pod_uid=row["pod_uid"],
        node_name=row["node_name"],
        peer=row["peer"],
        csr_sha256=row["csr_sha256"],
    )
