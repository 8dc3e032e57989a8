"""The decision log over SQLAlchemy: ``DecisionLog`` with group commit, and its queries.

Recording never makes a proxy wait: ``record`` queues the row for the shared group-commit
writer and returns. Rows that cannot be written are logged and counted, as are rows
dropped when too many are queued (``counters``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Select, insert, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from meshca.adapters.storage.engine import error_summary
from meshca.adapters.storage.group_commit import GroupCommitWriter, WriterCounters
from meshca.adapters.storage.record_rows import storable
from meshca.adapters.storage.tables import DecisionRecordRow
from meshca.core.errors import BackendUnavailable, InternalError
from meshca.core.policy import DecisionRecord

__all__ = ["SqlDecisionLog", "record_from_dict", "record_to_dict"]

log = logging.getLogger(__name__)


def _storable(text: str | None) -> str | None:
    """``text`` with NUL and lone surrogates (which PostgreSQL cannot hold) escaped."""
    return None if text is None else storable(text)


def _to_row(record: DecisionRecord) -> dict[str, Any]:
    if record.time.utcoffset() is None:
        raise InternalError(f"decision record time is a naive datetime: {record.time}")
    return {
        "time": record.time,
        "api": _storable(record.api),
        "allowed": record.allowed,
        "reason": _storable(record.reason),
        "version": _storable(record.version),
        "policy": _storable(record.policy),
        "rule": record.rule,
        "source_principal": _storable(record.source_principal),
        "destination_principal": _storable(record.destination_principal),
        "method": _storable(record.method),
        "path": _storable(record.path),
        "host": _storable(record.host),
        "headers": _storable(json.dumps(dict(record.headers), sort_keys=True)),
        "source_ip": _storable(record.source_ip),
        "destination_ip": _storable(record.destination_ip),
        "destination_port": record.destination_port,
        "sni": _storable(record.sni),
        "request_id": _storable(record.request_id),
        "audit": _storable(",".join(record.audit)),
        "detail": _storable(record.detail),
    }


def _to_record(row: DecisionRecordRow) -> DecisionRecord:
    try:
        headers = json.loads(row.headers) if row.headers else {}
    except ValueError:
        headers = {}
    return DecisionRecord(
        time=row.time,
        api=row.api,
        allowed=bool(row.allowed),
        reason=row.reason,
        version=row.version,
        policy=row.policy,
        rule=row.rule,
        source_principal=row.source_principal,
        destination_principal=row.destination_principal,
        method=row.method,
        path=row.path,
        host=row.host,
        headers=headers if isinstance(headers, dict) else {},
        source_ip=row.source_ip,
        destination_ip=row.destination_ip,
        destination_port=row.destination_port,
        sni=row.sni,
        request_id=row.request_id,
        audit=tuple(a for a in row.audit.split(",") if a),
        detail=row.detail,
    )


def record_to_dict(record: DecisionRecord) -> dict[str, Any]:
    """A record as JSON-ready values (``meshca audit decisions --format json``)."""
    return {
        "time": record.time.isoformat(),
        "api": record.api,
        "allowed": record.allowed,
        "reason": record.reason,
        "version": record.version,
        "policy": record.policy,
        "rule": record.rule,
        "source_principal": record.source_principal,
        "destination_principal": record.destination_principal,
        "method": record.method,
        "path": record.path,
        "host": record.host,
        "headers": dict(record.headers),
        "source_ip": record.source_ip,
        "destination_ip": record.destination_ip,
        "destination_port": record.destination_port,
        "sni": record.sni,
        "request_id": record.request_id,
        "audit": list(record.audit),
        "detail": record.detail,
    }


def record_from_dict(data: Mapping[str, Any]) -> DecisionRecord:
    """The inverse of ``record_to_dict``; raises ValueError for a malformed entry."""
    try:
        headers = data.get("headers") or {}
        if not isinstance(headers, dict):
            raise ValueError("headers is not an object")
        port = data.get("destination_port")
        return DecisionRecord(
            time=datetime.fromisoformat(str(data["time"])),
            api=str(data.get("api", "")),
            allowed=bool(data["allowed"]),
            reason=str(data.get("reason", "")),
            version=str(data.get("version", "")),
            policy=data.get("policy"),
            rule=data.get("rule"),
            source_principal=data.get("source_principal"),
            destination_principal=data.get("destination_principal"),
            method=str(data.get("method") or ""),
            path=str(data.get("path") or "/"),
            host=str(data.get("host") or ""),
            headers={str(k): str(v) for k, v in headers.items()},
            source_ip=data.get("source_ip"),
            destination_ip=data.get("destination_ip"),
            destination_port=int(port) if port is not None else None,
            sni=data.get("sni"),
            request_id=data.get("request_id"),
            audit=tuple(data.get("audit") or ()),
            detail=str(data.get("detail") or ""),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a decision record: {exc}") from None


def _insert_rows(connection: Connection, rows: list[dict[str, Any]]) -> None:
    connection.execute(insert(DecisionRecordRow), rows)


class SqlDecisionLog:
    """``DecisionLog`` over a SQLAlchemy engine; the engine stays the caller's."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int = 512,
        max_wait: float = 0.005,
        max_queued: int = 100_000,
    ) -> None:
        self._engine = engine
        self._writer = GroupCommitWriter(
            engine,
            _insert_rows,
            what="decision record",
            max_batch=max_batch,
            max_wait=max_wait,
            max_unawaited=max_queued,
            thread_name="meshca-decision-writer",
        )

    def record(self, record: DecisionRecord) -> None:
        """Queue ``record``; returns at once. Never raises."""
        try:
            row = _to_row(record)
        except InternalError as error:
            log.error("decision record not written: %s", error.message)
            return
        self._writer.submit(row)

    @property
    def counters(self) -> WriterCounters:
        return self._writer.counters

    async def list(
        self,
        *,
        limit: int = 50,
        denied_only: bool = False,
        policy: str | None = None,
        destination: str | None = None,
        source: str | None = None,
    ) -> Sequence[DecisionRecord]:
        """Up to ``limit`` records, newest first, filtered by exact values."""
        if limit < 1:
            return ()
        statement = (
            select(DecisionRecordRow)
            .order_by(DecisionRecordRow.time.desc(), DecisionRecordRow.id.desc())
            .limit(limit)
        )
        if denied_only:
            statement = statement.where(DecisionRecordRow.allowed.is_(False))
        if policy is not None:
            statement = statement.where(DecisionRecordRow.policy == policy)
        if destination is not None:
            statement = statement.where(DecisionRecordRow.destination_principal == destination)
        if source is not None:
            statement = statement.where(DecisionRecordRow.source_principal == source)
        return await asyncio.to_thread(self._select, statement)

    def _select(self, statement: Select[DecisionRecordRow]) -> Sequence[DecisionRecord]:
        try:
            with Session(self._engine) as session:
                return tuple(_to_record(row) for row in session.scalars(statement))
        except SQLAlchemyError as error:
            raise BackendUnavailable(
                "cannot read the decision record: "
                f"{error_summary(error, secret=self._engine.url.password)}"
            ) from error

    def close(self) -> None:
        """Write what is queued, then stop the writer. Idempotent."""
        self._writer.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)
