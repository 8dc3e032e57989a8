"""Errors never echo secrets or large inputs back: every gRPC method of the callers table,
called with hostile input by callers without the right to see the policy set."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from meshca.adapters.grpc._gen.io.linkerd.proxy.identity import (
    identity_pb2,
    identity_pb2_grpc,
)
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc
from meshca.adapters.grpc._gen.meshca.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    ca_pb2,
    ca_pb2_grpc,
    jwt_pb2,
    jwt_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
)
from meshca.adapters.grpc.errors import MAX_DETAIL_CHARS
from meshca.core.callers import CALLERS, Access
from tests.integration.server_harness import RunningServer
from tests.integration.test_ext_authz import BACKEND, FRONTEND, check_request
from tests.integration.test_policy_port import (
    AUDIT_TOKEN,
    _bearer,
    _channel,
    _issue,
    _policy_channel,
    _signed_by_meshca,
    full_server,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
#: Stands for a secret: a token's signature, a CSR body. It must never come back.
SECRET = "Zq7Xw9secretMarkerK3v"
#: A service-account token whose header and claims look right but whose signature is ours.
FORGED = ".".join(
    (
        base64.urlsafe_b64encode(b'{"alg":"ES256","kid":"test-key-1"}').decode().rstrip("="),
        base64.urlsafe_b64encode(b'{"iss":"x","sub":"y"}').decode().rstrip("="),
        SECRET * 4,
    )
)
#: Secrets at length (~60 KiB, under gRPC's 64 KiB message cap): a token, a CSR body.
HUGE_SECRET = SECRET * 3000
#: A large input that is no secret (a page token, a serial, a path): echoed in part at most.
LARGE = "x" * 60_000
CSR_BODY = b"-----BEGIN CERTIFICATE REQUEST-----\n" + SECRET.encode() * 400 + b"\n"


def _policy_names() -> set[str]:
    names = set()
    for path in (REPO / "policies").glob("*.yaml"):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                names.add(document["metadata"]["name"])
    assert len(names) >= 5
    return names


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async for running in full_server(tmp_path):
        yield running


Call = Callable[[], Awaitable[Any]]


async def _first(stream: Any) -> Any:
    async for item in stream:
        stream.cancel()
        return item
    return None


async def test_no_error_of_any_api_echoes_a_secret_a_large_input_or_the_policy_set(
    server: RunningServer,
) -> None:
    proxy = await _issue(server, "shop", "frontend")
    now = datetime.now(UTC)
    stranger = _signed_by_meshca(
        server,
        "spiffe://other.example/ns/shop/sa/frontend",
        not_before=now - timedelta(minutes=1),
        not_after=now + timedelta(minutes=10),
    )
    good_token = server.minter.mint("shop", "cart")
    main = server.channel()
    policy_port = _policy_channel(server, proxy)
    stranger_port = _policy_channel(server, stranger)
    audit_port = _channel(server, server.worker.audit_port, proxy)
    ca = ca_pb2_grpc.CertificateServiceStub(main)
    istio = istio_grpc.IstioCertificateServiceStub(main)
    audit = audit_pb2_grpc.AuditServiceStub(main)
    jwt_svid = jwt_pb2_grpc.JwtSvidServiceStub(main)
    check = check_request(FRONTEND, BACKEND, "GET", "/admin/" + LARGE, cookie=SECRET)
    explain = policy_pb2.PolicyCheckRequest(
        source_principal=FRONTEND, destination_principal=BACKEND, method="GET", path="/admin"
    )
    list_request = audit_pb2.ListRecordsRequest(page_token=LARGE)

    calls: dict[str, list[Call]] = {
        "meshca.v1.CertificateService/Sign": [
            lambda: ca.Sign(ca_pb2.SignRequest(csr=CSR_BODY), timeout=10),
            lambda: ca.Sign(ca_pb2.SignRequest(csr=CSR_BODY), metadata=_bearer(FORGED)),
            lambda: ca.Sign(ca_pb2.SignRequest(csr=CSR_BODY), metadata=_bearer(good_token)),
            lambda: ca.Sign(
                ca_pb2.SignRequest(csr=HUGE_SECRET.encode()), metadata=_bearer(good_token)
            ),
            lambda: ca.Sign(ca_pb2.SignRequest(), metadata=_bearer(HUGE_SECRET)),
        ],
        "istio.v1.auth.IstioCertificateService/CreateCertificate": [
            lambda: istio.CreateCertificate(
                istio_pb2.IstioCertificateRequest(csr=CSR_BODY.decode()), metadata=_bearer(FORGED)
            ),
            lambda: istio.CreateCertificate(
                istio_pb2.IstioCertificateRequest(csr=CSR_BODY.decode()),
                metadata=_bearer(good_token),
            ),
            lambda: istio.CreateCertificate(
                istio_pb2.IstioCertificateRequest(csr=HUGE_SECRET), metadata=_bearer(good_token)
            ),
        ],
        "io.linkerd.proxy.identity.Identity/Certify": [
            lambda: identity_pb2_grpc.IdentityStub(main).Certify(
                # A well-formed name (a plain field, not a secret), so the forged token
                # and the CSR body are what gets refused.
                identity_pb2.CertifyRequest(
                    identity="cart.shop.serviceaccount.identity.linkerd.cluster.local",
                    token=FORGED.encode(),
                    certificate_signing_request=CSR_BODY,
                )
            ),
        ],
        "meshca.v1.JwtSvidService/SignJwtSvid": [
            lambda: jwt_svid.SignJwtSvid(
                jwt_pb2.SignJwtSvidRequest(audiences=[SECRET]), metadata=_bearer(FORGED)
            ),
            lambda: jwt_svid.SignJwtSvid(
                jwt_pb2.SignJwtSvidRequest(audiences=[LARGE]), metadata=_bearer(good_token)
            ),
            lambda: jwt_svid.SignJwtSvid(
                jwt_pb2.SignJwtSvidRequest(audiences=["a"], spiffe_id=HUGE_SECRET[:4000]),
                metadata=_bearer(good_token),
            ),
            lambda: jwt_svid.SignJwtSvid(
                jwt_pb2.SignJwtSvidRequest(audiences=["a"]), metadata=_bearer(HUGE_SECRET)
            ),
        ],
        "meshca.v1.CertificateService/GetTrustBundle": [
            lambda: ca.GetTrustBundle(ca_pb2.GetTrustBundleRequest(), metadata=_bearer(FORGED)),
        ],
        "meshca.v1.CertificateService/WatchTrustBundle": [
            lambda: _first(
                ca.WatchTrustBundle(ca_pb2.WatchTrustBundleRequest(), metadata=_bearer(FORGED))
            ),
        ],
        "envoy.service.auth.v3.Authorization/Check": [
            lambda: external_auth_pb2_grpc.AuthorizationStub(stranger_port).Check(check),
            lambda: external_auth_pb2_grpc.AuthorizationStub(main).Check(check),
        ],
        "meshca.v1.PolicyService/Check": [
            lambda: policy_pb2_grpc.PolicyServiceStub(policy_port).Check(explain),
            lambda: policy_pb2_grpc.PolicyServiceStub(policy_port).Check(
                explain, metadata=_bearer(FORGED)
            ),
        ],
        "meshca.v1.PolicyService/Explain": [
            lambda: policy_pb2_grpc.PolicyServiceStub(policy_port).Explain(explain),
            lambda: policy_pb2_grpc.PolicyServiceStub(stranger_port).Explain(
                explain, metadata=_bearer(HUGE_SECRET)
            ),
        ],
        "meshca.v1.PolicyService/Status": [
            lambda: policy_pb2_grpc.PolicyServiceStub(policy_port).Status(
                policy_pb2.PolicyStatusRequest()
            ),
            lambda: policy_pb2_grpc.PolicyServiceStub(policy_port).Status(
                policy_pb2.PolicyStatusRequest(), metadata=[("authorization", "Basic " + SECRET)]
            ),
        ],
        "meshca.v1.AuditService/ListIssuances": [
            lambda: audit.ListIssuances(list_request, metadata=_bearer(FORGED)),
            lambda: audit.ListIssuances(list_request, metadata=_bearer(AUDIT_TOKEN)),
            lambda: audit_pb2_grpc.AuditServiceStub(audit_port).ListIssuances(list_request),
        ],
        "meshca.v1.AuditService/ListRefusals": [
            lambda: audit.ListRefusals(list_request, metadata=_bearer(AUDIT_TOKEN)),
        ],
        "meshca.v1.AuditService/GetIssuance": [
            lambda: audit.GetIssuance(
                audit_pb2.GetIssuanceRequest(serial=LARGE), metadata=_bearer(AUDIT_TOKEN)
            ),
            lambda: audit.GetIssuance(
                audit_pb2.GetIssuanceRequest(serial="ab"), metadata=_bearer(FORGED)
            ),
        ],
        "meshca.v1.AuditService/Export": [
            lambda: _first(audit.Export(audit_pb2.ExportRequest(), metadata=_bearer(FORGED))),
        ],
        "meshca.v1.AuditService/GetSignedTreeHead": [
            lambda: audit.GetSignedTreeHead(
                audit_pb2.GetSignedTreeHeadRequest(), metadata=_bearer(HUGE_SECRET)
            ),
        ],
        "meshca.v1.AuditService/GetInclusionProof": [
            lambda: audit.GetInclusionProof(
                audit_pb2.GetInclusionProofRequest(serial=LARGE), metadata=_bearer(AUDIT_TOKEN)
            ),
        ],
        "meshca.v1.AuditService/GetConsistencyProof": [
            lambda: audit.GetConsistencyProof(
                audit_pb2.GetConsistencyProofRequest(old_size=2**62, new_size=2**63 - 1),
                metadata=_bearer(AUDIT_TOKEN),
            ),
        ],
        "meshca.v1.AuditService/GetLogInfo": [
            lambda: audit.GetLogInfo(audit_pb2.GetLogInfoRequest(), metadata=_bearer(FORGED)),
        ],
        "grpc.health.v1.Health/Check": [
            lambda: health_pb2_grpc.HealthStub(main).Check(
                health_pb2.HealthCheckRequest(service=LARGE)
            ),
        ],
        "grpc.health.v1.Health/Watch": [
            lambda: _first(
                health_pb2_grpc.HealthStub(main).Watch(health_pb2.HealthCheckRequest(service=LARGE))
            ),
        ],
        "grpc.health.v1.Health/List": [
            lambda: health_pb2_grpc.HealthStub(main).List(health_pb2.HealthListRequest()),
        ],
        "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": [
            lambda: _first(
                reflection_pb2_grpc.ServerReflectionStub(policy_port).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(file_by_filename=SECRET)])
                )
            ),
        ],
    }
    # The agent's socket (local, no secrets sent in) has its hostile input in test_agent.py.
    grpc_methods = {
        m
        for row in CALLERS
        if row.access is not Access.LOCAL_SOCKET
        for m in row.methods
        if "/" in m and " " not in m
    }
    assert set(calls) == grpc_methods, "a method of the table has no hostile-input case"

    policy_names = _policy_names()
    refused = 0
    try:
        for method, cases in calls.items():
            for index, call in enumerate(cases):
                try:
                    await call()
                    continue
                except grpc.aio.AioRpcError as error:
                    details = error.details() or ""
                    where = f"{method} case {index}: {error.code().name}"
                refused += 1
                assert SECRET not in details, where
                assert len(details) <= MAX_DETAIL_CHARS, where
                assert not any(name in details for name in policy_names), (where, details)
    finally:
        for channel in (main, policy_port, stranger_port, audit_port):
            await channel.close()
    # Most cases are refusals; the public ones (bundle, health list) are served.
    assert refused >= 25
