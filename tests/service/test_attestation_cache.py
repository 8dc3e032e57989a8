"""CachingAttestor: reuse, expiry, bounds, sharing, and failures that are never cached."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from meshca.adapters.k8s.token_review import TokenReviewAttestor
from meshca.core.errors import AuthenticationFailed, BackendUnavailable
from meshca.core.identity import KubernetesIdentity
from meshca.service.attestation_cache import CachingAttestor
from tests.fixtures_k8s import FixedClock, K8sApiStandIn

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@dataclass
class CountingAttestor:
    """Tokens "<ns>/<sa>" are valid until ``expires_at``; anything else is refused."""

    expires_at: datetime | None = NOW + timedelta(hours=1)
    calls: list[str] = field(default_factory=list)
    down: bool = False
    gate: asyncio.Event | None = None

    async def attest(self, token: str) -> KubernetesIdentity:
        self.calls.append(token)
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise BackendUnavailable("API server is down")
        namespace, _, account = token.partition("/")
        if not account:
            raise AuthenticationFailed("bad token", reason="token-malformed")
        return KubernetesIdentity(namespace, account, expires_at=self.expires_at)


def cache_for(
    inner: CountingAttestor, clock: FixedClock, *, max_entries: int = 100
) -> CachingAttestor:
    return CachingAttestor(inner, clock, max_ttl=timedelta(seconds=60), max_entries=max_entries)


async def test_second_attest_is_served_from_cache() -> None:
    inner, clock = CountingAttestor(), FixedClock(NOW)
    cache = cache_for(inner, clock)
    first = await cache.attest("shop/cart")
    clock.advance(timedelta(seconds=59))
    assert await cache.attest("shop/cart") == first
    assert inner.calls == ["shop/cart"]


@pytest.mark.parametrize(
    ("token_expiry", "still_cached", "expired"),
    [
        pytest.param(
            NOW + timedelta(hours=1), timedelta(seconds=59), timedelta(seconds=60), id="max-ttl"
        ),
        pytest.param(
            NOW + timedelta(seconds=10),
            timedelta(seconds=9),
            timedelta(seconds=10),
            id="token-expiry",
        ),
        pytest.param(None, timedelta(seconds=59), timedelta(seconds=60), id="no-token-expiry"),
    ],
)
async def test_entry_expires(
    token_expiry: datetime | None, still_cached: timedelta, expired: timedelta
) -> None:
    inner, clock = CountingAttestor(expires_at=token_expiry), FixedClock(NOW)
    cache = cache_for(inner, clock)
    await cache.attest("shop/cart")
    clock.advance(still_cached)
    await cache.attest("shop/cart")
    assert len(inner.calls) == 1
    clock.advance(expired - still_cached)
    await cache.attest("shop/cart")
    assert len(inner.calls) == 2


async def test_already_expired_identity_is_not_cached() -> None:
    inner, clock = CountingAttestor(expires_at=NOW - timedelta(seconds=1)), FixedClock(NOW)
    cache = cache_for(inner, clock)
    await cache.attest("shop/cart")
    await cache.attest("shop/cart")
    assert len(inner.calls) == 2
    assert len(cache) == 0


@pytest.mark.parametrize(
    ("token", "down", "error"),
    [
        pytest.param("garbage", False, AuthenticationFailed, id="fail/refused"),
        pytest.param("shop/cart", True, BackendUnavailable, id="fail/backend-down"),
    ],
)
async def test_failures_are_not_cached(token: str, down: bool, error: type[Exception]) -> None:
    inner = CountingAttestor(down=down)
    cache = cache_for(inner, FixedClock(NOW))
    for _ in range(2):
        with pytest.raises(error):
            await cache.attest(token)
    assert len(inner.calls) == 2


async def test_cache_is_bounded_least_recently_used_first() -> None:
    inner = CountingAttestor()
    cache = cache_for(inner, FixedClock(NOW), max_entries=2)
    await cache.attest("a/x")
    await cache.attest("b/x")
    await cache.attest("a/x")  # a is now the most recently used
    await cache.attest("c/x")  # evicts b
    assert len(cache) == 2
    await cache.attest("a/x")
    await cache.attest("c/x")
    assert inner.calls == ["a/x", "b/x", "c/x"]
    await cache.attest("b/x")
    assert inner.calls[-1] == "b/x"


async def test_concurrent_attests_share_one_inner_call() -> None:
    inner = CountingAttestor(gate=asyncio.Event())
    cache = cache_for(inner, FixedClock(NOW))
    waiting = [asyncio.create_task(cache.attest("shop/cart")) for _ in range(5)]
    await asyncio.sleep(0)
    assert inner.gate is not None
    inner.gate.set()
    identities = await asyncio.gather(*waiting)
    assert len(set(identities)) == 1
    assert inner.calls == ["shop/cart"]


async def test_concurrent_failure_reaches_every_waiter_once() -> None:
    inner = CountingAttestor(gate=asyncio.Event(), down=True)
    cache = cache_for(inner, FixedClock(NOW))
    waiting = [asyncio.create_task(cache.attest("shop/cart")) for _ in range(3)]
    await asyncio.sleep(0)
    assert inner.gate is not None
    inner.gate.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(result, BackendUnavailable) for result in results)
    assert len(inner.calls) == 1


async def test_one_caller_giving_up_does_not_cancel_the_others() -> None:
    inner = CountingAttestor(gate=asyncio.Event())
    cache = cache_for(inner, FixedClock(NOW))
    impatient = asyncio.create_task(cache.attest("shop/cart"))
    patient = asyncio.create_task(cache.attest("shop/cart"))
    await asyncio.sleep(0)
    impatient.cancel()
    assert inner.gate is not None
    inner.gate.set()
    assert (await patient).service_account == "cart"
    with pytest.raises(asyncio.CancelledError):
        await impatient
    assert len(inner.calls) == 1
    assert len(cache) == 1


def test_needs_room_for_one_entry() -> None:
    with pytest.raises(ValueError):
        CachingAttestor(CountingAttestor(), FixedClock(NOW), max_entries=0)


async def test_token_review_is_asked_once(k8s_api: K8sApiStandIn) -> None:
    inner = TokenReviewAttestor(
        api_server=k8s_api.url,
        audiences=["meshca"],
        ca_file=None,
        token_file=str(k8s_api.caller_token_file),
        clock=k8s_api.clock,
    )
    cache = CachingAttestor(inner, k8s_api.clock)
    token = k8s_api.minter.token(ttl=timedelta(minutes=10))
    first = await cache.attest(token)
    assert await cache.attest(token) == first
    assert k8s_api.reviews == 1
    k8s_api.clock.advance(timedelta(minutes=1))
    await cache.attest(token)
    assert k8s_api.reviews == 2
