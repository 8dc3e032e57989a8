"""Who may call what, through the real server: every row of the callers table, the
policy port (mTLS, following rotation), the insecure main port and the start-up rule."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2
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
from meshca.adapters.storage.audit_query import SqlAuditReader
from meshca.adapters.storage.engine import make_engine
from meshca.cli.ca_cmd import load_bundle
from meshca.core.audit import AuditQuery, Outcome
from meshca.core.callers import CALLERS, Access
from meshca.core.csr import CsrRequest
from meshca.core.issuance import issue_leaf
from meshca.core.spiffe import SpiffeId
from tests.core.builders import csr_pem
from tests.integration.serve_process import launch
from tests.integration.server_harness import (
    RunningServer,
    TokenMinter,
    running_server,
    serve_command,
)
from tests.integration.test_audit_api import _foreign_auditor, _issue
from tests.integration.test_ext_authz import BACKEND, FRONTEND, check_request
from tests.integration.test_linkerd import LINKERD_AUDIENCE, proxy_csr
from tests.integration.test_rotation_server import FAST, _ca

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
POLICY_TOKEN = "policy-token-0c4f8a"
AUDIT_TOKEN = "audit-token-93be11"
ADMIN = "spiffe://example.org/ns/ops/sa/policy-admin"
EXT_AUTHZ = "envoy.service.auth.v3.Authorization/Check"
UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED

KeyChain = tuple[bytes, bytes]


def _policies(tmp_path: Path) -> Path:
    policy_dir = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policy_dir)
    return policy_dir


def _token_file(tmp_path: Path, name: str, token: str) -> Path:
    path = tmp_path / name
    path.write_text(token + "\n")
    return path


async def full_server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    """Every API on: the policy port with an admin and a token, the audit API and port,
    the bundle endpoint."""
    async for running in running_server(
        tmp_path,
        policy_dir=_policies(tmp_path),
        policy_listen="127.0.0.1:0",
        policy_admin=(ADMIN,),
        policy_token_file=_token_file(tmp_path, "policy-token", POLICY_TOKEN),
        auditor=("spiffe://example.org/ns/audit/sa/auditor",),
        audit_token_file=_token_file(tmp_path, "audit-token", AUDIT_TOKEN),
        audit_listen="127.0.0.1:0",
        bundle_endpoint="127.0.0.1:0",
        linkerd_certify=True,
    ):
        yield running


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async for running in full_server(tmp_path):
        yield running


def _channel(server: RunningServer, port: int | None, client: KeyChain | None = None) -> Any:
    assert port is not None
    credentials = grpc.ssl_channel_credentials(server.roots_pem, *(client or (None, None)))
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}", credentials, options=[("grpc.ssl_target_name_override", "localhost")]
    )


def _policy_channel(server: RunningServer, client: KeyChain | None) -> Any:
    return _channel(server, server.worker.policy_port, client)


def _signed_by_meshca(
    server: RunningServer, spiffe_id: str, *, not_before: datetime, not_after: datetime
) -> KeyChain:
    """An SVID for any ``spiffe_id``, signed by meshca's current intermediate: (key, chain)."""
    authority = server.worker.authorities.current()
    key = ec.generate_private_key(ec.SECP256R1())
    csr = CsrRequest(public_key=key.public_key(), uri_sans=(), sha256="")
    leaf = issue_leaf(csr, SpiffeId.parse(spiffe_id), authority, not_before, not_after, 4242)
    chain = [leaf, authority.certificate, *authority.chain]
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)


