"""The certificates a deny-list revokes, read from the issuance log's ISSUED records.

``revoked_leaves`` answers ``core.crl``'s question "which unexpired certificates do the
standing entries name?" with one query per kind of entry, each bounded to one more row
than a CRL may list (the caller refuses beyond the bound; it never truncates).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, or_, select
from sqlalchemy.exc import SQLAlchemyError

from meshca.adapters.storage.audit_query import prefix_successor
from meshca.adapters.storage.engine import error_summary
from meshca.adapters.storage.tables import IssuanceRecordRow
from meshca.core.audit import Outcome
from meshca.core.crl import MAX_CRL_ENTRIES, RevokedLeaf
from meshca.core.denylist import DenyEntry, DenyKind, DenyList
from meshca.core.errors import BackendUnavailable

__all__ = ["SqlRevokedLeaves"]

_R = IssuanceRecordRow
#: Values per IN list / OR group, so a long deny-list makes several small queries.
_BATCH = 500


class SqlRevokedLeaves:
    """``RevokedLeafSource`` over the issuance log. Blocking; ``BackendUnavailable``
    when the database cannot be read."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def revoked_leaves(
        self, deny_list: DenyList, now: datetime, limit: int = MAX_CRL_ENTRIES + 1
    ) -> tuple[RevokedLeaf, ...]:
        """Unexpired issued certificates named by ``deny_list``'s entries standing at
        ``now``; at most ``limit`` (a caller seeing ``limit`` knows there may be more)."""
        standing = [e for e in deny_list.standing(now) if e.kind is not DenyKind.KEY_SHA256]
        found: dict[tuple[str, int], RevokedLeaf] = {}
        try:
            with self._engine.connect() as connection:
                for batch in _batches(standing):
                    condition = or_(*(_names(e) for e in batch))
                    rows = connection.execute(
                        select(_R.serial, _R.spiffe_id, _R.time, _R.not_after)
                        .where(
                            _R.outcome == Outcome.ISSUED.value,
                            _R.serial.is_not(None),
                            _R.not_after > now,
                            condition,
                        )
                        .order_by(_R.leaf_index)
                        .limit(limit)
                    ).all()
                    for row in rows:
                        for entry in batch:
                            if _matches(entry, row):
                                found[(row.serial, entry.id)] = RevokedLeaf(
                                    serial=row.serial,
                                    issued_at=row.time,
                                    not_after=row.not_after,
                                    revoked_at=entry.created_at,
                                    entry_id=entry.id,
                                    entry_kind=entry.kind,
                                )
                    if len({serial for serial, _ in found}) >= limit:
                        break
        except SQLAlchemyError as error:
            summary = error_summary(error, secret=self._engine.url.password)
            raise BackendUnavailable(f"cannot read revoked certificates: {summary}") from error
        return tuple(sorted(found.values(), key=lambda leaf: (leaf.serial, leaf.entry_id)))


def _batches(entries: Sequence[DenyEntry]) -> list[list[DenyEntry]]:
    return [list(entries[i : i + _BATCH]) for i in range(0, len(entries), _BATCH)]


def _names(entry: DenyEntry) -> ColumnElement[bool]:
    match entry.kind:
        case DenyKind.SERIAL:
            return _R.serial == entry.value
        case DenyKind.SPIFFE_ID:
            return _R.spiffe_id == entry.value
        case _:
            under = entry.value + "/"
            upper = prefix_successor(under)
            within = (
                _R.spiffe_id >= under
                if upper is None
                else and_(_R.spiffe_id >= under, _R.spiffe_id < upper)
            )
            return or_(_R.spiffe_id == entry.value, within)


def _matches(entry: DenyEntry, row: Any) -> bool:
    match entry.kind:
        case DenyKind.SERIAL:
            return bool(row.serial == entry.value)
        case DenyKind.SPIFFE_ID:
            return bool(row.spiffe_id == entry.value)
        case _:
            spiffe_id = row.spiffe_id or ""
            return spiffe_id == entry.value or spiffe_id.startswith(entry.value + "/")
