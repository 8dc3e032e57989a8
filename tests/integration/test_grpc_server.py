"""The real server over TLS, called as istio-agent and as a meshca client would."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import redirect_stdout
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc
from meshca.adapters.grpc._gen.meshca.v1 import ca_pb2, ca_pb2_grpc
from meshca.adapters.storage.audit_log import SqlAuditLog
from meshca.adapters.storage.engine import make_engine
from meshca.cli import main as meshca_main
from meshca.core.audit import AuditRecord
from tests.core.builders import csr_der, csr_pem, lint_findings, private_key, tamper_signature
from tests.integration.server_harness import RunningServer, running_server

pytestmark = pytest.mark.integration

WEB_ID = "spiffe://example.org/ns/default/sa/web"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async for running in running_server(tmp_path):
        yield running


def _key_and_csr(
    uris: tuple[str, ...] = (), ca: bool = False
) -> tuple[ec.EllipticCurvePrivateKey, x509.CertificateSigningRequest]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), False
        )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    return key, builder.sign(key, hashes.SHA256())


def _pem(csr: x509.CertificateSigningRequest) -> str:
    return csr.public_bytes(serialization.Encoding.PEM).decode()


async def _create(
    server: RunningServer, csr_pem: str, token: str | None, ttl: int = 0
) -> list[str]:
    metadata = [("authorization", f"Bearer {token}")] if token is not None else []
    async with server.channel() as channel:
        stub = istio_grpc.IstioCertificateServiceStub(channel)
        response = await stub.CreateCertificate(
            istio_pb2.IstioCertificateRequest(csr=csr_pem, validity_duration=ttl),
            metadata=metadata,
            timeout=10,
        )
    return list(response.cert_chain)


async def _records(server: RunningServer) -> list[AuditRecord]:
    engine = make_engine(server.settings.effective_database_url)
    log = SqlAuditLog(engine)
    try:
        return list(await log.list(limit=1000))
    finally:
        await log.aclose()
        engine.dispose()


def _bundle_from_cli(data_dir: Path) -> list[x509.Certificate]:
    out = io.StringIO()
    with redirect_stdout(out):
        assert meshca_main(["ca", "bundle", "--data-dir", str(data_dir)]) == 0
    return x509.load_pem_x509_certificates(out.getvalue().encode())


async def test_istio_client_gets_a_chain_that_verifies_parses_and_lints(
    server: RunningServer,
) -> None:
    key, csr = _key_and_csr(uris=(WEB_ID,))
    chain_pem = await _create(server, _pem(csr), server.minter.mint(), ttl=3600)

    assert len(chain_pem) == 3  # leaf, intermediate, root
    assert all(p.endswith("\n") for p in chain_pem)
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in chain_pem]
    roots = _bundle_from_cli(server.settings.data_dir)
    assert chain[-1] == roots[0]  # root last
    verifier = PolicyBuilder().store(Store(roots)).build_client_verifier()
    verified = verifier.verify(chain[0], chain[1:-1])
    assert [str(s.value) for s in verified.subjects or []] == [WEB_ID]

    svid = spiffe.X509Svid.parse_raw(
        b"".join(c.public_bytes(serialization.Encoding.DER) for c in chain[:-1]),
        key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    assert str(svid.spiffe_id) == WEB_ID
    # pkilint knows only web URI schemes: its spiffe:// finding is the one known false positive.
    assert lint_findings(chain[0], ignore=frozenset({"pkix.invalid_uri_syntax"})) == []

    [record] = [r for r in await _records(server) if r.api.startswith("istio")]
    assert record.outcome == "issued"
    assert record.serial == f"{chain[0].serial_number:x}"
    assert record.pod_name == "web-pod" and record.node_name == "node-1"
    assert record.peer and "127.0.0.1" in record.peer


async def test_meshca_sign_returns_leaf_chain_bundle_and_expiry(server: RunningServer) -> None:
    _, csr = _key_and_csr()
    async with server.channel() as channel:
        response = await ca_pb2_grpc.CertificateServiceStub(channel).Sign(
            ca_pb2.SignRequest(csr=csr.public_bytes(serialization.Encoding.DER), ttl_seconds=600),
            metadata=[("authorization", f"Bearer {server.minter.mint('shop', 'cart')}")],
        )
    leaf = x509.load_pem_x509_certificate(response.certificate.encode())
    assert response.spiffe_id == "spiffe://example.org/ns/shop/sa/cart"
    assert response.serial == f"{leaf.serial_number:x}"
    assert response.expires_at.ToDatetime().replace(tzinfo=leaf.not_valid_after_utc.tzinfo) == (
        leaf.not_valid_after_utc
    )
    # The requested 10 minutes from now (notBefore is backdated, never before the issuer).
    assert abs((leaf.not_valid_after_utc - datetime.now(UTC)).total_seconds() - 600) < 5
    assert len(response.intermediates) == 1 and len(response.bundle) == 1


async def test_trust_bundle_get_and_watch(server: RunningServer) -> None:
    async with server.channel() as channel:
        stub = ca_pb2_grpc.CertificateServiceStub(channel)
        bundle = await stub.GetTrustBundle(ca_pb2.GetTrustBundleRequest())
        stream = stub.WatchTrustBundle(ca_pb2.WatchTrustBundleRequest())
        first = await asyncio.wait_for(stream.read(), 5)
        stream.cancel()
    assert bundle.trust_domain == "example.org"
    # Version 1 held the first root; version 2 added the first JWT-SVID key.
    assert bundle.roots == first.roots and first.sequence == bundle.sequence == 2
    assert bundle.jwt_bundle == first.jwt_bundle and b'"use": "jwt-svid"' in bundle.jwt_bundle
    assert bundle.roots[0].encode() == server.roots_pem


def _tampered_pem() -> str:
    der = tamper_signature(csr_der())
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM).decode()


HOSTILE = [
    pytest.param(dict(token=None), grpc.StatusCode.UNAUTHENTICATED, id="fail/no-token"),
    pytest.param(dict(token="not.a.jwt"), grpc.StatusCode.UNAUTHENTICATED, id="fail/garbage-token"),
    pytest.param(
        dict(claims={"aud": ["someone-else"]}),
        grpc.StatusCode.UNAUTHENTICATED,
        id="fail/wrong-audience",
    ),
    pytest.param(
        dict(claims={"iss": "https://evil"}),
        grpc.StatusCode.UNAUTHENTICATED,
        id="fail/wrong-issuer",
    ),
    pytest.param(dict(claims={"exp": 1_000}), grpc.StatusCode.UNAUTHENTICATED, id="fail/expired"),
    pytest.param(
        dict(csr="-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"),
        grpc.StatusCode.INVALID_ARGUMENT,
        id="fail/garbage-csr",
    ),
    pytest.param(
        dict(uris=("spiffe://example.org/ns/kube-system/sa/admin",)),
        grpc.StatusCode.PERMISSION_DENIED,
        id="fail/other-identity",
    ),
    pytest.param(
        dict(uris=(WEB_ID, "spiffe://example.org/ns/x/sa/y")),
        grpc.StatusCode.PERMISSION_DENIED,
        id="fail/two-identities",
    ),
    pytest.param(dict(ca=True), grpc.StatusCode.INVALID_ARGUMENT, id="fail/ca-true"),
    pytest.param(
        dict(csr=csr_pem(private_key("rsa-1024")).decode()),
        grpc.StatusCode.INVALID_ARGUMENT,
        id="fail/weak-key",
    ),
    pytest.param(
        dict(csr=_tampered_pem()), grpc.StatusCode.INVALID_ARGUMENT, id="fail/tampered-csr"
    ),
    pytest.param(
        dict(token="eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."),
        grpc.StatusCode.UNAUTHENTICATED,
        id="fail/alg-none",
    ),
    pytest.param(dict(csr="x" * 70_000), grpc.StatusCode.RESOURCE_EXHAUSTED, id="fail/oversized"),
]


@pytest.mark.parametrize(("case", "status"), HOSTILE)
async def test_hostile_requests_are_refused_recorded_and_survived(
    server: RunningServer, case: dict[str, object], status: grpc.StatusCode
) -> None:
    _, csr = _key_and_csr(uris=case.get("uris", ()), ca=bool(case.get("ca")))  # type: ignore[arg-type]
    csr_pem = str(case.get("csr", _pem(csr)))
    token = case["token"] if "token" in case else server.minter.mint(**case.get("claims", {}))  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _create(server, csr_pem, token)  # type: ignore[arg-type]
    assert caught.value.code() == status, caught.value.details()
    assert "eyJ" not in (caught.value.details() or "")  # no token echoed back

    records = await _records(server)
    if status != grpc.StatusCode.RESOURCE_EXHAUSTED:
        # Oversized messages are cut off by gRPC before meshca sees them.
        refused = [r for r in records if r.outcome == "refused"]
        assert len(refused) == 1, records
    assert not [r for r in records if r.outcome == "issued" and r.api.startswith("istio")]

    async with server.channel() as channel:  # still up
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param([("authorization", "Basic d2ViOnB3")], id="fail/basic-scheme"),
        pytest.param([("authorization", "Bearer ")], id="fail/empty-bearer"),
        pytest.param(
            [("authorization", "Bearer a.b.c"), ("authorization", "Bearer d.e.f")],
            id="fail/two-headers",
        ),
    ],
)
async def test_a_malformed_authorization_header_is_refused_and_recorded(
    server: RunningServer, metadata: list[tuple[str, str]]
) -> None:
    _, csr = _key_and_csr(uris=(WEB_ID,))
    async with server.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await istio_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
                istio_pb2.IstioCertificateRequest(csr=_pem(csr)), metadata=metadata, timeout=10
            )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "d2ViOnB3" not in (caught.value.details() or "")
    [refused] = [r for r in await _records(server) if r.outcome == "refused"]
    assert (refused.api, refused.reason) == ("istio.v1.auth.CreateCertificate", "token-malformed")
    assert refused.peer and refused.peer.startswith("ipv4:127.0.0.1:")


async def test_two_hundred_concurrent_requests_get_distinct_serials(
    server: RunningServer,
) -> None:
    csrs = [_pem(_key_and_csr()[1]) for _ in range(20)]
    tokens = [server.minter.mint("load", f"sa-{i}") for i in range(20)]
    chains = await asyncio.gather(
        *(_create(server, csrs[i % 20], tokens[i % 20]) for i in range(200))
    )
    serials = {x509.load_pem_x509_certificate(c[0].encode()).serial_number for c in chains}
    assert len(serials) == 200
    issued = [
        r for r in await _records(server) if r.outcome == "issued" and r.api.startswith("istio")
    ]
    assert {int(r.serial or "0", 16) for r in issued} == serials


async def test_no_certificate_without_its_record(server: RunningServer) -> None:
    # Make the issuance record unwritable underneath the running server.
    engine = make_engine(server.settings.effective_database_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE issuance_record RENAME TO gone")
    engine.dispose()
    _, csr = _key_and_csr()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _create(server, _pem(csr), server.minter.mint())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_reflection_lists_every_service(server: RunningServer) -> None:
    async with server.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = set()
        async for response in responses:
            names = {s.name for s in response.list_services_response.service}
            break
    assert {
        "meshca.v1.CertificateService",
        "istio.v1.auth.IstioCertificateService",
        "grpc.health.v1.Health",
    } <= names


async def test_records_go_to_postgresql_when_asked(
    tmp_path: Path, postgres_database_url: str
) -> None:
    async for server in running_server(tmp_path, database_url=postgres_database_url):
        _, csr = _key_and_csr()
        chain = await _create(server, _pem(csr), server.minter.mint())
        with pytest.raises(grpc.aio.AioRpcError):
            await _create(server, _pem(csr), "forged")
        records = await _records(server)
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    assert server.settings.effective_database_url == postgres_database_url
    by_outcome = {(r.outcome, r.api) for r in records}
    assert ("issued", "istio.v1.auth.CreateCertificate") in by_outcome
    assert ("refused", "istio.v1.auth.CreateCertificate") in by_outcome
    assert f"{leaf.serial_number:x}" in {r.serial for r in records}
