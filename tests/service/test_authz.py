"""The authorization service: atomic swaps, failed loads that change nothing, recording."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from meshca.core.errors import InvalidPolicy
from meshca.core.policy import DecisionRecord, PolicyProblem, PolicySet, Reason
from meshca.service.authz import AuthorizationService, PolicyStatus
from tests.core.policy.helpers import policies, req, workload
from tests.fakes import FakeClock

ALLOW_WEB = """
apiVersion: meshca.io/v1
kind: AuthorizationPolicy
metadata: {name: web, namespace: shop}
spec:
  rules:
  - from: [{source: {principals: ["spiffe://cluster.local/ns/shop/sa/web"]}}]
    when: [{key: "request.headers[x-tenant]", values: ["*"]}]
---
apiVersion: meshca.io/v1
kind: AuthorizationPolicy
metadata: {name: watch-posts, namespace: shop}
spec:
  action: AUDIT
  rules: [{to: [{operation: {methods: [POST]}}]}]
"""
WEB = workload("shop", "web")
API = workload("shop", "api")


@dataclass
class FakeSource:
    """Serves ``sets[current]``; a name starting with 'bad' raises InvalidPolicy."""

    sets: dict[str, PolicySet]
    current: str = "v1"
    loads: int = 0

    def version(self) -> str:
        return self.current

    def load(self) -> PolicySet:
        self.loads += 1
        if self.current.startswith("bad"):
            problem = PolicyProblem("a.yaml", 1, 3, "spec.action", "bad action")
            raise InvalidPolicy([problem])
        return self.sets[self.current]


@dataclass
class MemoryDecisionLog:
    records: list[DecisionRecord] = field(default_factory=list)

    def record(self, record: DecisionRecord) -> None:
        self.records.append(record)


def service(
    source: FakeSource | None = None, **kwargs: object
) -> tuple[AuthorizationService, MemoryDecisionLog, list[PolicyStatus]]:
    log = MemoryDecisionLog()
    seen: list[PolicyStatus] = []

    async def on_status(status: PolicyStatus) -> None:
        seen.append(status)

    authz = AuthorizationService(
        source=source,
        clock=FakeClock(),
        decision_log=log,
        on_status=on_status,
        **kwargs,  # type: ignore[arg-type]
    )
    return authz, log, seen


def sets() -> dict[str, PolicySet]:
    return {"v1": policies(ALLOW_WEB, "v1"), "v2": policies("", "v2")}


async def test_nothing_served_before_the_first_load() -> None:
    authz, _, _ = service(FakeSource(sets()), default_allow=True)
    decision = authz.check(req(WEB, API, headers={"x-tenant": "a"}), api="test")
    assert not decision.allowed and decision.reason is Reason.NOT_LOADED
    assert not authz.status().healthy


async def test_reload_swaps_and_a_bad_set_changes_nothing() -> None:
    source = FakeSource(sets())
    authz, _, seen = service(source)
    ok = req(WEB, API, headers={"x-tenant": "a"})
    assert await authz.reload() is True
    assert authz.check(ok, api="test").allowed
    assert authz.status().healthy and authz.status().version == "v1"

    assert await authz.reload() is False  # unchanged content is not compiled again
    assert source.loads == 1

    source.current = "bad-1"
    assert await authz.reload() is False
    decision = authz.check(ok, api="test")
    assert decision.allowed and decision.version == "v1"
    status = authz.status()
    assert not status.healthy and status.version == "v1" and status.reload_failures == 1
    assert status.last_error == "a.yaml, document 1, line 3: spec.action: bad action"
    assert seen[-1].healthy is False

    assert await authz.reload() is False  # the same bad content is not retried
    assert source.loads == 2

    source.current = "v2"
    assert await authz.reload() is True
    decision = authz.check(ok, api="test")
    assert not decision.allowed and decision.version == "v2"
    assert decision.reason is Reason.DEFAULT_DENY
    assert authz.status().healthy and seen[-1].healthy and authz.status().reloads == 2


async def test_checks_during_swaps_see_one_whole_set() -> None:
    source = FakeSource(sets())
    authz, _, _ = service(source)
    await authz.reload()
    ok = req(WEB, API, headers={"x-tenant": "a"})
    seen: set[tuple[str, bool]] = set()

    async def checker() -> None:
        for _ in range(200):
            decision = authz.check(ok, api="test")
            seen.add((decision.version, decision.allowed))
            await asyncio.sleep(0)

    async def flipper() -> None:
        for i in range(20):
            source.current = "v2" if i % 2 == 0 else "v1"
            await authz.reload()

    await asyncio.gather(checker(), flipper())
    assert seen <= {("v1", True), ("v2", False)}


async def test_recording_samples_allows_but_keeps_every_deny_and_audit() -> None:
    draws = iter([0.9, 0.1])
    authz, log, _ = service(FakeSource(sets()), sample_rate=0.5, random=lambda: next(draws))
    await authz.reload()
    allowed = req(WEB, API, headers={"x-tenant": "a", "authorization": "Bearer secret"})
    authz.check(allowed, api="test")  # 0.9: not sampled
    authz.check(allowed, api="test")  # 0.1: sampled
    authz.check(req(workload("shop", "evil"), API), api="test")
    authz.check(req(WEB, API, "POST", headers={"x-tenant": "a"}), api="test")  # audited
    assert [(r.allowed, r.audit) for r in log.records] == [
        (True, ()),
        (False, ()),
        (True, ("shop/watch-posts",)),
    ]
    first = log.records[0]
    assert first.headers == {"x-tenant": "a"}  # referenced headers only, never credentials
    assert first.policy == "shop/web" and first.rule == 0 and first.version == "v1"
    assert authz.status().allowed == 3 and authz.status().denied == 1


async def test_sample_rate_zero_records_only_denies() -> None:
    authz, log, _ = service(FakeSource(sets()), sample_rate=0.0)
    await authz.reload()
    authz.check(req(WEB, API, headers={"x-tenant": "a"}), api="test")
    authz.check(req(WEB, API), api="test")
    assert [r.allowed for r in log.records] == [False]


def test_sample_rate_is_checked() -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        AuthorizationService(source=None, clock=FakeClock(), sample_rate=1.5)


async def test_run_polls_until_stopped() -> None:
    source = FakeSource(sets())
    authz, _, _ = service(source)
    stop = asyncio.Event()
    task = asyncio.create_task(authz.run(stop, 0.01))
    for _ in range(200):
        if authz.status().version == "v1":
            break
        await asyncio.sleep(0.01)
    assert authz.status().version == "v1"
    stop.set()
    await asyncio.wait_for(task, 2)


async def test_explain_uses_the_served_set_and_records_nothing() -> None:
    authz, log, _ = service(FakeSource(sets()))
    await authz.reload()
    text = authz.explain(req(WEB, API)).render()
    assert "no-allow-match" in text and "request has no header x-tenant" in text
    assert log.records == []
