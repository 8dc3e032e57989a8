"""``--issuance-rate`` in the signing use case: after attestation, by pod, recorded."""

from __future__ import annotations

from datetime import timedelta

import pytest

from meshca.core import errors
from meshca.core.audit import Outcome
from meshca.core.identity import KubernetesIdentity
from meshca.core.issuance import IssuancePolicy
from meshca.core.rate_limit import IssuanceRate, RateLimiter
from meshca.service.ca import CertificateService, SignRequest, rate_limit_key
from tests.core.builders import NOW, TRUST_DOMAIN, build_pki, csr_pem
from tests.fakes import FakeAttestor, FakeClock, MemoryAuditLog

POD_1 = KubernetesIdentity("default", "web", pod_name="web-1", pod_uid="uid-1")
POD_2 = KubernetesIdentity("default", "web", pod_name="web-2", pod_uid="uid-2")
OTHER = KubernetesIdentity("default", "api", pod_name="api-1", pod_uid="uid-3")
NO_POD = KubernetesIdentity("default", "web")
LONG_UID = KubernetesIdentity("default", "web", pod_uid="u" * 5000)
TOKENS = {
    "pod-1": POD_1,
    "pod-1-again": POD_1,  # a second token bound to the same pod
    "pod-2": POD_2,
    "other": OTHER,
    "no-pod-a": NO_POD,
    "no-pod-b": NO_POD,
    "long-uid": LONG_UID,
}


def _service(
    audit: MemoryAuditLog, clock: FakeClock, rate: IssuanceRate | None
) -> CertificateService:
    serials = iter(range(1 << 100, (1 << 100) + 10_000))
    return CertificateService(
        trust_domain=TRUST_DOMAIN,
        attestor=FakeAttestor(dict(TOKENS)),
        audit_log=audit,
        authority=lambda: build_pki().authority,
        clock=clock,
        policy=IssuancePolicy(default_ttl=timedelta(hours=1), max_ttl=timedelta(hours=24)),
        new_serial=lambda: next(serials),
        rate_limiter=None if rate is None else RateLimiter(rate),
    )


def _request(token: str | None, sa: str = "web") -> SignRequest:
    uri = f"spiffe://example.org/ns/default/sa/{sa}"
    return SignRequest(token=token, csr=csr_pem(uris=[uri]), requested_ttl=None, api="test")


async def _outcomes(service: CertificateService, token: str, times: int, sa: str = "web") -> str:
    out = ""
    for _ in range(times):
        try:
            await service.sign(_request(token, sa))
            out += "i"
        except errors.RateLimited:
            out += "r"
    return out


async def test_a_pod_past_its_rate_is_refused_and_others_are_not() -> None:
    audit, clock = MemoryAuditLog(), FakeClock(NOW)
    service = _service(audit, clock, IssuanceRate(2, timedelta(minutes=1)))
    assert await _outcomes(service, "pod-1", 4) == "iirr"
    # Another token of the same pod shares its count; another pod of the same service
    # account, and another service account, have their own.
    assert await _outcomes(service, "pod-1-again", 1) == "r"
    assert await _outcomes(service, "pod-2", 2) == "ii"
    assert await _outcomes(service, "other", 2, sa="api") == "ii"

    refused = [r for r in audit.records if r.outcome is Outcome.REFUSED]
    assert len(refused) == 3
    for record in refused:
        assert record.reason == "rate-limited"
        assert (record.spiffe_id, record.pod_uid) == (
            "spiffe://example.org/ns/default/sa/web",
            "uid-1",
        )
        assert record.serial is None
        assert "pod uid-1" in record.detail and "2/1m" in record.detail


async def test_the_rate_comes_back_and_hammering_does_not_delay_it() -> None:
    audit, clock = MemoryAuditLog(), FakeClock(NOW)
    service = _service(audit, clock, IssuanceRate(2, timedelta(minutes=1)))
    assert await _outcomes(service, "pod-1", 2) == "ii"
    with pytest.raises(errors.RateLimited) as refused:
        await service.sign(_request("pod-1"))
    assert refused.value.retry_after == timedelta(seconds=30)
    for _ in range(29):
        clock.advance(timedelta(seconds=1))
        assert await _outcomes(service, "pod-1", 3) == "rrr"
    clock.advance(timedelta(seconds=1))
    assert await _outcomes(service, "pod-1", 2) == "ir"
    clock.advance(timedelta(minutes=1))
    assert await _outcomes(service, "pod-1", 3) == "iir"


async def test_tokens_bound_to_no_pod_are_counted_each_by_itself() -> None:
    audit, clock = MemoryAuditLog(), FakeClock(NOW)
    service = _service(audit, clock, IssuanceRate(1, timedelta(minutes=1)))
    assert await _outcomes(service, "no-pod-a", 2) == "ir"
    assert await _outcomes(service, "no-pod-b", 2) == "ir"
    first, second = [r for r in audit.records if r.outcome is Outcome.REFUSED]
    assert "this token" in first.detail and "this token" in second.detail
    assert (first.pod_uid, second.pod_uid) == (None, None)


async def test_unattested_callers_are_not_counted() -> None:
    """A bad token is refused before the limiter: it cannot spend a pod's budget."""
    audit, clock = MemoryAuditLog(), FakeClock(NOW)
    service = _service(audit, clock, IssuanceRate(1, timedelta(minutes=1)))
    for _ in range(5):
        with pytest.raises(errors.AuthenticationFailed):
            await service.sign(_request("forged"))
    assert await _outcomes(service, "pod-1", 1) == "i"


async def test_off_issues_without_limit() -> None:
    audit, clock = MemoryAuditLog(), FakeClock(NOW)
    service = _service(audit, clock, None)
    assert await _outcomes(service, "pod-1", 20) == "i" * 20


def test_keys_are_the_pod_or_a_digest_of_the_token() -> None:
    assert rate_limit_key(POD_1, "t") == "pod:uid-1"
    assert rate_limit_key(POD_1, "t") == rate_limit_key(POD_1, "another token")
    a, b = rate_limit_key(NO_POD, "tok-a"), rate_limit_key(NO_POD, "tok-b")
    assert a != b and a.startswith("token:") and "tok-a" not in a
    # Odd input cannot break the key (surrogates are hashed, not refused here).
    assert rate_limit_key(NO_POD, "\ud800").startswith("token:")


async def test_a_long_pod_uid_is_not_echoed_whole() -> None:
    audit, clock = MemoryAuditLog(), FakeClock(NOW)
    service = _service(audit, clock, IssuanceRate(1, timedelta(minutes=1)))
    await service.sign(_request("long-uid"))
    with pytest.raises(errors.RateLimited) as refused:
        await service.sign(_request("long-uid"))
    assert len(refused.value.message) < 250
