"""Issuance records as stored rows, and the one insert of a batch of them.

Readers (queries, the verifiable log) and writers (the in-process group commit, the
host's record writer) share this module, so neither side imports the other.

``insert_records`` is the hot write: inside the caller's transaction it reserves the
batch's leaf indexes (``UPDATE log_state ... RETURNING``, which also takes the log's
lock), hashes each leaf and inserts every row with one ``executemany`` of plain SQL.
Values are converted here as SQLAlchemy's column types would store them, so rows
written this way read back through the ORM unchanged (a test checks both ways).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, RowMapping, func, select
from sqlalchemy.dialects import postgresql, sqlite

from meshca.adapters.storage.tables import IssuanceRecordRow, LogStateRow
from meshca.core.audit import AuditRecord, Outcome, leaf_body, leaf_data, record_times
from meshca.core.errors import InternalError
from meshca.core.merkle import leaf_hash

__all__ = ["LOG_STATE_ID", "insert_records", "row_to_record", "storable", "stored_record"]

LOG_STATE_ID = 1

_TEXT_FIELDS = (
    "api",
    "reason",
    "detail",
    "spiffe_id",
    "serial",
    "fingerprint_sha256",
    "namespace",
    "service_account",
    "pod_name",
    "pod_uid",
    "node_name",
    "peer",
    "csr_sha256",
)
_TIME_FIELDS = ("time", "not_before", "not_after")
# Column order of the insert: the log's two columns, then every record field.
_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(AuditRecord))
_COLUMNS = ("leaf_index", "leaf_hash", *_RECORD_FIELDS)


def storable(text: str) -> str:
    """``text`` with what PostgreSQL or UTF-8 cannot store written as backslash escapes."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def stored_record(record: AuditRecord) -> AuditRecord:
    """``record`` as it will be stored: storable text; raises ``InternalError`` for a
    naive datetime, which has no place in the record."""
    changes: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        value = getattr(record, name)
        if value is not None and storable(value) is not value:
            changes[name] = storable(value)
    for name in _TIME_FIELDS:
        value = getattr(record, name)
        if value is not None and value.utcoffset() is None:
            raise InternalError(
                f"audit record field {name} is a naive datetime: {value.isoformat()}"
            )
    outcome = Outcome(record.outcome)
    if outcome is not record.outcome:
        changes["outcome"] = outcome
    return dataclasses.replace(record, **changes) if changes else record


def row_to_record(row: Mapping[str, Any] | RowMapping) -> AuditRecord:
    """The record a stored row holds."""
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


def insert_records(connection: Connection, records: Sequence[AuditRecord]) -> None:
    """Append ``records`` (already ``stored_record``) to the log, in the caller's transaction.

    Each gets the next leaf index, in order, and its leaf hash.
    """
    if not records:
        return
    start = reserve_leaves(connection, len(records))
    sqlite_times = connection.dialect.name == "sqlite"
    rows = []
    for offset, r in enumerate(records):
        index = start + offset
        # Each time is formatted once, for the leaf and (on SQLite) for its column.
        times = record_times(r)
        stored: tuple[Any, Any, Any] = (
            (_sqlite_time(times[0]), _sqlite_time(times[1]), _sqlite_time(times[2]))
            if sqlite_times
            else (r.time, r.not_before, r.not_after)
        )
        time, not_before, not_after = stored
        # Column by column in _COLUMNS order: this runs for every record of the log.
        rows.append(
            (
                index,
                leaf_hash(leaf_data(index, leaf_body(r, times))),
                time,
                r.outcome.value,
                r.api,
                r.reason,
                r.detail,
                r.spiffe_id,
                r.serial,
                r.fingerprint_sha256,
                not_before,
                not_after,
                r.namespace,
                r.service_account,
                r.pod_name,
                r.pod_uid,
                r.node_name,
                r.peer,
                r.csr_sha256,
            )
        )
    connection.exec_driver_sql(_insert_sql(connection), rows)


def reserve_leaves(connection: Connection, count: int) -> int:
    """Reserve ``count`` leaf indexes and lock the log to commit; returns the first."""
    end = _reserve(connection, count)
    if end is None:
        _create_state(connection)
        end = _reserve(connection, count)
        assert end is not None
    return end - count


def _sqlite_time(encoded: str | None) -> str | None:
    """What SQLAlchemy's SQLite DATETIME stores, from ``encode_time``'s text: naive UTC
    ``YYYY-MM-DD HH:MM:SS.ffffff``, which sorts as time does."""
    return None if encoded is None else f"{encoded[:10]} {encoded[11:-1]}"


def _insert_sql(connection: Connection) -> str:
    marker = "?" if connection.dialect.paramstyle == "qmark" else "%s"
    table = IssuanceRecordRow.__tablename__
    # Table and column names are this module's constants; values are bound parameters.
    return (
        f"INSERT INTO {table} ({', '.join(_COLUMNS)}) "  # noqa: S608
        f"VALUES ({', '.join(marker for _ in _COLUMNS)})"
    )


def _reserve(connection: Connection, count: int) -> int | None:
    # Plain SQL, like the insert: building the ORM statement cost more than running it.
    marker = "?" if connection.dialect.paramstyle == "qmark" else "%s"
    table = LogStateRow.__tablename__
    value = connection.exec_driver_sql(
        f"UPDATE {table} SET tree_size = tree_size + {marker} "  # noqa: S608
        f"WHERE id = {LOG_STATE_ID} RETURNING tree_size",
        (count,),
    ).scalar_one_or_none()
    return None if value is None else int(value)


def _create_state(connection: Connection) -> None:
    """The state row, for a schema made without migrations; resumes after existing leaves."""
    next_index = connection.execute(
        select(func.coalesce(func.max(IssuanceRecordRow.leaf_index) + 1, 0))
    ).scalar_one()
    values = {"id": LOG_STATE_ID, "tree_size": int(next_index), "pruned_below": 0}
    upsert = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
    connection.execute(upsert(LogStateRow).values(values).on_conflict_do_nothing())
