"""A real ``meshca serve --linkerd-certify``, called as Linkerd's proxy calls its identity
service: ``io.linkerd.proxy.identity.Identity/Certify`` from the generated stubs, with the
token in the request, a DER CSR naming its DNS identity, and DER back."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshca.adapters.grpc._gen.io.linkerd.proxy.identity import identity_pb2, identity_pb2_grpc
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc
from meshca.adapters.grpc._gen.meshca.v1 import ca_pb2, ca_pb2_grpc
from meshca.adapters.storage.audit_log import SqlAuditLog
from meshca.adapters.storage.engine import make_engine
from meshca.cli.ca_cmd import load_bundle
from meshca.core.audit import AuditRecord
from tests.core.builders import private_key
from tests.fixtures_k8s import K8sApiStandIn
from tests.integration.serve_process import ServeProcess, launch
from tests.integration.server_harness import TokenMinter, running_server, serve_command

pytestmark = pytest.mark.integration

API = "io.linkerd.proxy.identity.Certify"
LINKERD_AUDIENCE = "identity.l5d.io"
DOMAIN = "linkerd.cluster.local"
#: The name the proxy expects the identity service to present (LINKERD2_PROXY_IDENTITY_SVC_NAME).
SVC_NAME = f"linkerd-identity.linkerd.serviceaccount.identity.{DOMAIN}"


def linkerd_name(service_account: str, namespace: str = "emojivoto") -> str:
    return f"{service_account}.{namespace}.serviceaccount.identity.{DOMAIN}"


def spiffe_id(service_account: str, namespace: str = "emojivoto") -> str:
    return f"spiffe://example.org/ns/{namespace}/sa/{service_account}"


@dataclass
class Server:
    process: ServeProcess
    minter: TokenMinter
    data_dir: Path

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        return load_bundle(self.data_dir)

    def channel(self) -> grpc.aio.Channel:
        roots = b"".join(r.public_bytes(serialization.Encoding.PEM) for r in self.roots)
        return grpc.aio.secure_channel(
            self.process.target,
            grpc.ssl_channel_credentials(roots),
            # As the proxy does: meshca's TLS name checked against the identity service's.
            options=[("grpc.ssl_target_name_override", SVC_NAME)],
        )

    def token(self, service_account: str, namespace: str = "emojivoto", **claims: Any) -> bytes:
        claims.setdefault("aud", [LINKERD_AUDIENCE])
        return self.minter.mint(namespace, service_account, **claims).encode()

    async def records(self) -> list[AuditRecord]:
        engine = make_engine(f"sqlite:///{self.data_dir.resolve() / 'meshca.db'}")
        log = SqlAuditLog(engine)
        try:
            return list(await log.list(limit=10_000))
        finally:
            await log.aclose()
            engine.dispose()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("linkerd")
    minter, jwks = TokenMinter.create(directory)
    data_dir = directory / "data"
    command = serve_command(
        data_dir,
        jwks,
        workers=1,
        extra=["--linkerd-certify", "--server-name", "localhost", "--server-name", SVC_NAME],
    )
    process = launch("meshca", data_dir, command)
    try:
        yield Server(process, minter, data_dir)
    finally:
        process.stop()


def proxy_csr(*names: x509.GeneralName, key: Any = None) -> bytes:
    """A CSR as linkerd2-proxy makes one: P-256, empty subject, its DNS identity, DER."""
    key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


async def certify(
    server: Server, identity: str, token: bytes, csr: bytes
) -> identity_pb2.CertifyResponse:
    async with server.channel() as channel:
        response: identity_pb2.CertifyResponse = await identity_pb2_grpc.IdentityStub(
            channel
        ).Certify(
            identity_pb2.CertifyRequest(
                identity=identity, token=token, certificate_signing_request=csr
            ),
            timeout=10,
        )
    return response


async def refused(server: Server, identity: str, token: bytes, csr: bytes) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await certify(server, identity, token, csr)
    return caught.value


async def new_records(server: Server, before: int) -> list[AuditRecord]:
    records = await server.records()
    return records[: len(records) - before]


async def test_a_linkerd_proxy_gets_its_dns_identity_and_spiffe_id(server: Server) -> None:
    name = linkerd_name("web")
    before = len(await server.records())
    response = await certify(server, name, server.token("web"), proxy_csr(x509.DNSName(name)))

    leaf = x509.load_der_x509_certificate(response.leaf_certificate)
    intermediates = [x509.load_der_x509_certificate(c) for c in response.intermediate_certificates]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [name]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe_id("web")]
    assert response.valid_until.ToDatetime(tzinfo=UTC) == leaf.not_valid_after_utc
    assert leaf.not_valid_after_utc > datetime.now(UTC)

    # As a Linkerd peer checks it: a server certificate for the DNS identity, and a
    # client certificate, each to the bundle through the intermediates only.
    store = Store(list(server.roots))
    assert not set(server.roots) & set(intermediates)
    PolicyBuilder().store(store).build_server_verifier(x509.DNSName(name)).verify(
        leaf, intermediates
    )
    verified = PolicyBuilder().store(store).build_client_verifier().verify(leaf, intermediates)
    assert x509.DNSName(name) in (verified.subjects or [])

    [record] = await new_records(server, before)
    assert (record.outcome, record.api, record.spiffe_id) == ("issued", API, spiffe_id("web"))
    assert record.serial == f"{leaf.serial_number:x}"
    assert (record.namespace, record.service_account) == ("emojivoto", "web")


async def test_another_identity_is_failed_precondition(server: Server) -> None:
    web, admin = linkerd_name("web"), linkerd_name("admin")
    before = len(await server.records())
    # The proxy asks for admin's name with web's token ...
    asks = await refused(server, admin, server.token("web"), proxy_csr(x509.DNSName(admin)))
    # ... or for its own name with a CSR naming admin.
    signs = await refused(server, web, server.token("web"), proxy_csr(x509.DNSName(admin)))
    assert asks.code() == signs.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert admin in (asks.details() or "") and "web.emojivoto" in (asks.details() or "")
    records = await new_records(server, before)
    assert [(r.outcome, r.api, r.reason) for r in records] == [
        ("refused", API, "linkerd-identity-mismatch")
    ] * 2
    assert {r.spiffe_id for r in records} == {spiffe_id("web")}


@pytest.mark.parametrize(
    "audience",
    [
        pytest.param(["meshca"], id="fail/meshca-audience"),
        pytest.param(["someone-else"], id="fail/other-audience"),
    ],
)
async def test_a_token_for_another_audience_is_invalid_argument(
    server: Server, audience: list[str]
) -> None:
    name = linkerd_name("cart")
    before = len(await server.records())
    error = await refused(
        server, name, server.token("cart", aud=audience), proxy_csr(x509.DNSName(name))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "eyJ" not in (error.details() or "")
    [record] = await new_records(server, before)
    assert (record.outcome, record.api, record.reason) == ("refused", API, "token-wrong-audience")


async def test_each_door_takes_only_the_tokens_minted_for_it(server: Server) -> None:
    """A Linkerd-audience token is refused by the Istio and meshca APIs, and a token the
    Istio API has just accepted (so its attestation is cached) is refused by Certify."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = proxy_csr(key=key)
    linkerd_token = server.token("shop").decode()
    async with server.channel() as channel:
        for call in (
            istio_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
                istio_pb2.IstioCertificateRequest(
                    csr=x509.load_der_x509_csr(pem)
                    .public_bytes(serialization.Encoding.PEM)
                    .decode()
                ),
                metadata=[("authorization", f"Bearer {linkerd_token}")],
                timeout=10,
            ),
            ca_pb2_grpc.CertificateServiceStub(channel).Sign(
                ca_pb2.SignRequest(csr=pem),
                metadata=[("authorization", f"Bearer {linkerd_token}")],
                timeout=10,
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

        meshca_token = server.minter.mint("emojivoto", "shop")
        issued = await ca_pb2_grpc.CertificateServiceStub(channel).Sign(
            ca_pb2.SignRequest(csr=pem),
            metadata=[("authorization", f"Bearer {meshca_token}")],
            timeout=10,
        )
        assert issued.spiffe_id == spiffe_id("shop")
    name = linkerd_name("shop")
    error = await refused(server, name, meshca_token.encode(), proxy_csr(x509.DNSName(name)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    # And the Linkerd token still works where it belongs.
    response = await certify(server, name, linkerd_token.encode(), proxy_csr(x509.DNSName(name)))
    assert response.leaf_certificate


def _weak_csr(name: str) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
    csr = builder.sign(private_key("rsa-1024"), hashes.SHA256())  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.DER)


def _ca_csr(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _pem_csr(name: str) -> bytes:
    csr = x509.load_der_x509_csr(proxy_csr(x509.DNSName(name)))
    return csr.public_bytes(serialization.Encoding.PEM)


def _tampered(name: str) -> bytes:
    der = bytearray(proxy_csr(x509.DNSName(name)))
    der[-3] ^= 0x01  # inside the signature
    return bytes(der)


NAME = linkerd_name("hostile")

#: (what to send, expected reason). Every one is INVALID_ARGUMENT, recorded, survived.
HOSTILE: list[Any] = [
    pytest.param(dict(csr=b"\x30\x82" + b"\x00" * 20_000), "request-too-large", id="oversized"),
    pytest.param(dict(csr=_pem_csr(NAME)), "csr-not-der", id="pem-not-der"),
    pytest.param(dict(csr=b"garbage, not a CSR"), "malformed-csr", id="garbage-csr"),
    pytest.param(dict(csr=b""), "malformed-csr", id="empty-csr"),
    pytest.param(dict(csr=_tampered(NAME)), "csr-bad-signature", id="tampered-csr"),
    pytest.param(
        dict(csr=proxy_csr(x509.DNSName(NAME), x509.DNSName(linkerd_name("admin")))),
        "csr-dns-names",
        id="two-dns-sans",
    ),
    pytest.param(dict(csr=proxy_csr()), "csr-dns-names", id="no-san"),
    pytest.param(
        dict(
            csr=proxy_csr(x509.DNSName(NAME), x509.UniformResourceIdentifier(spiffe_id("hostile")))
        ),
        "csr-unexpected-san",
        id="uri-san",
    ),
    pytest.param(dict(csr=_ca_csr(NAME)), "csr-requests-ca", id="ca-request"),
    pytest.param(dict(csr=_weak_csr(NAME)), "weak-key", id="weak-key"),
    pytest.param(dict(token=b""), "token-missing", id="no-token"),
    pytest.param(dict(token=b"\xff\xfe not utf-8"), "token-malformed", id="binary-token"),
    pytest.param(dict(token=b"not.a.jwt"), "token-malformed", id="garbage-token"),
    pytest.param(dict(token=b"x" * 20_000), "token-too-large", id="oversized-token"),
    pytest.param(dict(identity=""), "linkerd-identity-malformed", id="no-identity"),
    pytest.param(
        dict(identity="hostile.emojivoto.serviceaccount.identity.linkerd.evil.local"),
        "linkerd-identity-malformed",
        id="foreign-domain",
    ),
    pytest.param(dict(identity="x" * 5_000), "linkerd-identity-malformed", id="long-identity"),
]


@pytest.mark.parametrize(("case", "reason"), HOSTILE)
async def test_hostile_certify_requests_are_invalid_argument_recorded_and_survived(
    server: Server, case: dict[str, Any], reason: str
) -> None:
    before = len(await server.records())
    error = await refused(
        server,
        case.get("identity", NAME),
        case.get("token", server.token("hostile")),
        case.get("csr", proxy_csr(x509.DNSName(NAME))),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "eyJ" not in (error.details() or "")
    [record] = await new_records(server, before)
    assert (record.outcome, record.api, record.reason) == ("refused", API, reason)
    assert record.serial is None and record.fingerprint_sha256 is None

    async with server.channel() as channel:  # still up
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="io.linkerd.proxy.identity.Identity")
        )
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_message_over_grpcs_limit_is_cut_off_before_meshca(server: Server) -> None:
    """Beyond 64 KiB gRPC itself answers (RESOURCE_EXHAUSTED): no request, no record."""
    before = len(await server.records())
    error = await refused(server, NAME, server.token("hostile"), b"\x30" * 70_000)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await new_records(server, before) == []


async def test_concurrent_proxies_each_get_their_own_identity(server: Server) -> None:
    accounts = [f"svc-{i}" for i in range(20)]
    responses = await asyncio.gather(
        *(
            certify(
                server,
                linkerd_name(sa),
                server.token(sa),
                proxy_csr(x509.DNSName(linkerd_name(sa))),
            )
            for sa in accounts
        )
    )
    for sa, response in zip(accounts, responses, strict=True):
        leaf = x509.load_der_x509_certificate(response.leaf_certificate)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [linkerd_name(sa)]
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe_id(sa)]


async def test_tokenreview_mode_reviews_linkerd_tokens_for_linkerd_audience(
    tmp_path: Path, k8s_api_tls: K8sApiStandIn
) -> None:
    """The API server is asked about Linkerd's audience at Linkerd's door and about
    meshca's at the others, through one reviewer; neither door's cache serves the other."""
    api = k8s_api_tls
    api.clock._now = datetime.now(UTC).replace(microsecond=0)
    name = "cart.shop.serviceaccount.identity.linkerd.cluster.local"
    token = api.minter.token(aud=[LINKERD_AUDIENCE])
    async for running in running_server(
        tmp_path,
        k8s_mode="tokenreview",
        k8s_issuer=None,
        k8s_jwks_file=None,
        k8s_api_server=api.url,
        k8s_ca_file=Path(api.ca_file or ""),
        k8s_token_file=api.caller_token_file,
        linkerd_certify=True,
    ):
        async with running.channel() as channel:
            stub = identity_pb2_grpc.IdentityStub(channel)
            for _ in range(2):
                response = await stub.Certify(
                    identity_pb2.CertifyRequest(
                        identity=name,
                        token=token.encode(),
                        certificate_signing_request=proxy_csr(x509.DNSName(name)),
                    ),
                    timeout=10,
                )
                leaf = x509.load_der_x509_certificate(response.leaf_certificate)
                assert leaf.extensions.get_extension_for_class(
                    x509.SubjectAlternativeName
                ).value.get_values_for_type(x509.UniformResourceIdentifier) == [
                    "spiffe://example.org/ns/shop/sa/cart"
                ]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await ca_pb2_grpc.CertificateServiceStub(channel).Sign(
                    ca_pb2.SignRequest(csr=proxy_csr()),
                    metadata=[("authorization", f"Bearer {token}")],
                    timeout=10,
                )
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # One review for Linkerd's door (then cached), one refused at meshca's.
    asked = [r["spec"]["audiences"] for r in api.review_requests]
    assert asked == [[LINKERD_AUDIENCE], ["meshca"]]
