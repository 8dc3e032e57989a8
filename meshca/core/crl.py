"""Certificate revocation lists: which serials each intermediate lists, and the signed CRL.

Pure values; ``now`` and the signer are inputs.

**Which certificates.** A certificate is revoked when a standing deny-list entry names
it: a ``serial`` entry names one certificate; a ``spiffe-id`` or ``spiffe-id-prefix``
entry names every certificate issued to those identities (they may still be live when
the entry is added). A ``key-sha256`` entry blocks issuance only: the issuance log does
not record public keys, so it cannot say which certificates hold the key. Only
certificates not yet expired at ``thisUpdate`` are listed (``RevokedLeaf``, from the
issuance log's ISSUED records).

**Which CRL.** The issuance log records when a certificate was issued, not by which
intermediate. A certificate is listed on the CRL of each intermediate that could have
issued it: one that was active at its issuance time (within ``slack``, the time a
replica may take to follow an activation or retirement) and that outlives it (meshca
never issues past its issuer's expiry). During an intermediate hand-off a serial may
therefore appear on both CRLs; that is harmless, since a CRL entry means "this issuer's
certificate with this serial" and serials are random 128-bit numbers.

**Replicas agree.** ``thisUpdate`` is ``now`` rounded down to a multiple of half the
validity (``crl_times``), and the CRL number is computed from ``thisUpdate`` and the
deny-list revision (``crl_number``). Every replica (and every worker) that has seen the
same deny-list revision in the same half-period therefore signs the same content under
the same number, and the number grows with time and with every deny-list change: no
leader, no shared counter. Each CRL is replaced at half its validity at the latest.

**Bounds.** A CRL lists at most ``MAX_CRL_ENTRIES`` certificates and is at most
``MAX_CRL_BYTES`` long; ``meshca revoke`` refuses an entry that would exceed them
(``check_crl_room``), and ``build_crl`` refuses to sign a larger one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshca.core.authority import SignerKey, authority_key_identifier, hash_for
from meshca.core.denylist import DenyKind
from meshca.core.errors import InvalidRequest

__all__ = [
    "MAX_CRL_BYTES",
    "MAX_CRL_ENTRIES",
    "MAX_CRL_VALIDITY",
    "MIN_CRL_VALIDITY",
    "CrlContent",
    "CrlIssuer",
    "CrlTooLarge",
    "RevokedLeaf",
    "build_crl",
    "check_crl_room",
    "crl_content",
    "crl_number",
    "crl_times",
    "fingerprint",
    "is_fingerprint",
]

#: Most certificates one CRL lists. About 40 bytes each: 10,000 entries is ~400 KB.
MAX_CRL_ENTRIES = 10_000
#: Largest signed CRL, DER.
MAX_CRL_BYTES = 1024 * 1024
MIN_CRL_VALIDITY = timedelta(seconds=2)
MAX_CRL_VALIDITY = timedelta(days=7)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Deny-list revisions are log leaf indexes (< 2**63): the low 64 bits of a CRL number.
_REVISION_BITS = 64
#: RFC 5280: a serial is a positive INTEGER of at most 20 octets (under 2**159).
_SERIAL_BITS = 160


class CrlTooLarge(InvalidRequest):
    """More revoked certificates than one CRL may list."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="crl-too-large")


@dataclass(frozen=True, slots=True)
class RevokedLeaf:
    """An issued certificate that a standing deny-list entry revokes.

    ``serial`` is lowercase hex without leading zeros (as the log writes it);
    ``revoked_at`` is when the entry that revokes it was added; ``entry_kind`` its kind.
    """

    serial: str
    issued_at: datetime
    not_after: datetime
    revoked_at: datetime
    entry_id: int
    entry_kind: DenyKind


@dataclass(frozen=True, slots=True)
class CrlIssuer:
    """An intermediate that publishes a CRL, and when it issued certificates."""

    certificate: x509.Certificate
    activated_at: datetime | None
    retired_at: datetime | None = None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate)

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    def may_have_issued(self, leaf: RevokedLeaf, slack: timedelta) -> bool:
        """True when ``leaf`` could be this intermediate's (see the module's text)."""
        if self.activated_at is None or leaf.issued_at < self.activated_at - slack:
            return False
        if self.retired_at is not None and leaf.issued_at > self.retired_at + slack:
            return False
        return leaf.not_after <= self.not_after


@dataclass(frozen=True, slots=True)
class CrlContent:
    """What one CRL says; ``entries`` are ordered by serial, one per serial."""

    number: int
    this_update: datetime
    next_update: datetime
    entries: tuple[RevokedLeaf, ...]


def fingerprint(certificate: x509.Certificate) -> str:
    """An intermediate's name in CRL URLs: SHA-256 of its DER, 64 lowercase hex digits."""
    return hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()


