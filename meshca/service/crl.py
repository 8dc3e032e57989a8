"""Publishing CRLs: every serving process signs the CRL of each intermediate it may need.

Each process (every worker of every replica) computes the CRLs itself, with the shared
intermediate keys: ``core.crl`` makes their content and number a function of the
deny-list revision and the half-validity period, so replicas agree without a leader.
A process re-signs when the deny-list revision, the period or the set of intermediates
changes; ``run`` checks once per journal poll, so a revoke reaches the CRLs within one
poll, and a CRL is replaced at half its validity at the latest.

While storage or a key backend is down, the last CRLs stay served (they remain valid
until their ``nextUpdate``) and the publisher reports itself degraded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Protocol

from cryptography import x509

from meshca.core.authority import SignerKey
from meshca.core.crl import (
    MAX_CRL_ENTRIES,
    CrlIssuer,
    CrlTooLarge,
    RevokedLeaf,
    build_crl,
    crl_content,
    crl_times,
)
from meshca.core.denylist import DenyList
from meshca.core.errors import BackendUnavailable, MeshcaError
from meshca.core.ports import Clock
from meshca.core.rotation import AuthorityKind, AuthoritySet, AuthorityState
from meshca.service.polling import poll_with_backoff

__all__ = [
    "CrlPublisher",
    "CrlSet",
    "CrlSigningFailed",
    "PublishedCrl",
    "RevokedLeafSource",
    "publishing_intermediates",
]

log = logging.getLogger(__name__)

#: ``key_ref`` prefix of a key held by an upstream CA (``service.authority.UPSTREAM_REF``).
_UPSTREAM_REF = "upstream:"


class CrlSigningFailed(BackendUnavailable):
    """Some intermediate's CRL could not be signed; the others were (``current`` has them)."""


class RevokedLeafSource(Protocol):
    """Unexpired issued certificates that ``deny_list`` names (blocking; at most ``limit``)."""

    def revoked_leaves(
        self, deny_list: DenyList, now: datetime, limit: int = ...
    ) -> tuple[RevokedLeaf, ...]: ...


@dataclass(frozen=True, slots=True)
class PublishedCrl:
    """One intermediate's signed CRL."""

    fingerprint: str
    issuer: x509.Certificate
    der: bytes
    number: int
    this_update: datetime
    next_update: datetime
    serials: tuple[str, ...]


@dataclass(frozen=True)
class CrlSet:
    """The CRLs a process serves, by intermediate fingerprint; ``version`` grows with
    every change (local to the process: it only tells watchers something changed)."""

    version: int = 0
    crls: Mapping[str, PublishedCrl] = field(default_factory=lambda: MappingProxyType({}))

    def der(self, fingerprint: str) -> bytes | None:
        crl = self.crls.get(fingerprint)
        return None if crl is None else crl.der

    def ders(self) -> tuple[bytes, ...]:
        """Every CRL, DER, in fingerprint order."""
        return tuple(self.crls[k].der for k in sorted(self.crls))


def publishing_intermediates(
    authorities: AuthoritySet, now: datetime
) -> list[tuple[CrlIssuer, str]]:
    """The intermediates that publish a CRL at ``now``, with their key refs: active,
    retired (their leaves may still be live) or prepared (so that relying parties that
    need a CRL for every issuer, as Envoy does, hold one before its first leaf), not
    yet expired, and with a key meshca holds."""
    chosen: list[tuple[CrlIssuer, str]] = []
    states = (AuthorityState.PREPARED, AuthorityState.ACTIVE, AuthorityState.RETIRED)
    for entry in authorities.select(AuthorityKind.INTERMEDIATE, *states):
        if entry.key_ref is None or entry.key_ref.startswith(_UPSTREAM_REF):
            continue
        if entry.not_after <= now:
            continue
        issuer = CrlIssuer(entry.certificate, entry.activated_at, entry.retired_at)
        chosen.append((issuer, entry.key_ref))
    return sorted(chosen, key=lambda pair: pair[0].fingerprint)


