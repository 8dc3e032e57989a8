"""The trust bundle: the roots relying parties verify against, and its changes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshca.core.spiffe import TrustDomain

__all__ = ["BundleSnapshot", "TrustBundleService"]


@dataclass(frozen=True)
class BundleSnapshot:
    """One version of the bundle. ``sequence`` grows on every change; it comes from the
    journal (``AuthoritySet.bundle_sequence``), so every replica gives the same number."""

    trust_domain: TrustDomain
    roots: tuple[x509.Certificate, ...]
    sequence: int
    #: SHA-256 fingerprints (hex) of tainted authorities: a workload whose certificate
    #: chains through one of them should renew now (``meshca ca taint``).
    tainted: tuple[str, ...] = ()

    @cached_property
    def roots_pems(self) -> tuple[str, ...]:
        # Encoded once per version: a change is sent to every watcher at once.
        return tuple(c.public_bytes(Encoding.PEM).decode() for c in self.roots)


class TrustBundleService:
    """Holds the current bundle and wakes every watcher when it changes."""

    def __init__(
        self,
        trust_domain: TrustDomain,
        roots: tuple[x509.Certificate, ...],
        sequence: int = 1,
        tainted: tuple[str, ...] = (),
    ) -> None:
        self._snapshot = BundleSnapshot(trust_domain, roots, sequence, tainted)
        self._changed = asyncio.Event()

    def current(self) -> BundleSnapshot:
        return self._snapshot

    def publish(
        self,
        roots: tuple[x509.Certificate, ...],
        sequence: int | None = None,
        tainted: tuple[str, ...] | None = None,
    ) -> BundleSnapshot:
        """Replace the roots (and tainted fingerprints), as version ``sequence`` (default:
        the next one); a no-op when nothing changed."""
        if tainted is None:
            tainted = self._snapshot.tainted
        if roots == self._snapshot.roots and tainted == self._snapshot.tainted:
            return self._snapshot
        if sequence is None or sequence <= self._snapshot.sequence:
            sequence = self._snapshot.sequence + 1
        self._snapshot = BundleSnapshot(self._snapshot.trust_domain, roots, sequence, tainted)
        # Wake current watchers, then arm a fresh event for the next change.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return self._snapshot

    async def watch(self) -> AsyncIterator[BundleSnapshot]:
        """Yield the bundle now, then each newer version as it is published."""
        sent = 0
        while True:
            snapshot = self._snapshot
            if snapshot.sequence != sent:
                sent = snapshot.sequence
                yield snapshot
                continue
            await self._changed.wait()