async def _code(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def _refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def _ext_authz(channel: Any) -> Any:
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    return await stub.Check(check_request(FRONTEND, BACKEND, "GET", "/admin"), timeout=10)


def _explain(channel: Any, metadata: list[tuple[str, str]] | None = None) -> Any:
    request = policy_pb2.PolicyCheckRequest(
        source_principal=FRONTEND, destination_principal=BACKEND, method="GET", path="/admin"
    )
    return policy_pb2_grpc.PolicyServiceStub(channel).Explain(
        request, metadata=metadata or [], timeout=10
    )


async def _services(channel: Any) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for response in stub.ServerReflectionInfo(iter([request]), timeout=10):
        return {s.name for s in response.list_services_response.service}
    raise AssertionError("no reflection response")


def _refusals(server: RunningServer, api: str) -> list[tuple[str, str | None]]:
    engine = make_engine(server.settings.effective_database_url)
    try:
        page = SqlAuditReader(engine).query(AuditQuery(outcome=Outcome.REFUSED, api=api))
    finally:
        engine.dispose()
    return [(e.record.reason, e.record.spiffe_id) for e in page.entries]


# -- every row of the table --------------------------------------------------------------------


async def test_every_row_refuses_a_caller_without_its_credential_and_serves_one_with_it(
    server: RunningServer,
) -> None:
    proxy = await _issue(server, "shop", "frontend")
    admin = await _issue(server, "ops", "policy-admin")
    now = datetime.now(UTC)
    other_domain = _signed_by_meshca(
        server,
        "spiffe://other.example/ns/shop/sa/frontend",
        not_before=now - timedelta(minutes=1),
        not_after=now + timedelta(minutes=10),
    )

    async def workload_token() -> None:
        async with server.channel() as channel:
            istio = istio_grpc.IstioCertificateServiceStub(channel)
            request = istio_pb2.IstioCertificateRequest(csr=csr_pem().decode())
            assert await _code(istio.CreateCertificate(request, timeout=10)) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
            sign = ca_pb2_grpc.CertificateServiceStub(channel).Sign
            assert await _code(sign(ca_pb2.SignRequest(csr=csr_pem()), timeout=10)) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
            token = _bearer(server.minter.mint("shop", "cart"))
            assert (await sign(ca_pb2.SignRequest(csr=csr_pem()), metadata=token)).certificate

    async def jwt_svid() -> None:
        async with server.channel() as channel:
            stub = jwt_pb2_grpc.JwtSvidServiceStub(channel)
            request = jwt_pb2.SignJwtSvidRequest(audiences=["https://db.example.org"])
            assert await _code(stub.SignJwtSvid(request, timeout=10)) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
            token = _bearer(server.minter.mint("shop", "cart"))
            assert (await stub.SignJwtSvid(request, metadata=token, timeout=10)).token

    async def linkerd_certify() -> None:
        name = "cart.shop.serviceaccount.identity.linkerd.cluster.local"
        csr = proxy_csr(x509.DNSName(name))
        async with server.channel() as channel:
            certify = identity_pb2_grpc.IdentityStub(channel).Certify
            # Linkerd's contract: no or a wrong-audience token is INVALID_ARGUMENT.
            for token in (b"", server.minter.mint("shop", "cart").encode()):
                request = identity_pb2.CertifyRequest(
                    identity=name, token=token, certificate_signing_request=csr
                )
                assert await _code(certify(request, timeout=10)) == (
                    grpc.StatusCode.INVALID_ARGUMENT
                )
            token = server.minter.mint("shop", "cart", aud=[LINKERD_AUDIENCE]).encode()
            request = identity_pb2.CertifyRequest(
                identity=name, token=token, certificate_signing_request=csr
            )
            assert (await certify(request, timeout=10)).leaf_certificate

    async def trust_bundle() -> None:
        async with server.channel() as channel:
            bundle = await ca_pb2_grpc.CertificateServiceStub(channel).GetTrustBundle(
                ca_pb2.GetTrustBundleRequest(), timeout=10
            )
        assert bundle.roots
        context = ssl.create_default_context(cadata=server.roots_pem.decode())
        url = f"https://127.0.0.1:{server.worker.bundle_port}/"
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, context=context, timeout=10).read()
        )
        assert b"keys" in body

    async def ext_authz() -> None:
        # Not on the main port at all, with or without a token.
        async with server.channel() as channel:
            assert (await _refused(_ext_authz(channel))).code() == UNIMPLEMENTED
        # No client certificate: refused at the handshake, before any service.
        async with _policy_channel(server, None) as channel:
            assert (await _refused(_ext_authz(channel))).code() == grpc.StatusCode.UNAVAILABLE
        # An SVID of another trust domain, chained to our own roots.
        async with _policy_channel(server, other_domain) as channel:
            refused = await _refused(_ext_authz(channel))
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "admin-deny" not in (refused.details() or "")
        # A proxy's SVID from meshca itself: the decision, policy named.
        async with _policy_channel(server, proxy) as channel:
            response = await _ext_authz(channel)
        assert response.status.code == code_pb2.PERMISSION_DENIED
        assert "admin-deny" in response.denied_response.body

    async def policy_service() -> None:
        async with server.channel() as channel:
            assert (await _refused(_explain(channel, _bearer(POLICY_TOKEN)))).code() == (
                UNIMPLEMENTED
            )
        async with _policy_channel(server, proxy) as channel:
            denied = await _refused(_explain(channel))
            wrong = await _refused(_explain(channel, _bearer("not-the-token")))
            bad = await _refused(_explain(channel, [("authorization", "Basic eA==")]))
            with_token = await _explain(channel, _bearer(POLICY_TOKEN))
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
        assert (wrong.code(), bad.code()) == (grpc.StatusCode.UNAUTHENTICATED,) * 2
        for refusal in (denied, wrong, bad):
            details = refusal.details() or ""
            assert "admin-deny" not in details and "not-the-token" not in details
        assert "decided by: admin-deny rule 0" in with_token.text
        async with _policy_channel(server, admin) as channel:
            status = await policy_pb2_grpc.PolicyServiceStub(channel).Status(
                policy_pb2.PolicyStatusRequest(), timeout=10
            )
        assert status.healthy and status.policies == 7

    async def audit_service() -> None:
        async with server.channel() as channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            request = audit_pb2.GetLogInfoRequest()
            assert await _code(stub.GetLogInfo(request, timeout=10)) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
            assert await _code(
                stub.GetLogInfo(request, metadata=_bearer(POLICY_TOKEN), timeout=10)
            ) == (grpc.StatusCode.UNAUTHENTICATED)
            info = await stub.GetLogInfo(request, metadata=_bearer(AUDIT_TOKEN), timeout=10)
        assert info.tree_size > 0

    async def health() -> None:
        for port in (server.worker.port, server.worker.policy_port):
            client = proxy if port == server.worker.policy_port else None
            async with _channel(server, port, client) as channel:
                answer = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="meshca.policy"), timeout=10
                )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING

    async def reflection() -> None:
        async with server.channel() as channel:
            main = await _services(channel)
        async with _policy_channel(server, proxy) as channel:
            policy = await _services(channel)
        policy_services = {"envoy.service.auth.v3.Authorization", "meshca.v1.PolicyService"}
        assert "meshca.v1.CertificateService" in main and not main & policy_services
        assert policy_services <= policy and "meshca.v1.CertificateService" not in policy

    checks: dict[str, Callable[[], Awaitable[None]]] = {
        "CA Sign / CreateCertificate": workload_token,
        "JWT-SVID": jwt_svid,
        "Linkerd Certify": linkerd_certify,
        "trust bundle": trust_bundle,
        "Envoy ext_authz": ext_authz,
        "PolicyService": policy_service,
        "AuditService": audit_service,
        "health": health,
        "reflection": reflection,
    }
    # The agent's socket rows are checked against a real agent, in test_agent.py.
    served_here = [row for row in CALLERS if row.access is not Access.LOCAL_SOCKET]
    assert set(checks) == {row.api for row in served_here}, "a row of the table has no test"
    for row in served_here:
        await checks[row.api]()

    # Each refusal by the policy guard is in the issuance record, with its reason.
    assert _refusals(server, EXT_AUTHZ) == [
        ("not-a-policy-caller", "spiffe://other.example/ns/shop/sa/frontend")
    ]
    explained = _refusals(server, "meshca.v1.PolicyService/Explain")
    assert sorted(explained) == sorted(
        [
            ("not-a-policy-admin", "spiffe://example.org/ns/shop/sa/frontend"),
            ("policy-token-invalid", "spiffe://example.org/ns/shop/sa/frontend"),
            ("token-malformed", "spiffe://example.org/ns/shop/sa/frontend"),
        ]
    )


