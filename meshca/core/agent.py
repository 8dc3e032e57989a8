"""What ``meshca agent`` holds and when it acts: the workload's SVID, the trust bundle and
the renewal schedule.

Pure: every decision takes ``now`` (and, for jitter, a number drawn by the caller) and
returns a value. The agent's loops (``meshca.service.agent``) sleep on what these say.

Renewal: an SVID is renewed once half its lifetime is gone, less a random share of up to
``jitter`` of its lifetime, so that many agents started together spread out. A failed
attempt is retried after an exponential backoff with "equal jitter" (half fixed, half
random), capped; the SVID already held keeps being served meanwhile.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature

__all__ = [
    "MAX_TAINTED",
    "AgentSvid",
    "RenewalPolicy",
    "TrustBundleView",
    "Upstream",
    "chain_tainted",
    "renew_at",
    "retry_delay",
    "svid_usable",
]


@dataclass(frozen=True)
class AgentSvid:
    """The workload's X509-SVID as the agent serves it.

    ``chain_der`` is the leaf first, then the intermediates up to (excluding) the root;
    ``key_der`` is the private key as unencrypted PKCS#8 DER.
    """

    spiffe_id: str
    chain_der: tuple[bytes, ...]
    key_der: bytes
    not_before: datetime
    not_after: datetime
    serial: str


@dataclass(frozen=True)
class TrustBundleView:
    """The roots of one trust domain (DER), with the server's change counter, and the
    CRLs (DER) of its intermediates.

    ``jwt_bundle`` is the trust domain's JWT-SVID keys as a JWKS (JSON), empty when the
    server sends none."""

    trust_domain: str
    roots_der: tuple[bytes, ...]
    sequence: int
    #: SHA-256 fingerprints (hex) of tainted authorities (``meshca ca taint``).
    tainted: frozenset[str] = frozenset()
    #: The intermediates' CRLs, DER, as the server sent them.
    crls_der: tuple[bytes, ...] = ()
    jwt_bundle: bytes = b""


@dataclass(frozen=True)
class RenewalPolicy:
    """How early to renew and how to back off; ``jitter`` is a share of the lifetime."""

    jitter: float = 0.1
    backoff_base: timedelta = timedelta(seconds=1)
    backoff_cap: timedelta = timedelta(seconds=30)

    def __post_init__(self) -> None:
        if not 0 <= self.jitter < 0.5:
            raise ValueError(f"jitter must be in [0, 0.5), got {self.jitter}")
        if self.backoff_base <= timedelta(0) or self.backoff_cap < self.backoff_base:
            raise ValueError("backoff needs 0 < base <= cap")


def renew_at(svid: AgentSvid, policy: RenewalPolicy, draw: float) -> datetime:
    """When to renew ``svid``: at half-life, earlier by ``draw`` x jitter x lifetime.

    ``draw`` is in [0, 1]. The result is never before ``not_before`` and never later than
    the half-life, so an SVID is always renewed while more than half of it is left.
    """
    if not 0 <= draw <= 1:
        raise ValueError(f"draw must be in [0, 1], got {draw}")
    lifetime = max(svid.not_after - svid.not_before, timedelta(0))
    return svid.not_before + lifetime / 2 - lifetime * (policy.jitter * draw)


def retry_delay(attempt: int, policy: RenewalPolicy, draw: float) -> timedelta:
    """The wait before retry number ``attempt`` (1 for the first retry).

    Exponential from ``backoff_base``, capped at ``backoff_cap``, then between half of
    that and all of it depending on ``draw`` in [0, 1]. Always positive.
    """
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    if not 0 <= draw <= 1:
        raise ValueError(f"draw must be in [0, 1], got {draw}")
    exponent = min(attempt - 1, 32)  # 2**32 seconds is far past any cap
    ceiling = min(policy.backoff_cap, policy.backoff_base * (2**exponent))
    half: timedelta = ceiling / 2
    return half + half * draw


def svid_usable(svid: AgentSvid | None, now: datetime) -> bool:
    """Whether ``svid`` may be handed to a workload at ``now`` (held and not expired)."""
    return svid is not None and svid.not_before <= now < svid.not_after


class Upstream(Protocol):
    """The CA server as the agent sees it.

    ``sign`` raises ``AuthenticationFailed``/``NotAuthorized`` when the server refuses
    the token, ``Unavailable`` when it cannot be reached; ``watch_bundle`` yields the
    bundle now and on every change, and raises ``Unavailable`` when the stream breaks.
    """

    async def sign(
        self, token: str, csr_der: bytes, key_der: bytes
    ) -> tuple[AgentSvid, tuple[bytes, ...]]:
        """The SVID for ``csr_der`` (whose private key is ``key_der``) and the roots
        (DER) the server sent with it."""
        ...

    def watch_bundle(self) -> AsyncIterator[TrustBundleView]: ...


#: At most this many tainted fingerprints are taken from a bundle message.
MAX_TAINTED = 64


def chain_tainted(
    chain_der: tuple[bytes, ...], roots_der: tuple[bytes, ...], tainted: frozenset[str]
) -> str | None:
    """The fingerprint of a tainted authority ``chain_der`` (leaf first) goes through, or
    None: one of its intermediates, or a bundle root that issued its topmost certificate."""
    if not tainted or not chain_der:
        return None
    for der in chain_der[1:]:
        fingerprint = hashlib.sha256(der).hexdigest()
        if fingerprint in tainted:
            return fingerprint
    try:
        top = x509.load_der_x509_certificate(chain_der[-1])
    except ValueError:
        return None
    for der in roots_der:
        fingerprint = hashlib.sha256(der).hexdigest()
        if fingerprint not in tainted:
            continue
        try:
            root = x509.load_der_x509_certificate(der)
        except ValueError:
            continue
        if root.subject == top.issuer:
            try:
                top.verify_directly_issued_by(root)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return fingerprint
    return None
