"""The deny-list: identities and keys that must not be issued to, and revoked serials.

Pure values. An operator adds an entry (``check_request`` validates it) and may lift it
later; each change is also a record of the issuance log (``revoke_record``,
``lift_record``). ``DenyList`` is the frozen set of entries a server holds:
``is_denied`` answers in a few dictionary lookups whatever the list's size, and an empty
list answers without looking.

Matching rules:

- ``spiffe-id``: the ID exactly;
- ``spiffe-id-prefix``: the ID itself and every ID under it, on path-segment boundaries
  (``spiffe://td/ns/a`` covers ``spiffe://td/ns/a/sa/x`` but not ``spiffe://td/ns/ab``);
- ``key-sha256``: SHA-256 of the CSR's DER SubjectPublicKeyInfo, lowercase hex;
- ``serial``: a certificate serial, lowercase hex without leading zeros (as the issuance
  log writes it). A serial entry never blocks issuance: it is for revocation lists.

An entry stands until it is lifted or its ``until`` has passed (``now`` is an input).
"""

from __future__ import annotations

import enum
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from meshca.core.audit import AuditRecord, Outcome, encode_time
from meshca.core.errors import InvalidRequest, InvalidSpiffeId, Revoked, UnsafeChange
from meshca.core.spiffe import SpiffeId, TrustDomain

__all__ = [
    "MAX_BY_CHARS",
    "MAX_REASON_CHARS",
    "MAX_SERIAL_HEX",
    "RECORD_API",
    "DenyEntry",
    "DenyKind",
    "DenyList",
    "DenyRequest",
    "check_lift",
    "check_request",
    "check_text",
    "key_sha256",
    "lift_record",
    "parse_key_sha256",
    "parse_serial",
    "prefix_covers",
    "revoke_record",
]

#: RFC 5280: a serial is at most 20 octets.
MAX_SERIAL_HEX = 40
MAX_REASON_CHARS = 1000
MAX_BY_CHARS = 200
#: The ``api`` of the log records of deny-list changes.
RECORD_API = "revoke"

_HEX = re.compile(r"[0-9a-f]+")


class DenyKind(enum.StrEnum):
    SERIAL = "serial"
    SPIFFE_ID = "spiffe-id"
    SPIFFE_ID_PREFIX = "spiffe-id-prefix"
    KEY_SHA256 = "key-sha256"


@dataclass(frozen=True, slots=True)
class DenyRequest:
    """A checked request to add an entry: ``value`` is canonical for its kind."""

    kind: DenyKind
    value: str
    reason: str
    requested_by: str
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class DenyEntry:
    """A stored entry. ``leaf_index`` is its revoke record's place in the issuance log."""

    id: int
    kind: DenyKind
    value: str
    reason: str
    requested_by: str
    created_at: datetime
    until: datetime | None = None
    lifted_at: datetime | None = None
    lifted_by: str | None = None
    leaf_index: int | None = None

    def active(self, now: datetime) -> bool:
        """Not lifted, and ``until`` (if any) not yet reached."""
        return self.lifted_at is None and (self.until is None or now < self.until)


@dataclass(frozen=True, slots=True)
class DenyList:
    """The entries that have not been lifted, indexed for ``is_denied``.

    ``revision`` changes with every add or lift (it is the leaf index of the latest
    change's log record; -1 for a list that never had an entry), so a follower reloads
    only when it differs.
    """

    revision: int = -1
    entries: tuple[DenyEntry, ...] = ()
    _by_kind: dict[DenyKind, dict[str, tuple[DenyEntry, ...]]] = field(
        init=False, repr=False, compare=False
    )
    #: No entry that could refuse issuance (serial entries never do): the signing use
    #: case then checks nothing.
    empty: bool = field(init=False, repr=False, compare=False)
    #: Some entry names a key: only then is a CSR's key worth hashing.
    has_keys: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[DenyKind, dict[str, list[DenyEntry]]] = {kind: {} for kind in DenyKind}
        for entry in sorted(self.entries, key=lambda e: e.id):
            if entry.lifted_at is None:
                index[entry.kind].setdefault(entry.value, []).append(entry)
        frozen = {kind: {k: tuple(v) for k, v in m.items()} for kind, m in index.items()}
        object.__setattr__(self, "_by_kind", frozen)
        blocking = (DenyKind.SPIFFE_ID, DenyKind.SPIFFE_ID_PREFIX, DenyKind.KEY_SHA256)
        object.__setattr__(self, "empty", not any(frozen[kind] for kind in blocking))
        object.__setattr__(self, "has_keys", bool(frozen[DenyKind.KEY_SHA256]))

    def is_denied(
        self,
        spiffe_id: SpiffeId | str | None,
        key_sha256: str | None,
        serial: str | None,
        now: datetime,
    ) -> DenyEntry | None:
        """The lowest-numbered entry standing at ``now`` that matches any given value."""
        kinds = self._by_kind
        found: list[DenyEntry] = []
        if spiffe_id is not None:
            text = str(spiffe_id)
            found += _standing(kinds[DenyKind.SPIFFE_ID].get(text, ()), now)
            prefixes = kinds[DenyKind.SPIFFE_ID_PREFIX]
            if prefixes:
                for candidate in _ancestors(text):
                    found += _standing(prefixes.get(candidate, ()), now)
        if key_sha256 is not None:
            found += _standing(kinds[DenyKind.KEY_SHA256].get(key_sha256, ()), now)
        if serial is not None:
            found += _standing(kinds[DenyKind.SERIAL].get(serial, ()), now)
        return min(found, key=lambda e: e.id) if found else None

    def refuse(
        self,
        spiffe_id: SpiffeId | str | None,
        key_sha256: str | None,
        serial: str | None,
        now: datetime,
        *,
        what: str,
        reason: str = "revoked",
    ) -> None:
        """Raise ``Revoked`` naming only the entry's id when ``is_denied`` finds one.

        ``what`` says what was refused ("issuance", "client certificate").
        """
        entry = self.is_denied(spiffe_id, key_sha256, serial, now)
        if entry is not None:
            raise Revoked(f"{what} refused by deny-list entry {entry.id}", reason=reason)

    def standing(self, now: datetime) -> tuple[DenyEntry, ...]:
        """Every entry standing at ``now``, by id."""
        return tuple(sorted((e for e in self.entries if e.active(now)), key=lambda e: e.id))


