"""The agent's loops over a fake upstream: renewal, failures, the bundle watch."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import pytest

from meshca.core.agent import RenewalPolicy, TrustBundleView
from meshca.core.errors import AuthenticationFailed, BackendUnavailable
from meshca.service.agent import AgentRunner, AgentState
from tests.fakes import FakeClock, FakeUpstream

FAST = RenewalPolicy(
    jitter=0.0, backoff_base=timedelta(milliseconds=10), backoff_cap=timedelta(milliseconds=20)
)


def _runner(
    upstream: FakeUpstream, state: AgentState, read_token: Callable[[], str]
) -> AgentRunner:
    return AgentRunner(
        state,
        upstream,  # type: ignore[arg-type]
        read_token=read_token,
        key_and_csr=lambda: (b"key", b"csr"),
        clock=upstream.clock,
        draw=lambda: 0.5,
        policy=FAST,
    )


async def _until(state: AgentState, predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        tick = state.ticks
        while not predicate():
            tick = await state.wait_tick(tick)


async def test_renew_once_publishes_svid_and_roots() -> None:
    state = AgentState()
    upstream = FakeUpstream(FakeClock())
    svid = await _runner(upstream, state, lambda: "token").renew_once()
    snapshot = state.current
    assert snapshot.svid == svid and snapshot.svid.key_der == b"key"
    assert snapshot.bundle is not None and snapshot.bundle.roots_der == (b"root-1",)
    assert snapshot.bundle.trust_domain == "td"
    assert snapshot.upstream_problem is None and snapshot.version == 1


async def test_failures_keep_the_svid_and_say_why_then_recover() -> None:
    state = AgentState()
    upstream = FakeUpstream(FakeClock(), lifetime=timedelta(seconds=0.1))
    token = {"value": "token"}

    def read_token() -> str:
        if token["value"] is None:
            raise AuthenticationFailed("token file /t cannot be read: No such file")
        return token["value"]

    runner = _runner(upstream, state, read_token)
    await runner.renew_once()
    held = state.current.svid
    token["value"] = None  # type: ignore[assignment]
    task = asyncio.create_task(runner.run_renewal())
    try:
        await _until(state, lambda: state.current.upstream_problem is not None)
        assert "token file /t cannot be read" in (state.current.upstream_problem or "")
        assert state.current.svid == held, "the last good SVID stays"
        upstream.down = True
        token["value"] = "token"
        await _until(state, lambda: "connection refused" in (state.current.upstream_problem or ""))
        assert state.current.svid == held
        upstream.down = False
        await _until(state, lambda: state.current.svid != held)
        assert state.current.upstream_problem is None
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_bundle_watch_reconnects_and_newer_snapshots_wake_waiters() -> None:
    state = AgentState()
    upstream = FakeUpstream(FakeClock())
    runner = _runner(upstream, state, lambda: "token")
    waiter = asyncio.create_task(state.wait_newer(0))
    task = asyncio.create_task(runner.run_bundle_watch())
    try:
        await upstream.bundles.put(TrustBundleView("td", (b"r1",), 1))
        first = await asyncio.wait_for(waiter, 5)
        assert first.bundle is not None and first.bundle.roots_der == (b"r1",)
        await upstream.bundles.put(BackendUnavailable("stream reset"))
        await _until(state, lambda: "stream reset" in (state.current.upstream_problem or ""))
        assert state.current.bundle == first.bundle, "the last bundle stays"
        await upstream.bundles.put(TrustBundleView("td", (b"r2", b"r1"), 2))
        second = await asyncio.wait_for(state.wait_newer(first.version), 5)
        assert second.bundle is not None and second.bundle.roots_der == (b"r2", b"r1")
        # A repeat of the same roots is not a change.
        await upstream.bundles.put(TrustBundleView("td", (b"r2", b"r1"), 3))
        await asyncio.sleep(0.05)
        assert state.current.version == second.version
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_tainted_issuer_in_the_bundle_makes_the_agent_renew_now() -> None:
    import hashlib

    state = AgentState()
    upstream = FakeUpstream(FakeClock(), lifetime=timedelta(hours=1))
    upstream.intermediates = (b"intermediate-1",)
    runner = _runner(upstream, state, lambda: "token")
    tasks = [
        asyncio.create_task(runner.run_renewal()),
        asyncio.create_task(runner.run_bundle_watch()),
    ]
    try:
        await _until(state, lambda: state.current.svid is not None)
        assert upstream.signed == 1
        # Another authority tainted: nothing to do (half-life is 30 minutes away).
        other = hashlib.sha256(b"intermediate-0").hexdigest()
        await upstream.bundles.put(
            TrustBundleView("td", (b"root-1", b"root-0"), 2, frozenset({other}))
        )
        await _until(state, lambda: state.current.bundle.sequence == 2)  # type: ignore[union-attr]
        await asyncio.sleep(0.1)
        assert upstream.signed == 1
        # Its own issuer tainted, and a lagging server still signing with it: it renews
        # at once, and again after the backoff, until the successor signs.
        tainted = hashlib.sha256(b"intermediate-1").hexdigest()
        await upstream.bundles.put(
            TrustBundleView("td", (b"root-1", b"root-2"), 3, frozenset({tainted}))
        )
        await _until(state, lambda: upstream.signed >= 3)
        upstream.intermediates = (b"intermediate-2",)
        await _until(state, lambda: state.current.svid.chain_der[1] == b"intermediate-2")  # type: ignore[union-attr]
        settled = upstream.signed
        await asyncio.sleep(0.1)
        assert upstream.signed == settled
    finally:
        for task in tasks:
            task.cancel()
