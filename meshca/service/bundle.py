"""The trust bundle: the roots and JWT keys relying parties verify against, and its changes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshca.core.jwt_svid import JwtKey
from meshca.core.spiffe import TrustDomain

__all__ = ["BundleSnapshot", "TrustBundleService"]


@dataclass(frozen=True)
class BundleSnapshot:
    """One version of the bundle. ``sequence`` grows on every change; it comes from the
    journal (``AuthoritySet.bundle_sequence``), so every replica gives the same number."""

    trust_domain: TrustDomain
    roots: tuple[x509.Certificate, ...]
    sequence: int
    jwt_keys: tuple[JwtKey, ...] = ()
    #: SHA-256 fingerprints (hex) of tainted authorities: a workload whose certificate
    #: chains through one of them should renew now (``meshca ca taint``).
    tainted: tuple[str, ...] = ()
    #: The intermediates' CRLs, DER (``service.crl``). A new set makes a new snapshot
    #: with the same ``sequence``: that counts root, JWT key and taint changes.
    crls: tuple[bytes, ...] = ()

    @cached_property
    def roots_pems(self) -> tuple[str, ...]:
        # Encoded once per version: a change is sent to every watcher at once.
        return tuple(c.public_bytes(Encoding.PEM).decode() for c in self.roots)

    @cached_property
    def jwks(self) -> bytes:
        """The JWT keys as a JWKS document (JSON); empty bytes when there are none."""
        if not self.jwt_keys:
            return b""
        return json.dumps({"keys": [k.jwk() for k in self.jwt_keys]}).encode()


class TrustBundleService:
    """Holds the current bundle and wakes every watcher when it changes."""

    def __init__(
        self,
        trust_domain: TrustDomain,
        roots: tuple[x509.Certificate, ...],
        sequence: int = 1,
        jwt_keys: tuple[JwtKey, ...] = (),
        tainted: tuple[str, ...] = (),
    ) -> None:
        self._snapshot = BundleSnapshot(trust_domain, roots, sequence, jwt_keys, tainted)
        self._changed = asyncio.Event()

    def current(self) -> BundleSnapshot:
        return self._snapshot

    def publish(
        self,
        roots: tuple[x509.Certificate, ...],
        sequence: int | None = None,
        jwt_keys: tuple[JwtKey, ...] | None = None,
        tainted: tuple[str, ...] | None = None,
    ) -> BundleSnapshot:
        """Replace the roots (and JWT keys and tainted fingerprints, when given), as version
        ``sequence`` (default: the next one); a no-op when nothing changed."""
        if jwt_keys is None:
            jwt_keys = self._snapshot.jwt_keys
        if tainted is None:
            tainted = self._snapshot.tainted
        snapshot = self._snapshot
        if (
            roots == snapshot.roots
            and jwt_keys == snapshot.jwt_keys
            and tainted == snapshot.tainted
        ):
            return snapshot
        if sequence is None or sequence <= snapshot.sequence:
            sequence = snapshot.sequence + 1
        self._snapshot = BundleSnapshot(
            snapshot.trust_domain, roots, sequence, jwt_keys, tainted, snapshot.crls
        )
        self._wake()
        return self._snapshot

    def publish_crls(self, crls: tuple[bytes, ...]) -> BundleSnapshot:
        """Replace the CRLs (same roots, keys, taints and sequence); a no-op when they are
        the same."""
        if crls == self._snapshot.crls:
            return self._snapshot
        self._snapshot = replace(self._snapshot, crls=crls)
        self._wake()
        return self._snapshot

    def _wake(self) -> None:
        # Wake current watchers, then arm a fresh event for the next change.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def watch(self) -> AsyncIterator[BundleSnapshot]:
        """Yield the bundle now, then each newer version as it is published."""
        sent: BundleSnapshot | None = None
        while True:
            snapshot = self._snapshot
            if snapshot is not sent:
                sent = snapshot
                yield snapshot
                continue
            await self._changed.wait()
