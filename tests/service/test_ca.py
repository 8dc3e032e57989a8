"""The signing use case over fake ports: every request leaves exactly one record."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from cryptography import x509

from meshca.core import errors
from meshca.core.audit import AuditRecord, Outcome
from meshca.core.identity import KubernetesIdentity
from meshca.core.issuance import IssuancePolicy
from meshca.service.ca import MAX_TOKEN_BYTES, CertificateService, LinkerdDoor, SignRequest
from tests.core.builders import NOW, TRUST_DOMAIN, build_pki, csr_der, csr_pem, private_key
from tests.fakes import FakeAttestor, FakeClock, MemoryAuditLog

WEB = KubernetesIdentity(
    namespace="default",
    service_account="web",
    pod_name="web-1",
    pod_uid="uid-1",
    node_name="node-a",
)
WEB_ID = "spiffe://example.org/ns/default/sa/web"


async def _inline(fn: Callable[[], Any]) -> Any:
    return fn()


def _service(
    audit: MemoryAuditLog,
    attestor: FakeAttestor | None = None,
    on_outcome: Callable[[AuditRecord, timedelta], None] | None = None,
    linkerd: LinkerdDoor | None = None,
) -> CertificateService:
    serials = iter(range(1 << 100, (1 << 100) + 10_000))
    return CertificateService(
        trust_domain=TRUST_DOMAIN,
        attestor=attestor or FakeAttestor({"good": WEB}),
        audit_log=audit,
        authority=lambda: build_pki().authority,
        clock=FakeClock(NOW),
        policy=IssuancePolicy(default_ttl=timedelta(hours=1), max_ttl=timedelta(hours=24)),
        new_serial=lambda: next(serials),
        offload=_inline,
        on_outcome=on_outcome,
        linkerd=linkerd,
    )


def _request(token: str | None = "good", csr: bytes | None = None, **kw: Any) -> SignRequest:
    return SignRequest(
        token=token,
        csr=csr if csr is not None else csr_pem(),
        requested_ttl=kw.get("ttl"),
        api="test",
        peer="ipv4:127.0.0.1:1",
    )


async def test_issues_and_records_before_returning() -> None:
    audit = MemoryAuditLog()
    signed = await _service(audit).sign(_request(ttl=timedelta(hours=2)))
    assert str(signed.spiffe_id) == WEB_ID
    assert signed.not_after - NOW == timedelta(hours=2)
    [record] = audit.records
    assert record.outcome is Outcome.ISSUED
    assert record.serial == f"{signed.leaf.serial_number:x}"
    assert (record.pod_name, record.pod_uid, record.node_name) == ("web-1", "uid-1", "node-a")
    assert record.peer == "ipv4:127.0.0.1:1"
    assert record.not_after == signed.not_after
    assert record.fingerprint_sha256 and len(record.fingerprint_sha256) == 64


@pytest.mark.parametrize(
    ("request_", "error", "reason"),
    [
        pytest.param(
            _request(token=None), errors.AuthenticationFailed, "token-missing", id="fail/no-token"
        ),
        pytest.param(
            _request(token="forged"),
            errors.AuthenticationFailed,
            "token-invalid",
            id="fail/bad-token",
        ),
        pytest.param(
            _request(token="x" * (MAX_TOKEN_BYTES + 1)),
            errors.RequestTooLarge,
            "token-too-large",
            id="fail/huge-token",
        ),
        pytest.param(
            _request(csr=b"garbage"), errors.MalformedCsr, "malformed-csr", id="fail/garbage-csr"
        ),
        pytest.param(
            _request(csr=csr_der(uris=["spiffe://example.org/ns/kube-system/sa/admin"])),
            errors.NotAuthorized,
            "csr-identity-mismatch",
            id="fail/other-identity",
        ),
        pytest.param(
            _request(csr=csr_der(ca=True)),
            errors.InvalidRequest,
            "csr-requests-ca",
            id="fail/ca-true",
        ),
        pytest.param(
            _request(csr=csr_der(private_key("rsa-1024"))),
            errors.WeakKey,
            "weak-key",
            id="fail/weak-key",
        ),
    ],
)
async def test_refusals_are_recorded(
    request_: SignRequest, error: type[errors.MeshcaError], reason: str
) -> None:
    audit = MemoryAuditLog()
    with pytest.raises(error):
        await _service(audit).sign(request_)
    [record] = audit.records
    assert record.outcome is Outcome.REFUSED
    assert record.reason == reason
    assert record.serial is None
    assert "forged" not in record.detail  # never the token


async def test_refusal_after_attestation_names_the_caller() -> None:
    audit = MemoryAuditLog()
    with pytest.raises(errors.MalformedCsr):
        await _service(audit).sign(_request(csr=b"\x30\x03\x02\x01\x00"))
    assert audit.records[0].spiffe_id == WEB_ID
    assert audit.records[0].pod_uid == "uid-1"


async def test_no_certificate_leaves_when_the_record_cannot_be_written() -> None:
    audit = MemoryAuditLog(fail=True)
    with pytest.raises(errors.BackendUnavailable):
        await _service(audit).sign(_request())
    assert audit.records == []


async def test_attestor_down_is_unavailable_and_recorded() -> None:
    audit = MemoryAuditLog()
    with pytest.raises(errors.BackendUnavailable):
        await _service(audit, FakeAttestor(down=True)).sign(_request())
    assert audit.records[0].reason == "backend-unavailable"


async def test_unexpected_failure_becomes_internal_error_and_is_recorded() -> None:
    audit = MemoryAuditLog()
    service = _service(audit)

    async def broken(fn: Callable[[], Any]) -> Any:
        raise RuntimeError("boom")

    service._offload = broken
    with pytest.raises(errors.InternalError) as caught:
        await service.sign(_request())
    assert "boom" not in caught.value.message
    assert audit.records[0].reason == "internal"


async def test_concurrent_requests_get_distinct_serials() -> None:
    audit = MemoryAuditLog()
    service = _service(audit)
    results = await asyncio.gather(*(service.sign(_request()) for _ in range(50)))
    serials = {r.leaf.serial_number for r in results}
    assert len(serials) == 50
    assert len(audit.records) == 50
    assert all(isinstance(r.leaf, x509.Certificate) for r in results)


async def test_the_observer_hears_each_outcome_after_its_record() -> None:
    audit = MemoryAuditLog()
    heard: list[tuple[AuditRecord, timedelta, int]] = []
    service = _service(
        audit, on_outcome=lambda record, took: heard.append((record, took, len(audit.records)))
    )
    await service.sign(_request())
    with pytest.raises(errors.AuthenticationFailed):
        await service.sign(_request(token="forged"))
    assert [(r.outcome, r.reason, n) for r, _, n in heard] == [
        (Outcome.ISSUED, "ok", 1),
        (Outcome.REFUSED, "token-invalid", 2),
    ]
    assert [r for r, _, _ in heard] == audit.records
    assert all(took >= timedelta(0) for _, took, _ in heard)


async def test_the_observer_hears_a_certificate_withheld_for_want_of_its_record() -> None:
    heard: list[AuditRecord] = []
    service = _service(MemoryAuditLog(fail=True), on_outcome=lambda r, _: heard.append(r))
    with pytest.raises(errors.BackendUnavailable):
        await service.sign(_request())
    [record] = heard
    assert (record.outcome, record.reason) == (Outcome.REFUSED, "backend-unavailable")
    assert record.serial is None and record.fingerprint_sha256 is None
    assert record.spiffe_id == WEB_ID


async def test_a_failing_observer_does_not_fail_issuance() -> None:
    def broken(record: AuditRecord, took: timedelta) -> None:
        raise RuntimeError("observer bug")

    audit = MemoryAuditLog()
    signed = await _service(audit, on_outcome=broken).sign(_request())
    assert audit.records[0].serial == f"{signed.serial:x}"


# Linkerd's door: its own attestor and names, through the same path and record.

LINKERD_DOMAIN = "linkerd.cluster.local"
WEB_LINKERD = "web.default.serviceaccount.identity.linkerd.cluster.local"


def _linkerd_service(audit: MemoryAuditLog) -> CertificateService:
    # Only tokens for Linkerd's audience pass its door's attestor.
    door = LinkerdDoor(FakeAttestor({"linkerd-token": WEB}), LINKERD_DOMAIN)
    return _service(audit, FakeAttestor({"meshca-token": WEB}), linkerd=door)


def _linkerd_request(
    identity: str = WEB_LINKERD, token: str = "linkerd-token", csr: bytes | None = None
) -> SignRequest:
    return SignRequest(
        token=token,
        csr=csr if csr is not None else csr_der(dns=(WEB_LINKERD,), subject=None),
        requested_ttl=None,
        api="io.linkerd.proxy.identity.Certify",
        linkerd_identity=identity,
    )


async def test_linkerd_door_issues_a_leaf_with_its_dns_name_and_spiffe_id() -> None:
    audit = MemoryAuditLog()
    signed = await _linkerd_service(audit).sign(_linkerd_request())
    san = signed.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [WEB_LINKERD]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WEB_ID]
    [record] = audit.records
    assert (record.outcome, record.api, record.spiffe_id) == (
        Outcome.ISSUED,
        "io.linkerd.proxy.identity.Certify",
        WEB_ID,
    )


async def test_the_other_doors_never_add_dns_names() -> None:
    audit = MemoryAuditLog()
    signed = await _linkerd_service(audit).sign(
        _request(token="meshca-token", csr=csr_pem(dns=(WEB_LINKERD,)))
    )
    san = signed.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []


@pytest.mark.parametrize(
    ("request_", "error", "reason"),
    [
        pytest.param(
            _linkerd_request(token="meshca-token"),
            errors.AuthenticationFailed,
            "token-invalid",
            id="fail/other-doors-token",
        ),
        pytest.param(
            _linkerd_request(identity=WEB_LINKERD.replace("web.", "admin.")),
            errors.NotAuthorized,
            "linkerd-identity-mismatch",
            id="fail/asks-for-another-identity",
        ),
        pytest.param(
            _linkerd_request(identity="web.default"),
            errors.InvalidRequest,
            "linkerd-identity-malformed",
            id="fail/malformed-identity",
        ),
        pytest.param(
            _linkerd_request(csr=csr_pem(dns=(WEB_LINKERD,))),
            errors.MalformedCsr,
            "csr-not-der",
            id="fail/pem-csr",
        ),
        pytest.param(
            _linkerd_request(csr=csr_der(dns=("admin.default.serviceaccount.identity.x",))),
            errors.NotAuthorized,
            "linkerd-identity-mismatch",
            id="fail/csr-names-another",
        ),
    ],
)
async def test_linkerd_refusals_are_recorded_with_the_door(
    request_: SignRequest, error: type[Exception], reason: str
) -> None:
    audit = MemoryAuditLog()
    with pytest.raises(error):
        await _linkerd_service(audit).sign(request_)
    [record] = audit.records
    assert (record.outcome, record.api, record.reason) == (
        Outcome.REFUSED,
        "io.linkerd.proxy.identity.Certify",
        reason,
    )
    assert record.serial is None


async def test_a_meshca_token_is_refused_by_linkerd_and_a_linkerd_token_by_the_others() -> None:
    audit = MemoryAuditLog()
    service = _linkerd_service(audit)
    with pytest.raises(errors.AuthenticationFailed):
        await service.sign(_request(token="linkerd-token"))
    with pytest.raises(errors.AuthenticationFailed):
        await service.sign(_linkerd_request(token="meshca-token"))