async def test_expired_and_foreign_svids_are_refused_at_the_policy_port_handshake(
    server: RunningServer,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    expired = _signed_by_meshca(
        server,
        ADMIN,
        not_before=now - timedelta(hours=2),
        not_after=now - timedelta(hours=1),
    )
    current = _signed_by_meshca(
        server, ADMIN, not_before=now - timedelta(minutes=1), not_after=now + timedelta(hours=1)
    )
    for client in (expired, _foreign_auditor()):
        async with _policy_channel(server, client) as channel:
            refused = await _refused(_explain(channel))
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
    # The same ID, valid now, is served: it was the expiry that was refused.
    async with _policy_channel(server, current) as channel:
        assert (await _explain(channel)).decision.policy.name == "admin-deny"


async def test_policy_callers_narrow_who_may_ask_ext_authz(tmp_path: Path) -> None:
    async for server in running_server(
        tmp_path,
        policy_dir=_policies(tmp_path),
        policy_listen="127.0.0.1:0",
        policy_caller=("spiffe://example.org/ns/istio-system/*", "*/sa/envoy"),
    ):
        gateway = await _issue(server, "istio-system", "ingress")
        sidecar = await _issue(server, "shop", "envoy")
        workload = await _issue(server, "shop", "frontend")
        for client in (gateway, sidecar):
            async with _policy_channel(server, client) as channel:
                assert (await _ext_authz(channel)).status.code == code_pb2.PERMISSION_DENIED
        async with _policy_channel(server, workload) as channel:
            refused = await _refused(_ext_authz(channel))
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
        assert refused.details() == (
            "spiffe://example.org/ns/shop/sa/frontend may not ask for authorization decisions"
        )
        # No admin and no token configured: PolicyService refuses everyone.
        async with _policy_channel(server, gateway) as channel:
            assert (await _refused(_explain(channel))).code() == grpc.StatusCode.PERMISSION_DENIED


# -- rotation ----------------------------------------------------------------------------------


async def test_the_policy_port_follows_root_rotation_without_a_restart(tmp_path: Path) -> None:
    async for server in running_server(
        tmp_path, policy_dir=_policies(tmp_path), policy_listen="127.0.0.1:0", **FAST
    ):
        serving = server.worker.serving
        assert serving is not None
        (first_root,) = x509.load_pem_x509_certificates(server.roots_pem)
        before = await _issue(server, "shop", "frontend")
        async with _policy_channel(server, before) as channel:
            assert (await _ext_authz(channel)).status.code == code_pb2.PERMISSION_DENIED

        code, _out, err = await asyncio.to_thread(_ca, server, "rotate", "--root")
        assert code == 0, err
        for _ in range(100):
            after = await _issue(server, "shop", "frontend")
            new_root = x509.load_pem_x509_certificates(after[1])[-1]
            if new_root != first_root:
                break
            await asyncio.sleep(0.1)
        assert new_root != first_root, "the new root never took over"
        await serving.issue()

        # An SVID under the new root, and a client trusting only the new root, get in.
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{server.worker.policy_port}",
            grpc.ssl_channel_credentials(new_root.public_bytes(serialization.Encoding.PEM), *after),
            options=[("grpc.ssl_target_name_override", "localhost")],
        ) as channel:
            assert (await _ext_authz(channel)).status.code == code_pb2.PERMISSION_DENIED