def is_fingerprint(text: str) -> bool:
    """True for 64 lowercase hex digits (the only form ``fingerprint`` gives)."""
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def crl_times(now: datetime, validity: timedelta) -> tuple[datetime, datetime]:
    """``thisUpdate`` (``now`` rounded down to a multiple of ``validity / 2`` since the
    epoch, whole seconds) and ``nextUpdate`` (``thisUpdate + validity``)."""
    if not MIN_CRL_VALIDITY <= validity <= MAX_CRL_VALIDITY:
        raise ValueError(
            f"CRL validity {validity} is outside [{MIN_CRL_VALIDITY}, {MAX_CRL_VALIDITY}]"
        )
    half = max(1, int(validity.total_seconds()) // 2)
    elapsed = int((now - _EPOCH).total_seconds())
    this_update = _EPOCH + timedelta(seconds=elapsed - elapsed % half)
    return this_update, this_update + validity


def crl_number(this_update: datetime, revision: int) -> int:
    """The CRL number: ``thisUpdate`` in epoch seconds, then the deny-list revision.

    It grows with ``thisUpdate`` and, within one ``thisUpdate``, with the revision, so
    it is monotonic across replicas, and never more than 20 octets (RFC 5280).
    """
    if not -1 <= revision < 1 << (_REVISION_BITS - 1):
        raise ValueError(f"deny-list revision {revision} out of range")
    seconds = int((this_update - _EPOCH).total_seconds())
    return (seconds << _REVISION_BITS) | (revision + 1)


def crl_content(
    issuer: CrlIssuer,
    revoked: Iterable[RevokedLeaf],
    *,
    revision: int,
    now: datetime,
    validity: timedelta,
    slack: timedelta,
) -> CrlContent:
    """The CRL ``issuer`` publishes at ``now``: its revoked certificates still valid at
    ``thisUpdate``. Raises ``CrlTooLarge`` beyond ``MAX_CRL_ENTRIES``."""
    this_update, next_update = crl_times(now, validity)
    chosen: dict[str, RevokedLeaf] = {}
    for leaf in revoked:
        if leaf.not_after <= this_update or not issuer.may_have_issued(leaf, slack):
            continue
        if int(leaf.serial, 16).bit_length() >= _SERIAL_BITS:
            # Not a positive 20-octet INTEGER: no certificate meshca issued has it.
            continue
        held = chosen.get(leaf.serial)
        # The earliest revocation of a certificate is the one it states.
        if held is None or (leaf.revoked_at, leaf.entry_id) < (held.revoked_at, held.entry_id):
            chosen[leaf.serial] = leaf
    if len(chosen) > MAX_CRL_ENTRIES:
        raise CrlTooLarge(
            f"the CRL of intermediate {issuer.fingerprint[:16]} would list {len(chosen)} "
            f"certificates; the bound is {MAX_CRL_ENTRIES}"
        )
    entries = tuple(sorted(chosen.values(), key=lambda e: (len(e.serial), e.serial)))
    return CrlContent(
        number=crl_number(this_update, revision),
        this_update=this_update,
        next_update=next_update,
        entries=entries,
    )


def build_crl(content: CrlContent, issuer: x509.Certificate, signer: SignerKey) -> bytes:
    """``content`` signed by ``issuer``'s key (any ``SignerKey``: file, sealed, Transit),
    DER. Raises ``CrlTooLarge`` when the result exceeds ``MAX_CRL_BYTES``."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(content.this_update)
        .next_update(content.next_update)
        .add_extension(x509.CRLNumber(content.number), critical=False)
        .add_extension(authority_key_identifier(issuer, signer), critical=False)
    )
    for entry in content.entries:
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(int(entry.serial, 16))
            .revocation_date(min(entry.revoked_at, content.this_update))
            .build()
        )
        builder = builder.add_revoked_certificate(revoked)
    der = builder.sign(signer, hash_for(signer)).public_bytes(Encoding.DER)
    if len(der) > MAX_CRL_BYTES:
        raise CrlTooLarge(f"the CRL is {len(der)} bytes; the bound is {MAX_CRL_BYTES}")
    return der


def check_crl_room(listed: int, adding: int) -> None:
    """Refuse a revocation that would put more than ``MAX_CRL_ENTRIES`` certificates on
    the CRLs (``listed`` now, ``adding`` more); ``CrlTooLarge`` says so."""
    if adding > 0 and listed + adding > MAX_CRL_ENTRIES:
        raise CrlTooLarge(
            f"this revocation would put {listed + adding} unexpired certificates on the "
            f"CRLs ({listed} now, {adding} more); a CRL lists at most {MAX_CRL_ENTRIES}. "
            "Lift entries whose certificates matter less, or revoke a narrower identity"
        )