class CrlPublisher:
    """Holds the current ``CrlSet``; ``refresh`` re-signs when something changed."""

    def __init__(
        self,
        *,
        source: RevokedLeafSource,
        deny_list: Callable[[], DenyList],
        authorities: Callable[[], AuthoritySet],
        load_key: Callable[[str], SignerKey],
        clock: Clock,
        validity: timedelta,
        slack: timedelta,
        before_refresh: Callable[[], object] | None = None,
        on_change: Callable[[CrlSet], object] | None = None,
        max_backoff: float = 60.0,
    ) -> None:
        self._source = source
        self._deny_list = deny_list
        self._authorities = authorities
        self._load_key = load_key
        self._clock = clock
        self.validity = validity
        self._slack = slack
        self._before_refresh = before_refresh
        #: Called on the event loop with each new set (``run``), e.g. to put the CRLs in
        #: the trust bundle stream.
        self.on_change = on_change
        self._max_backoff = max_backoff
        self._set = CrlSet()
        self._basis: tuple[object, ...] | None = None
        self._signers: dict[str, SignerKey] = {}
        self._changed = asyncio.Event()
        #: Why the last round failed, or None when it succeeded.
        self.degraded: str | None = None

    def current(self) -> CrlSet:
        return self._set

    def refresh(self) -> bool:
        """Re-sign every CRL if the deny-list, the period or the intermediates changed
        (blocking); True when new CRLs were made. Raises ``MeshcaError`` (the old CRLs
        stay) when storage or a key fails, or ``CrlTooLarge``."""
        if self._before_refresh is not None:
            self._before_refresh()
        now = self._clock.now()
        deny = self._deny_list()
        this_update, _ = crl_times(now, self.validity)
        issuers = publishing_intermediates(self._authorities(), now)
        basis = (deny.revision, this_update, tuple(i.fingerprint for i, _ in issuers))
        if basis == self._basis:
            return False
        leaves = self._source.revoked_leaves(deny, this_update, MAX_CRL_ENTRIES + 1)
        if len({leaf.serial for leaf in leaves}) > MAX_CRL_ENTRIES:
            raise CrlTooLarge(
                f"the deny-list revokes more than {MAX_CRL_ENTRIES} unexpired certificates; "
                "the CRLs keep their last content"
            )
        crls: dict[str, PublishedCrl] = {}
        failed: list[str] = []
        for issuer, key_ref in issuers:
            content = crl_content(
                issuer,
                leaves,
                revision=deny.revision,
                now=now,
                validity=self.validity,
                slack=self._slack,
            )
            try:
                signer = self._signers.get(key_ref)
                if signer is None:
                    signer = self._load_key(key_ref)
                der = build_crl(content, issuer.certificate, signer)
            except MeshcaError as error:
                # One key that cannot sign (Vault down, a key removed meanwhile) must
                # not hold back the other intermediates' CRLs: this one keeps its last.
                failed.append(f"intermediate {issuer.fingerprint[:16]}: {error.message}")
                previous = self._set.crls.get(issuer.fingerprint)
                if previous is not None:
                    crls[issuer.fingerprint] = previous
                continue
            self._signers[key_ref] = signer
            crls[issuer.fingerprint] = PublishedCrl(
                fingerprint=issuer.fingerprint,
                issuer=issuer.certificate,
                der=der,
                number=content.number,
                this_update=content.this_update,
                next_update=content.next_update,
                serials=tuple(e.serial for e in content.entries),
            )
        # Keys of intermediates no longer publishing are dropped.
        refs = {ref for _, ref in issuers}
        self._signers = {ref: key for ref, key in self._signers.items() if ref in refs}
        self._set = CrlSet(self._set.version + 1, MappingProxyType(crls))
        # After a failure the same basis is tried again next round.
        self._basis = None if failed else basis
        log.info(
            "CRLs signed for %d intermediate(s), deny-list revision %d: %s",
            len(crls),
            deny.revision,
            ", ".join(f"{fp[:12]} #{c.number} {len(c.serials)} revoked" for fp, c in crls.items()),
        )
        if failed:
            raise CrlSigningFailed("; ".join(failed))
        return True

    async def watch(self) -> AsyncIterator[CrlSet]:
        """Yield the CRLs now, then each newer set as it is made."""
        sent = -1
        while True:
            current = self._set
            if current.version != sent:
                sent = current.version
                yield current
                continue
            await self._changed.wait()

    async def run(self, stop: asyncio.Event, interval: float) -> None:
        """Refresh every ``interval`` seconds until ``stop``; back off while failing."""
        seen = self._set.version

        def wake_on_change() -> None:
            # New CRLs (all, or all but a failed one's): wake watchers, on the event loop
            # since asyncio events are not thread-safe.
            nonlocal seen
            if self._set.version != seen:
                seen = self._set.version
                self._wake()

        await poll_with_backoff(
            self.refresh,
            stop,
            interval=interval,
            max_backoff=self._max_backoff,
            report=self._set_degraded,
            log=log,
            what="CRL",
            after_round=wake_on_change,
        )

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        if self.on_change is not None:
            self.on_change(self._set)

    def _set_degraded(self, problem: str | None) -> None:
        if problem == self.degraded:
            return
        if problem is None:
            log.info("CRL refresh recovered")
        else:
            log.warning("CRLs not refreshed: %s (the last CRLs stay served)", problem)
        self.degraded = problem