# -- the main port, when the operator says so ---------------------------------------------------


async def test_insecure_main_port_serves_ext_authz_to_anyone_but_not_the_policy_api(
    tmp_path: Path,
) -> None:
    async for server in running_server(
        tmp_path,
        policy_dir=_policies(tmp_path),
        policy_insecure_main_port=True,
        policy_token_file=_token_file(tmp_path, "policy-token", POLICY_TOKEN),
        no_reflection=True,
    ):
        assert server.worker.policy_port is None
        async with server.channel() as channel:
            assert (await _ext_authz(channel)).status.code == code_pb2.PERMISSION_DENIED
            missing = await _refused(_explain(channel))
            assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "admin-deny" not in (missing.details() or "")
            explained = await _explain(channel, _bearer(POLICY_TOKEN))
            assert explained.decision.policy.name == "admin-deny"
            assert (await _refused(_services(channel))).code() == UNIMPLEMENTED
        assert _refusals(server, "meshca.v1.PolicyService/Explain") == [
            ("policy-credentials-missing", None)
        ]


# -- meshca serve, as an operator runs it --------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_serve_refuses_policy_dir_without_a_policy_port(tmp_path: Path) -> None:
    _minter, jwks = TokenMinter.create(tmp_path)
    command = serve_command(
        tmp_path / "data", jwks, workers=1, extra=["--policy-dir", str(_policies(tmp_path))]
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert "--policy-listen" in done.stderr and "--policy-insecure-main-port" in done.stderr
    assert "Traceback" not in done.stderr


async def test_serve_with_two_workers_answers_ext_authz_on_the_policy_port(
    tmp_path: Path,
) -> None:
    minter, jwks = TokenMinter.create(tmp_path)
    policy_port = _free_port()
    data_dir = tmp_path / "data"
    command = serve_command(
        data_dir,
        jwks,
        workers=2,
        extra=[
            "--policy-dir",
            str(_policies(tmp_path)),
            "--policy-listen",
            f"127.0.0.1:{policy_port}",
        ],
    )
    process = await asyncio.to_thread(launch, "policy-port", data_dir, command, workers=2)
    try:
        assert "ext_authz and the policy API on 127.0.0.1" in process.log(80)
        roots_pem = b"".join(
            r.public_bytes(serialization.Encoding.PEM) for r in load_bundle(data_dir)
        )
        key = ec.generate_private_key(ec.SECP256R1())
        csr = csr_pem(key)
        async with grpc.aio.secure_channel(
            process.target,
            grpc.ssl_channel_credentials(roots_pem),
            options=[("grpc.ssl_target_name_override", "localhost")],
        ) as channel:
            issued = await istio_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
                istio_pb2.IstioCertificateRequest(csr=csr.decode()),
                metadata=_bearer(minter.mint("shop", "frontend")),
                timeout=10,
            )
            assert (await _refused(_ext_authz(channel))).code() == UNIMPLEMENTED
        client = (
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            "".join(issued.cert_chain).encode(),
        )
        # Several connections: the kernel spreads them over both workers.
        for _ in range(6):
            async with grpc.aio.secure_channel(
                f"127.0.0.1:{policy_port}",
                grpc.ssl_channel_credentials(roots_pem, *client),
                options=[("grpc.ssl_target_name_override", "localhost")],
            ) as channel:
                assert (await _ext_authz(channel)).status.code == code_pb2.PERMISSION_DENIED
    finally:
        assert await asyncio.to_thread(process.stop) == 0, process.log()
