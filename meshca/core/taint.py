"""Tainting an authority: marking a root or intermediate as compromised, on the record.

Pure values. ``resolve`` finds the authority an operator names by fingerprint (or a
unique prefix of it), ``check_taint`` refuses what cannot or must not be done,
``taint_record`` is the issuance-log record of the taint, and ``predict_peer_failures``
says, before an emergency root switch, which workloads may fail handshakes.

What a taint does (``service.authority.AuthorityService.taint`` acts; the rules in
``core.rotation`` keep it going after a crash):

- intermediate: a successor under the active root is prepared and activated at once
  (its root is already trusted, so no propagation delay is needed); the tainted one
  signs nothing more and is removed ``max_svid_ttl`` after it stopped signing;
- root: a successor root is prepared and waits out the propagation delay, unless
  ``emergency``, which activates it at once. The tainted root is retired as soon as
  its successor is active and removed from the bundle ``max_svid_ttl`` later.

The peer-failure prediction for an emergency root switch: a workload *may fail* when it
holds a certificate issued while the tainted root was active that has not expired at
``now``. Such a workload fetched its trust bundle at the latest with that certificate,
before the successor root existed, so it does not trust certificates under the
successor until it renews (or its agent, told of the taint, fetches the new bundle).
The prediction counts distinct SPIFFE IDs, from the issuance log's ``issued`` records.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from meshca.core.audit import AuditRecord, Outcome
from meshca.core.denylist import MAX_BY_CHARS, MAX_REASON_CHARS, check_text
from meshca.core.errors import InvalidRequest, UnsafeChange
from meshca.core.rotation import (
    AuthorityEntry,
    AuthorityKind,
    AuthoritySet,
    AuthoritySource,
    AuthorityState,
)

__all__ = [
    "MAX_BY_CHARS",
    "MAX_REASON_CHARS",
    "MIN_PREFIX_HEX",
    "RECORD_API",
    "IssuedLeaf",
    "PeerPrediction",
    "TaintRequest",
    "check_taint",
    "predict_peer_failures",
    "resolve",
    "taint_record",
]

#: A fingerprint prefix shorter than this is refused: ``meshca ca status`` shows 16.
MIN_PREFIX_HEX = 16
#: The ``api`` of the log records of taints.
RECORD_API = "taint"

_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True, slots=True)
class TaintRequest:
    """A checked request: the authority, who asks and why, and how fast to move."""

    entry: AuthorityEntry
    reason: str
    requested_by: str
    emergency: bool = False


@dataclass(frozen=True, slots=True)
class PeerPrediction:
    """Workloads that may fail handshakes after an emergency switch away from a root.

    ``spiffe_ids`` are those holding an unexpired certificate issued while the root was
    active; ``until`` is when the last of those certificates expires (None if none).
    """

    root_id: str
    spiffe_ids: tuple[str, ...]
    until: datetime | None

    @property
    def count(self) -> int:
        return len(self.spiffe_ids)

    def summary(self) -> str:
        if not self.spiffe_ids:
            return "no workload holds an unexpired certificate under it: none should fail"
        assert self.until is not None
        return (
            f"{self.count} workload(s) hold certificates under root {self.root_id} and have "
            "not fetched a bundle with its successor: until each renews (at the latest "
            f"{self.until:%Y-%m-%d %H:%M:%SZ}) they may refuse peers with new certificates"
        )


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def resolve(
    authorities: AuthoritySet, text: str, *, min_length: int = MIN_PREFIX_HEX
) -> AuthorityEntry:
    """The authority whose SHA-256 fingerprint is ``text`` or starts with it.

    ``text`` is hex (``:`` separators allowed, any case) of at least ``min_length``
    digits. Raises ``InvalidRequest`` for malformed, too short, unknown or ambiguous input.
    """
    digits = text.strip().lower().replace(":", "")
    if not digits or not _HEX.fullmatch(digits) or len(digits) > 64:
        raise InvalidRequest(
            f"fingerprint {_shown(text)} is not up to 64 hexadecimal digits "
            "(the SHA-256 'meshca ca status' shows)",
            reason="invalid-fingerprint",
        )
    if len(digits) < min_length:
        raise InvalidRequest(
            f"fingerprint prefix {_shown(text)} is {len(digits)} hex digits; give at least "
            f"{min_length}",
            reason="invalid-fingerprint",
        )
    found = [e for e in authorities.entries if e.fingerprint.startswith(digits)]
    if not found:
        raise InvalidRequest(
            f"no authority has fingerprint {digits[:64]}: see 'meshca ca status --all'",
            reason="unknown-authority",
        )
    if len(found) > 1:
        names = ", ".join(sorted(e.id for e in found)[:5])
        raise InvalidRequest(
            f"fingerprint prefix {digits} names {len(found)} authorities ({names}); "
            "give more digits",
            reason="ambiguous-fingerprint",
        )
    return found[0]


def check_taint(
    authorities: AuthoritySet,
    entry: AuthorityEntry,
    *,
    reason: str,
    requested_by: str,
    emergency: bool,
    peers_may_fail: bool,
    self_managed_roots: bool,
) -> TaintRequest:
    """A checked ``TaintRequest``, or the first reason it cannot be done.

    Raises ``InvalidRequest`` for an empty, over-long or multi-line reason or name, and
    ``UnsafeChange`` for: an authority already tainted or removed; ``emergency`` on an
    intermediate (it never waits) or without ``peers_may_fail``; a root meshca cannot
    replace (the upstream CA's, or any root when roots come from upstream).
    """
    why = check_text(reason, "reason", MAX_REASON_CHARS)
    who = check_text(requested_by, "by", MAX_BY_CHARS)
    if entry.tainted_at is not None:
        raise UnsafeChange(
            f"{entry.kind} {entry.id} was already tainted at {entry.tainted_at:%Y-%m-%d %H:%M:%SZ}"
        )
    if entry.state == AuthorityState.REMOVED:
        raise UnsafeChange(f"{entry.kind} {entry.id} was removed: nothing trusts it any more")
    if entry.kind == AuthorityKind.JWT_KEY:
        # Its successor would sign before verifiers had fetched it: not done yet.
        raise UnsafeChange(
            f"jwt-key {entry.id} is a JWT-SVID signing key: taint is for CA certificates; "
            "a leaked JWT key is not handled by taint yet"
        )
    if entry.kind == AuthorityKind.INTERMEDIATE:
        if emergency:
            raise UnsafeChange(
                "--emergency is for roots: an intermediate's successor takes over at once anyway"
            )
        return TaintRequest(entry, why, who)
    if entry.source == AuthoritySource.UPSTREAM or not self_managed_roots:
        raise UnsafeChange(
            f"root {entry.id} lives in the upstream CA (Vault's PKI), which meshca cannot "
            "replace: in Vault, make a new root issuer (pki/root/rotate/internal), make it "
            "the default issuer (pki/config/issuers) and revoke the old one; meshca publishes "
            "the new root and moves to it. Taint the intermediates under the old root here "
            "to stop signing with them now"
        )
    if entry.state == AuthorityState.ACTIVE and emergency and not peers_may_fail:
        raise UnsafeChange(
            "--emergency activates the successor root without the propagation delay: "
            "workloads that have not fetched it will refuse peers that use it. Add "
            "--yes-i-understand-peers-may-fail to go ahead"
        )
    if emergency and entry.state != AuthorityState.ACTIVE:
        raise UnsafeChange(
            f"root {entry.id} is {entry.state}, not active: nothing to switch away from, so "
            "--emergency does not apply"
        )
    return TaintRequest(entry, why, who, emergency=emergency)


def taint_record(
    request: TaintRequest,
    now: datetime,
    *,
    prediction: PeerPrediction | None = None,
) -> AuditRecord:
    """The issuance-log record of a taint: outcome ``revoked``, api ``taint``.

    ``reason`` is ``taint-root`` or ``taint-intermediate`` (``-emergency`` appended for
    an emergency root switch); ``fingerprint_sha256`` is the authority's; ``detail``
    says who, why, and for an emergency the predicted peer failures.
    """
    entry = request.entry
    code = f"taint-{entry.kind}" + ("-emergency" if request.emergency else "")
    predicted = ""
    if prediction is not None:
        predicted = f"; predicted peers that may fail: {prediction.count}"
    return AuditRecord(
        time=now,
        outcome=Outcome.REVOKED,
        api=RECORD_API,
        reason=code,
        detail=(
            f"{entry.kind} {entry.id} tainted ({entry.state}); by {request.requested_by}; "
            f"reason: {request.reason}{predicted}"
        ),
        fingerprint_sha256=entry.fingerprint,
        not_before=entry.not_before,
        not_after=entry.not_after,
    )


@dataclass(frozen=True, slots=True)
class IssuedLeaf:
    """What the prediction needs of an ``issued`` log record."""

    spiffe_id: str
    time: datetime
    not_after: datetime


def predict_peer_failures(
    authorities: AuthoritySet, root: AuthorityEntry, issued: Iterable[IssuedLeaf], now: datetime
) -> PeerPrediction:
    """Who may fail if ``root`` is switched away from at ``now`` without propagation.

    A leaf counts when it was issued while ``root`` was active (from its activation up to
    its retirement, or ``now``) and is still valid at ``now``.
    """
    start = root.activated_at
    if start is None:
        return PeerPrediction(root.id, (), None)
    end = root.retired_at or now
    holders: dict[str, datetime] = {}
    for leaf in issued:
        if start <= leaf.time <= end and leaf.not_after > now:
            holders[leaf.spiffe_id] = max(leaf.not_after, holders.get(leaf.spiffe_id, now))
    if not holders:
        return PeerPrediction(root.id, (), None)
    return PeerPrediction(root.id, tuple(sorted(holders)), max(holders.values()))
