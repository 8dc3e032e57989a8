"""meshca.v1 audit messages <-> core values, both ways (server and CLI client)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from meshca.adapters.grpc._gen.meshca.v1 import audit_pb2
from meshca.core.audit import AuditQuery, AuditRecord, LogEntry, Outcome
from meshca.core.errors import InvalidRequest
from meshca.core.log import ConsistencyProof, InclusionProof, SignedTreeHead, TreeHead

__all__ = [
    "consistency_from_proto",
    "consistency_to_proto",
    "entry_from_proto",
    "entry_to_proto",
    "filter_to_proto",
    "head_from_proto",
    "head_to_proto",
    "inclusion_from_proto",
    "query_from_proto",
]

_OUTCOMES = {
    Outcome.ISSUED: audit_pb2.OUTCOME_ISSUED,
    Outcome.REFUSED: audit_pb2.OUTCOME_REFUSED,
    Outcome.REVOKED: audit_pb2.OUTCOME_REVOKED,
    Outcome.LIFTED: audit_pb2.OUTCOME_LIFTED,
}
_OUTCOMES_BACK = {value: key for key, value in _OUTCOMES.items()}
_TEXT_FIELDS = (
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
_FILTER_TEXT = (
    "spiffe_id",
    "spiffe_id_prefix",
    "namespace",
    "service_account",
    "pod",
    "serial",
    "fingerprint",
    "api",
)


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value.astimezone(UTC))
    return stamp


def _time(message: Any, name: str) -> datetime | None:
    if not message.HasField(name):
        return None
    stamp: Timestamp = getattr(message, name)
    return stamp.ToDatetime(tzinfo=UTC)


def entry_to_proto(entry: LogEntry) -> Any:
    record = entry.record
    fields: dict[str, Any] = {
        "time": _timestamp(record.time),
        "outcome": _OUTCOMES[Outcome(record.outcome)],
        "api": record.api,
        "reason": record.reason,
        "detail": record.detail,
    }
    for name in _TEXT_FIELDS:
        value = getattr(record, name)
        if value is not None:
            fields[name] = value
    for name in ("not_before", "not_after"):
        value = getattr(record, name)
        if value is not None:
            fields[name] = _timestamp(value)
    return audit_pb2.LogEntry(leaf_index=entry.leaf_index, record=audit_pb2.AuditRecord(**fields))


def entry_from_proto(message: Any) -> LogEntry:
    record = message.record
    time = _time(record, "time")
    if time is None or record.outcome not in _OUTCOMES_BACK:
        raise ValueError("a log entry without a time or outcome")
    values: dict[str, Any] = {
        name: getattr(record, name) if record.HasField(name) else None for name in _TEXT_FIELDS
    }
    return LogEntry(
        leaf_index=message.leaf_index,
        record=AuditRecord(
            time=time,
            outcome=_OUTCOMES_BACK[record.outcome],
            api=record.api,
            reason=record.reason,
            detail=record.detail,
            not_before=_time(record, "not_before"),
            not_after=_time(record, "not_after"),
            **values,
        ),
    )


def query_from_proto(message: Any, page_size: int = 0, page_token: str = "") -> AuditQuery:
    """An ``AuditQuery`` from a ``RecordFilter``; ``InvalidRequest`` for bad values."""
    values: dict[str, Any] = {
        name: getattr(message, name) if message.HasField(name) else None for name in _FILTER_TEXT
    }
    if message.outcome != audit_pb2.OUTCOME_UNSPECIFIED:
        if message.outcome not in _OUTCOMES_BACK:
            raise InvalidRequest(f"unknown outcome {message.outcome}")
        values["outcome"] = _OUTCOMES_BACK[message.outcome]
    return AuditQuery(
        since=_time(message, "since"),
        until=_time(message, "until"),
        limit=page_size or 50,
        cursor=page_token or None,
        **values,
    )


def filter_to_proto(query: AuditQuery) -> Any:
    values: dict[str, Any] = {
        name: getattr(query, name) for name in _FILTER_TEXT if getattr(query, name) is not None
    }
    if query.outcome is not None:
        values["outcome"] = _OUTCOMES[query.outcome]
    for name in ("since", "until"):
        value = getattr(query, name)
        if value is not None:
            values[name] = _timestamp(value)
    return audit_pb2.RecordFilter(**values)


def head_to_proto(signed: SignedTreeHead) -> Any:
    return audit_pb2.SignedTreeHead(
        tree_size=signed.head.size,
        root_hash=signed.head.root_hash,
        timestamp_ms=signed.head.timestamp_ms,
        key_id=signed.key_id,
        signature=signed.signature,
    )


def head_from_proto(message: Any) -> SignedTreeHead:
    return SignedTreeHead(
        head=TreeHead(
            size=message.tree_size,
            root_hash=bytes(message.root_hash),
            timestamp=TreeHead.time_from_ms(message.timestamp_ms),
        ),
        key_id=bytes(message.key_id),
        signature=bytes(message.signature),
    )


def inclusion_from_proto(message: Any) -> InclusionProof:
    return InclusionProof(
        leaf_index=message.leaf_index,
        tree_size=message.tree_size,
        path=tuple(bytes(p) for p in message.path),
    )


def consistency_to_proto(proof: ConsistencyProof) -> Any:
    return audit_pb2.ConsistencyProof(
        old_size=proof.old_size, new_size=proof.new_size, path=list(proof.path)
    )


def consistency_from_proto(message: Any) -> ConsistencyProof:
    return ConsistencyProof(
        old_size=message.old_size,
        new_size=message.new_size,
        path=tuple(bytes(p) for p in message.path),
    )
