"""The issuance record: one row per certificate issued and per request refused.

Each record is also a leaf of the verifiable log (``meshca.core.merkle``); its canonical
encoding is ``leaf_data``, documented in docs/audit-log.md.
"""

from __future__ import annotations

import base64
import binascii
import enum
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from meshca.core.errors import InvalidRequest

__all__ = [
    "LEAF_VERSION",
    "MAX_PAGE_SIZE",
    "AuditPage",
    "AuditQuery",
    "AuditRecord",
    "LogEntry",
    "Outcome",
    "decode_cursor",
    "encode_cursor",
    "encode_time",
    "entry_leaf_data",
    "leaf_body",
    "leaf_data",
    "record_times",
]


class Outcome(enum.StrEnum):
    ISSUED = "issued"
    REFUSED = "refused"
    #: A deny-list entry was added (``meshca revoke``); not a signing request.
    REVOKED = "revoked"
    #: A deny-list entry was lifted (``meshca revoke lift``).
    LIFTED = "lifted"


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """What happened to one signing request. Never holds a token or key material.

    ``reason`` is a short machine-readable code (``ok`` for issued certificates, the
    error's reason otherwise); ``detail`` is the human-readable message the caller saw.
    """

    time: datetime
    outcome: Outcome
    api: str
    reason: str
    detail: str = ""
    spiffe_id: str | None = None
    serial: str | None = None
    fingerprint_sha256: str | None = None
    not_before: datetime | None = None
    not_after: datetime | None = None
    namespace: str | None = None
    service_account: str | None = None
    pod_name: str | None = None
    pod_uid: str | None = None
    node_name: str | None = None
    peer: str | None = None
    csr_sha256: str | None = None


# -- the log entry: a record at its place in the verifiable log ------------------------------

#: Version byte that starts every leaf's canonical encoding.
LEAF_VERSION = 1
_ABSENT = b"\x00"
_PRESENT = b"\x01"


@dataclass(frozen=True, slots=True)
class LogEntry:
    """A stored record and its leaf index in the append-only log (0 for the first record)."""

    leaf_index: int
    record: AuditRecord


def encode_time(value: datetime) -> str:
    """A record time as the log encodes it: RFC 3339 in UTC, six fractional digits, ``Z``."""
    if value.tzinfo is not UTC:
        if value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} has no canonical encoding")
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _time_field(value: str | None) -> bytes:
    return _ABSENT if value is None else _text_field(value)


def _text_field(value: object) -> bytes:
    if value is None:
        return _ABSENT
    data = str(value).encode("utf-8")
    return _PRESENT + len(data).to_bytes(4, "big") + data


def record_times(record: AuditRecord) -> tuple[str, str | None, str | None]:
    """``encode_time`` of the record's time, notBefore and notAfter (None when absent)."""
    return (
        encode_time(record.time),
        None if record.not_before is None else encode_time(record.not_before),
        None if record.not_after is None else encode_time(record.not_after),
    )


def leaf_body(
    record: AuditRecord, times: tuple[str, str | None, str | None] | None = None
) -> bytes:
    """The canonical encoding of ``record``'s fields, in ``AuditRecord`` field order.

    Each field is 0x00 when absent, else 0x01, a 4-byte big-endian length and the UTF-8
    text. Times are RFC 3339 in UTC with exactly six fractional digits and a ``Z``
    (``encode_time``); ``outcome`` is its value (``issued``, ``refused``, or
    ``revoked``/``lifted`` for deny-list changes). Text must
    already be storable (no NUL, no lone surrogates): records are encoded as they are
    stored. ``times`` are the record's ``record_times`` when the caller has them already.
    """
    # Field by field, in declaration order (a test checks it against a loop over
    # fields()): every record of the log passes through here.
    r = record
    time, not_before, not_after = record_times(r) if times is None else times
    return b"".join(
        (
            _time_field(time),
            _text_field(r.outcome),
            _text_field(r.api),
            _text_field(r.reason),
            _text_field(r.detail),
            _text_field(r.spiffe_id),
            _text_field(r.serial),
            _text_field(r.fingerprint_sha256),
            _time_field(not_before),
            _time_field(not_after),
            _text_field(r.namespace),
            _text_field(r.service_account),
            _text_field(r.pod_name),
            _text_field(r.pod_uid),
            _text_field(r.node_name),
            _text_field(r.peer),
            _text_field(r.csr_sha256),
        )
    )


def leaf_data(leaf_index: int, body: bytes) -> bytes:
    """The bytes a leaf hashes: version, 8-byte big-endian leaf index, then ``leaf_body``.

    The index is part of the leaf, so a record cannot be moved to another place in the
    log without changing its leaf hash.
    """
    if not 0 <= leaf_index < 1 << 64:
        raise ValueError(f"leaf index {leaf_index} out of range")
    return bytes((LEAF_VERSION,)) + leaf_index.to_bytes(8, "big") + body


def entry_leaf_data(entry: LogEntry) -> bytes:
    """``leaf_data`` of a stored entry."""
    return leaf_data(entry.leaf_index, leaf_body(entry.record))


# -- queries -----------------------------------------------------------------------------------

#: Most records one page may hold.
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Filters over the record; every given filter must match (AND). Newest first.

    Text filters are exact except ``spiffe_id_prefix`` (a plain prefix: ``%`` and ``_``
    are ordinary characters). ``pod`` matches the pod's name or its UID. ``since`` is
    inclusive, ``until`` exclusive. ``cursor`` continues a previous page.
    """

    spiffe_id: str | None = None
    spiffe_id_prefix: str | None = None
    namespace: str | None = None
    service_account: str | None = None
    pod: str | None = None
    serial: str | None = None
    fingerprint: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    outcome: Outcome | None = None
    api: str | None = None
    limit: int = 50
    cursor: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_PAGE_SIZE:
            raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE_SIZE}, not {self.limit}")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.utcoffset() is None:
                raise InvalidRequest(f"{name} needs a time zone: {value.isoformat()}")


@dataclass(frozen=True, slots=True)
class AuditPage:
    """One page of entries, newest first; ``next_cursor`` is None on the last page."""

    entries: tuple[LogEntry, ...]
    next_cursor: str | None


def encode_cursor(time: datetime, leaf_index: int) -> str:
    """An opaque cursor that resumes after the entry at ``(time, leaf_index)``."""
    micros = round((time - _EPOCH) / timedelta(microseconds=1))
    return base64.urlsafe_b64encode(f"v1:{micros}:{leaf_index}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    """The position ``encode_cursor`` wrote; ``InvalidRequest`` for anything else."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        version, micros, index = text.split(":")
        if version != "v1" or not micros.lstrip("-").isdigit() or not index.isdigit():
            raise ValueError(text)
        return _EPOCH + timedelta(microseconds=int(micros)), int(index)
    except (ValueError, UnicodeDecodeError, OverflowError, binascii.Error):
        raise InvalidRequest(f"not a cursor from this server: {cursor[:80]!r}") from None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