def _standing(entries: Iterable[DenyEntry], now: datetime) -> list[DenyEntry]:
    return [e for e in entries if e.until is None or now < e.until]


def _ancestors(spiffe_id: str) -> Iterable[str]:
    """``spiffe://td``, ``spiffe://td/a``, ``spiffe://td/a/b``... up to the ID itself."""
    start = spiffe_id.find("/", len("spiffe://"))
    if start < 0:
        yield spiffe_id
        return
    yield spiffe_id[:start]
    position = start
    while True:
        position = spiffe_id.find("/", position + 1)
        if position < 0:
            yield spiffe_id
            return
        yield spiffe_id[:position]


def prefix_covers(prefix: SpiffeId | str, spiffe_id: SpiffeId | str) -> bool:
    """True when ``spiffe_id`` is ``prefix`` or lies under it on a segment boundary."""
    p, s = str(prefix), str(spiffe_id)
    return s == p or s.startswith(p + "/")


def key_sha256(spki_der: bytes) -> str:
    """The deny-list's name for a public key: SHA-256 of its DER SubjectPublicKeyInfo."""
    return hashlib.sha256(spki_der).hexdigest()


def _shown(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _hex_digits(text: str, what: str) -> str:
    """``text`` as lowercase hex digits: ``:`` separators and a ``0x`` prefix are allowed."""
    digits = text.strip().lower().replace(":", "")
    if digits.startswith("0x"):
        digits = digits[2:]
    if not digits or not _HEX.fullmatch(digits):
        raise InvalidRequest(f"{what} {_shown(text)} is not hexadecimal", reason="invalid-" + what)
    return digits


def parse_serial(text: str) -> str:
    """A serial as the issuance log writes it (lowercase hex, no leading zeros).

    Raises ``InvalidRequest`` unless ``text`` is a positive number of at most 20 octets.
    """
    digits = _hex_digits(text, "serial").lstrip("0")
    if not digits:
        raise InvalidRequest("serial 0 is not a certificate serial", reason="invalid-serial")
    if len(digits) > MAX_SERIAL_HEX:
        raise InvalidRequest(
            f"serial is {len(digits)} hex digits; a certificate serial has at most "
            f"{MAX_SERIAL_HEX}",
            reason="invalid-serial",
        )
    return digits


def parse_key_sha256(text: str) -> str:
    """A SHA-256 of a public key as 64 lowercase hex digits; ``InvalidRequest`` otherwise."""
    digits = _hex_digits(text, "key-sha256")
    if len(digits) != 64:
        raise InvalidRequest(
            f"key-sha256 is {len(digits)} hex digits, not 64", reason="invalid-key-sha256"
        )
    return digits


def check_text(text: str, what: str, limit: int) -> str:
    """``text`` stripped, if it is one non-empty line of printable text within ``limit``:
    a reason or a requester, as revokes and taints record them."""
    value = text.strip()
    if not value:
        raise InvalidRequest(f"{what} is empty: say why", reason="invalid-" + what)
    if len(value) > limit:
        raise InvalidRequest(
            f"{what} is {len(value)} characters; the limit is {limit}", reason="invalid-" + what
        )
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in value):
        raise InvalidRequest(f"{what} must be one line of printable text", reason="invalid-" + what)
    return value


