"""The deny-list in the database: ``deny_entry`` rows, each change also a log record.

``add`` and ``lift`` write the entry and its issuance-log record in one transaction
(``record_rows.insert_records`` takes the log's lock), so an entry exists exactly when
its record does, and ``revision`` (the leaf index of the latest change) grows with every
change in commit order. ``revision`` and ``load`` are what servers poll
(``service.deny_list.DenyListFollower``).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from meshca.adapters.storage.engine import error_summary, write_gate
from meshca.adapters.storage.record_rows import LOG_STATE_ID, insert_records, stored_record
from meshca.adapters.storage.tables import DenyEntryRow, LogStateRow
from meshca.core.denylist import (
    DenyEntry,
    DenyKind,
    DenyList,
    DenyRequest,
    lift_record,
    revoke_record,
)
from meshca.core.errors import BackendUnavailable, InvalidRequest

__all__ = ["SqlDenyList"]


class SqlDenyList:
    """``DenyListSource`` over SQLAlchemy, and the writes ``meshca revoke`` makes.

    Every method raises ``BackendUnavailable`` when the database cannot be used (a
    schema from before the deny-list included: the message says to upgrade it).
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    # -- reading (servers poll these) -----------------------------------------------------

    def revision(self) -> int:
        """The leaf index of the latest change's record; -1 when there was none."""
        try:
            with self._engine.connect() as connection:
                value = connection.execute(select(func.max(DenyEntryRow.revision))).scalar()
        except SQLAlchemyError as error:
            raise self._unavailable("cannot read the deny-list", error) from error
        return -1 if value is None else int(value)

    def load(self) -> DenyList:
        """Every entry not lifted, with the revision of the same read."""
        rows = self._rows(select(DenyEntryRow))
        revision = max((int(r.revision) for r in rows), default=-1)
        return DenyList(
            revision=revision,
            entries=tuple(_entry(r) for r in rows if r.lifted_at is None),
        )

    def entries(self) -> tuple[DenyEntry, ...]:
        """Every entry ever added, lifted ones too, by id."""
        return tuple(_entry(r) for r in self._rows(select(DenyEntryRow).order_by(DenyEntryRow.id)))

    def get(self, entry_id: int) -> DenyEntry | None:
        rows = self._rows(select(DenyEntryRow).where(DenyEntryRow.id == entry_id))
        return _entry(rows[0]) if rows else None

    # -- writing (meshca revoke) ----------------------------------------------------------

    def add(self, request: DenyRequest, now: datetime) -> DenyEntry:
        """Store ``request`` as a new entry and append its ``revoke_record`` to the log."""
        try:
            with write_gate(self._engine), self._engine.begin() as connection:
                entry_id = connection.execute(
                    insert(DenyEntryRow)
                    .values(
                        kind=str(request.kind),
                        value=request.value,
                        reason=request.reason,
                        requested_by=request.requested_by,
                        created_at=now,
                        until=request.until,
                        revision=-1,
                    )
                    .returning(DenyEntryRow.id)
                ).scalar_one()
                entry = DenyEntry(
                    id=int(entry_id),
                    kind=request.kind,
                    value=request.value,
                    reason=request.reason,
                    requested_by=request.requested_by,
                    created_at=now,
                    until=request.until,
                )
                leaf = _append(connection, revoke_record(entry))
                connection.execute(
                    update(DenyEntryRow)
                    .where(DenyEntryRow.id == entry.id)
                    .values(leaf_index=leaf, revision=leaf)
                )
        except SQLAlchemyError as error:
            raise self._unavailable("cannot add to the deny-list", error) from error
        return replace(entry, leaf_index=leaf)

    def lift(self, entry_id: int, lifted_by: str, reason: str, now: datetime) -> DenyEntry:
        """Lift entry ``entry_id`` and append its ``lift_record`` to the log.

        Raises ``InvalidRequest`` for an unknown or already lifted entry. Of two
        concurrent lifts of one entry, exactly one succeeds.
        """
        try:
            with write_gate(self._engine), self._engine.begin() as connection:
                # The conditional update locks the row: a concurrent lift waits, then
                # finds it lifted and changes nothing.
                changed = connection.execute(
                    update(DenyEntryRow)
                    .where(DenyEntryRow.id == entry_id, DenyEntryRow.lifted_at.is_(None))
                    .values(lifted_at=now, lifted_by=lifted_by)
                ).rowcount
                row = connection.execute(
                    select(DenyEntryRow).where(DenyEntryRow.id == entry_id)
                ).first()
                if row is None:
                    raise InvalidRequest(f"no deny-list entry {entry_id}", reason="unknown-entry")
                entry = _entry(row)
                if changed != 1:
                    raise InvalidRequest(
                        f"deny-list entry {entry_id} was already lifted at "
                        f"{_stamp(entry.lifted_at)} by {entry.lifted_by}",
                        reason="already-lifted",
                    )
                leaf = _append(connection, lift_record(entry, lifted_by, reason, now))
                connection.execute(
                    update(DenyEntryRow).where(DenyEntryRow.id == entry_id).values(revision=leaf)
                )
        except SQLAlchemyError as error:
            raise self._unavailable("cannot lift the deny-list entry", error) from error
        return entry

    # -- internals ------------------------------------------------------------------------

    def _rows(self, statement: Any) -> list[Any]:
        try:
            with self._engine.connect() as connection:
                return list(connection.execute(statement).all())
        except SQLAlchemyError as error:
            raise self._unavailable("cannot read the deny-list", error) from error

    def _unavailable(self, what: str, error: BaseException) -> BackendUnavailable:
        summary = error_summary(error, secret=self._engine.url.password)
        if "deny_entry" in summary and ("no such table" in summary or "does not exist" in summary):
            summary = "the database has no deny-list yet: run 'meshca db upgrade'"
        return BackendUnavailable(f"{what}: {summary}")


def _append(connection: Connection, record: Any) -> int:
    """Append ``record`` to the log in this transaction; returns its leaf index."""
    insert_records(connection, [stored_record(record)])
    # The log's lock is held to commit: the last reserved index is this record's.
    size = connection.execute(
        select(LogStateRow.tree_size).where(LogStateRow.id == LOG_STATE_ID)
    ).scalar_one()
    return int(size) - 1


def _stamp(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%SZ")


def _entry(row: Any) -> DenyEntry:
    return DenyEntry(
        id=int(row.id),
        kind=DenyKind(row.kind),
        value=row.value,
        reason=row.reason,
        requested_by=row.requested_by,
        created_at=row.created_at,
        until=row.until,
        lifted_at=row.lifted_at,
        lifted_by=row.lifted_by,
        leaf_index=None if row.leaf_index is None else int(row.leaf_index),
    )
