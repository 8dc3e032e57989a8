"""Queries over the issuance record: filters, cursor pagination, newest first.

Every filter value is a bound parameter. Text filters compare for equality; a SPIFFE ID
prefix is an index range ``[prefix, successor(prefix))`` over a column that sorts
bytewise on both databases, so ``%``, ``_`` and backslashes are ordinary characters and
SQLite and PostgreSQL return the same rows in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, or_, select, tuple_
from sqlalchemy.exc import SQLAlchemyError

from meshca.adapters.storage.engine import error_summary
from meshca.adapters.storage.record_rows import row_to_record, storable
from meshca.adapters.storage.tables import IssuanceRecordRow
from meshca.core.audit import (
    AuditPage,
    AuditQuery,
    LogEntry,
    decode_cursor,
    encode_cursor,
)
from meshca.core.errors import BackendUnavailable

__all__ = ["SqlAuditReader", "prefix_successor"]

_R = IssuanceRecordRow
_MAX_CODE_POINT = 0x10FFFF
_SURROGATES = range(0xD800, 0xE000)


def prefix_successor(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (code point order,
    which is UTF-8 byte order); None when there is none (all U+10FFFF)."""
    chars = list(prefix)
    while chars:
        last = ord(chars.pop()) + 1
        if last in _SURROGATES:
            last = _SURROGATES.stop
        if last <= _MAX_CODE_POINT:
            return "".join(chars) + chr(last)
    return None


def _conditions(query: AuditQuery) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    exact = (
        (_R.spiffe_id, query.spiffe_id),
        (_R.namespace, query.namespace),
        (_R.service_account, query.service_account),
        (_R.serial, query.serial),
        (_R.fingerprint_sha256, query.fingerprint),
        (_R.api, query.api),
    )
    for column, value in exact:
        if value is not None:
            where.append(column == storable(value))
    if query.spiffe_id_prefix is not None:
        prefix = storable(query.spiffe_id_prefix)
        where.append(_R.spiffe_id >= prefix)
        upper = prefix_successor(prefix)
        if upper is not None:
            where.append(_R.spiffe_id < upper)
    if query.pod is not None:
        pod = storable(query.pod)
        where.append(or_(_R.pod_name == pod, _R.pod_uid == pod))
    if query.outcome is not None:
        where.append(_R.outcome == query.outcome.value)
    if query.since is not None:
        where.append(_R.time >= query.since)
    if query.until is not None:
        where.append(_R.time < query.until)
    if query.cursor is not None:
        time, leaf_index = decode_cursor(query.cursor)
        # Row-value comparison: one index range on (time, leaf_index) on both databases.
        where.append(tuple_(_R.time, _R.leaf_index) < tuple_(time, leaf_index))
    return where


class SqlAuditReader:
    """Reads the issuance record. Blocking: call from a thread.

    Raises ``BackendUnavailable`` when the database cannot be read and
    ``InvalidRequest`` for a cursor this reader did not write.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def query(self, query: AuditQuery) -> AuditPage:
        """Up to ``query.limit`` entries, newest first (time, then leaf index)."""
        statement = (
            select(_R)
            .where(and_(True, *_conditions(query)))
            .order_by(_R.time.desc(), _R.leaf_index.desc())
            .limit(query.limit + 1)
        )
        rows = self._rows(statement)
        entries = tuple(_entry(row) for row in rows[: query.limit])
        more = len(rows) > query.limit
        cursor = (
            encode_cursor(entries[-1].record.time, entries[-1].leaf_index)
            if more and entries
            else None
        )
        return AuditPage(entries=entries, next_cursor=cursor)

    def export(self, query: AuditQuery) -> Iterator[LogEntry]:
        """Every matching entry, newest first, read a page (``query.limit``) at a time."""
        page = self.query(query)
        while True:
            yield from page.entries
            if page.next_cursor is None:
                return
            page = self.query(_replace_cursor(query, page.next_cursor))

    def get(self, *, serial: str | None = None, leaf_index: int | None = None) -> LogEntry | None:
        """The entry with this serial (the newest, should a serial repeat) or leaf index."""
        statement = select(_R).order_by(_R.leaf_index.desc()).limit(1)
        if serial is not None:
            statement = statement.where(_R.serial == storable(serial))
        if leaf_index is not None:
            statement = statement.where(_R.leaf_index == leaf_index)
        rows = self._rows(statement)
        return _entry(rows[0]) if rows else None

    def leaves(self, start: int, limit: int) -> Sequence[LogEntry]:
        """Up to ``limit`` stored entries from leaf ``start`` on, in leaf order."""
        statement = select(_R).where(_R.leaf_index >= start).order_by(_R.leaf_index).limit(limit)
        return tuple(_entry(row) for row in self._rows(statement))

    def leaf_hash(self, leaf_index: int) -> bytes | None:
        """The leaf hash stored with ``leaf_index``."""
        statement = select(_R.leaf_hash).where(_R.leaf_index == leaf_index)
        try:
            with self._engine.connect() as connection:
                value = connection.execute(statement).scalar_one_or_none()
        except SQLAlchemyError as error:
            raise self._unavailable(error) from error
        return None if value is None else bytes(value)

    def _rows(self, statement: Any) -> list[Any]:
        try:
            with self._engine.connect() as connection:
                return list(connection.execute(statement).mappings())
        except SQLAlchemyError as error:
            raise self._unavailable(error) from error

    def _unavailable(self, error: SQLAlchemyError) -> BackendUnavailable:
        summary = error_summary(error, secret=self._engine.url.password)
        return BackendUnavailable(f"cannot read the issuance record: {summary}")


def _entry(row: Any) -> LogEntry:
    return LogEntry(leaf_index=int(row["leaf_index"]), record=row_to_record(row))


def _replace_cursor(query: AuditQuery, cursor: str) -> AuditQuery:
    from dataclasses import replace

    return replace(query, cursor=cursor)