def _in_domain(text: str, trust_domain: TrustDomain, *, root_allowed: bool) -> SpiffeId:
    parsed = SpiffeId.parse(text.strip())
    if parsed.trust_domain != trust_domain:
        raise InvalidSpiffeId(
            f"{_shown(text)} is outside this CA's trust domain {trust_domain.name!r}"
        )
    if not parsed.path and not root_allowed:
        raise InvalidSpiffeId(f"{_shown(text)} names the trust domain, not a workload")
    return parsed


def check_request(
    kind: DenyKind,
    value: str,
    *,
    reason: str,
    requested_by: str,
    until: datetime | None,
    now: datetime,
    trust_domain: TrustDomain,
    protected: Sequence[SpiffeId] = (),
    force: bool = False,
) -> DenyRequest:
    """A checked ``DenyRequest``, or the first problem with it.

    Raises ``InvalidRequest`` (or ``InvalidSpiffeId``) for a malformed value, an ID
    outside ``trust_domain``, an empty or over-long reason, or an ``until`` not after
    ``now``. Raises ``UnsafeChange`` for an entry that would deny a ``protected``
    identity (meshca's own) or the whole trust domain, unless ``force``.
    """
    if until is not None:
        if until.utcoffset() is None:
            raise InvalidRequest(f"until needs a time zone: {until.isoformat()}")
        if until <= now:
            raise InvalidRequest(
                f"until {encode_time(until)} is not in the future (now {encode_time(now)})",
                reason="invalid-until",
            )
    why = check_text(reason, "reason", MAX_REASON_CHARS)
    who = check_text(requested_by, "by", MAX_BY_CHARS)
    match kind:
        case DenyKind.SERIAL:
            canonical = parse_serial(value)
        case DenyKind.KEY_SHA256:
            canonical = parse_key_sha256(value)
        case DenyKind.SPIFFE_ID | DenyKind.SPIFFE_ID_PREFIX:
            prefix = kind is DenyKind.SPIFFE_ID_PREFIX
            parsed = _in_domain(value, trust_domain, root_allowed=prefix)
            canonical = str(parsed)
            if not force:
                if not parsed.path:
                    raise UnsafeChange(
                        f"{canonical} would deny every identity of the trust domain; "
                        "add --force if that is meant"
                    )
                for own in protected:
                    if (prefix and prefix_covers(parsed, own)) or (not prefix and parsed == own):
                        raise UnsafeChange(
                            f"{canonical} would deny meshca's own identity {own}; "
                            "add --force if that is meant"
                        )
    return DenyRequest(kind=kind, value=canonical, reason=why, requested_by=who, until=until)


def check_lift(requested_by: str, reason: str) -> tuple[str, str]:
    """Who lifts an entry and why (the reason may be empty); ``InvalidRequest`` otherwise."""
    who = check_text(requested_by, "by", MAX_BY_CHARS)
    why = check_text(reason, "reason", MAX_REASON_CHARS) if reason.strip() else ""
    return who, why


# -- the log records of deny-list changes -------------------------------------------------


def _identity_field(kind: DenyKind, value: str) -> str | None:
    return value if kind in (DenyKind.SPIFFE_ID, DenyKind.SPIFFE_ID_PREFIX) else None


def revoke_record(entry: DenyEntry) -> AuditRecord:
    """The log record of adding ``entry``: outcome ``revoked``, reason its kind.

    ``spiffe_id`` holds the ID or prefix for identity entries, so that queries by ID find
    them; ``detail`` says everything in one line.
    """
    until = "" if entry.until is None else f" until {encode_time(entry.until)}"
    return AuditRecord(
        time=entry.created_at,
        outcome=Outcome.REVOKED,
        api=RECORD_API,
        reason=str(entry.kind),
        detail=(
            f"deny-list entry {entry.id}: {entry.kind} {entry.value}{until}; "
            f"by {entry.requested_by}; reason: {entry.reason}"
        ),
        spiffe_id=_identity_field(entry.kind, entry.value),
    )


def lift_record(entry: DenyEntry, lifted_by: str, reason: str, now: datetime) -> AuditRecord:
    """The log record of lifting ``entry``: outcome ``lifted``, reason its kind."""
    why = f"; reason: {reason}" if reason else ""
    return AuditRecord(
        time=now,
        outcome=Outcome.LIFTED,
        api=RECORD_API,
        reason=str(entry.kind),
        detail=(
            f"deny-list entry {entry.id} lifted: {entry.kind} {entry.value}; by {lifted_by}{why}"
        ),
        spiffe_id=_identity_field(entry.kind, entry.value),
    )
