"""A short-lived memory of successful attestations.

A proxy presents the same token for every rotation and every retry, and a TokenReview per
request would make the API server our bottleneck. The price is that a revoked token (its
pod deleted) stays accepted for up to ``max_ttl``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from datetime import datetime, timedelta

from meshca.core.identity import KubernetesIdentity
from meshca.core.ports import Attestor, Clock

__all__ = ["CachingAttestor"]


class CachingAttestor:
    """An ``Attestor`` that remembers ``inner``'s successes.

    An identity is reused until ``min(attested + max_ttl, token expiry)`` by ``clock``.
    Failures are never cached. At most ``max_entries`` identities are kept, the least
    recently used leaving first. Concurrent attestations of one token share one call to
    ``inner``. Tokens are kept only as SHA-256 digests.
    """

    def __init__(
        self,
        inner: Attestor,
        clock: Clock,
        max_ttl: timedelta = timedelta(seconds=60),
        max_entries: int = 10_000,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._inner = inner
        self._clock = clock
        self._max_ttl = max_ttl
        self._max_entries = max_entries
        self._entries: OrderedDict[bytes, tuple[KubernetesIdentity, datetime]] = OrderedDict()
        self._pending: dict[bytes, asyncio.Task[KubernetesIdentity]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    async def attest(self, token: str) -> KubernetesIdentity:
        # surrogatepass: any str has a digest, so odd input reaches `inner` to be refused.
        key = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        cached = self._entries.get(key)
        if cached is not None:
            identity, valid_until = cached
            if self._clock.now() < valid_until:
                self._entries.move_to_end(key)
                return identity
            del self._entries[key]
        task = self._pending.get(key)
        if task is None:
            task = asyncio.ensure_future(self._attest_and_remember(key, token))
            self._pending[key] = task
            task.add_done_callback(lambda done: self._forget_pending(key, done))
        # Shielded: one caller giving up must not cancel the answer the others await.
        return await asyncio.shield(task)

    async def _attest_and_remember(self, key: bytes, token: str) -> KubernetesIdentity:
        identity = await self._inner.attest(token)
        now = self._clock.now()
        valid_until = now + self._max_ttl
        if identity.expires_at is not None:
            valid_until = min(valid_until, identity.expires_at)
        if valid_until > now:
            self._entries[key] = (identity, valid_until)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return identity

    def _forget_pending(self, key: bytes, done: asyncio.Task[KubernetesIdentity]) -> None:
        if self._pending.get(key) is done:
            del self._pending[key]
        if not done.cancelled():
            # Retrieve it, so a failure nobody awaited any more is not logged as lost.
            done.exception()
