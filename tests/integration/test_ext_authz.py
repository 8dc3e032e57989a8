"""Envoy's ext_authz v3 against the real server, through a real gRPC client and the
xds-protos stubs; the native PolicyService, health, reload and the decision log too."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshca.adapters.grpc._gen.meshca.v1 import policy_pb2, policy_pb2_grpc
from meshca.adapters.storage.decision_log import SqlDecisionLog
from meshca.adapters.storage.engine import make_engine
from meshca.cli import main as meshca_main
from tests.integration.server_harness import RunningServer, running_server
from tests.integration.test_audit_api import _issue

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
BACKEND = "spiffe://cluster.local/ns/shop/sa/backend"


ADMIN = "spiffe://example.org/ns/ops/sa/policy-admin"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    """ext_authz and PolicyService on the policy port; the client is a policy admin's
    SVID issued by meshca itself (any SVID of the trust domain may call ext_authz)."""
    policy_dir = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policy_dir)
    async for running in running_server(
        tmp_path,
        policy_dir=policy_dir,
        policy_poll_interval=_seconds(0.2),
        policy_listen="127.0.0.1:0",
        policy_admin=(ADMIN,),
    ):
        running.client = await _issue(running, "ops", "policy-admin")
        yield running


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


def check_request(
    source: str, destination: str, method: str, path: str, **headers: str
) -> external_auth_pb2.CheckRequest:
    Peer = attribute_context_pb2.AttributeContext.Peer
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            source=Peer(
                principal=source,
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address="10.1.2.3", port_value=41000)
                ),
            ),
            destination=Peer(
                principal=destination,
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address="10.1.2.4", port_value=8080)
                ),
            ),
            request=attribute_context_pb2.AttributeContext.Request(
                http=attribute_context_pb2.AttributeContext.HttpRequest(
                    id="req-1",
                    method=method,
                    path=path,
                    host="backend.shop:8080",
                    headers={":method": method, ":path": path, **headers},
                )
            ),
        )
    )


async def _check(server: RunningServer, request: object) -> external_auth_pb2.CheckResponse:
    async with server.policy_channel() as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        return await stub.Check(request, timeout=10)


async def test_allow_is_ok_and_deny_is_a_403_naming_the_policy(server: RunningServer) -> None:
    allowed = await _check(server, check_request(FRONTEND, BACKEND, "GET", "/api/products/1"))
    assert allowed.status.code == code_pb2.OK
    assert allowed.HasField("ok_response")
    assert allowed.dynamic_metadata.fields["policy"].string_value == "shop/frontend-to-backend"

    denied = await _check(server, check_request(FRONTEND, BACKEND, "GET", "/%61dmin?x=1"))
    assert denied.status.code == code_pb2.PERMISSION_DENIED
    assert denied.denied_response.status.code == 403
    headers = {h.header.key: h.header.value for h in denied.denied_response.headers}
    assert headers["x-meshca-denied-by"] == "admin-deny"
    assert len(headers["x-meshca-policy-version"]) == 16
    assert "admin-deny rule 0" in denied.denied_response.body

    nobody = await _check(server, check_request("", BACKEND, "GET", "/api/products"))
    assert nobody.status.code == code_pb2.PERMISSION_DENIED
    assert {h.header.key: h.header.value for h in nobody.denied_response.headers}[
        "x-meshca-denied-by"
    ] == "no-allow-match"


async def test_a_request_without_http_attributes_is_denied_not_an_error(
    server: RunningServer,
) -> None:
    response = await _check(server, external_auth_pb2.CheckRequest())
    assert response.status.code == code_pb2.PERMISSION_DENIED


async def test_policy_service_check_explain_status_and_health(server: RunningServer) -> None:
    request = policy_pb2.PolicyCheckRequest(
        source_principal=FRONTEND, destination_principal=BACKEND, method="GET", path="/admin"
    )
    async with server.policy_channel() as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        decision = await stub.Check(request, timeout=10)
        explanation = await stub.Explain(request, timeout=10)
        status = await stub.Status(policy_pb2.PolicyStatusRequest(), timeout=10)
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="meshca.policy"), timeout=10
        )
        ext_health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization"),
            timeout=10,
        )
    assert not decision.allowed
    assert decision.policy.name == "admin-deny" and decision.rule == 0
    assert decision.version == status.version
    assert "decided by: admin-deny rule 0" in explanation.text
    assert any(step.matched and step.policy.name == "admin-deny" for step in explanation.steps)
    assert status.healthy and status.policies == 7
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert ext_health.status == health_pb2.HealthCheckResponse.SERVING


async def _wait_for(predicate: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``predicate`` until it holds; fail after 10 seconds."""
    async with asyncio.timeout(10):
        for _ in range(1_000):
            if await predicate():
                return
            await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def test_reload_without_restart_and_a_broken_file_changes_nothing(
    server: RunningServer,
) -> None:
    assert server.settings.policy_dir is not None
    policy_dir = server.settings.policy_dir
    products = check_request(FRONTEND, BACKEND, "GET", "/api/products")
    first = await _check(server, products)
    assert first.status.code == code_pb2.OK
    old_version = first.dynamic_metadata.fields["version"].string_value

    # A broken file: the old set keeps serving; health and status say so.
    (policy_dir / "zz-broken.yaml").write_text(
        "apiVersion: meshca.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\n"
        "spec:\n  action: DENY\n  rules:\n    - to: [{operation: {pathz: ['/']}}]\n"
    )

    async def unhealthy() -> bool:
        async with server.policy_channel() as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="meshca.policy"), timeout=10
            )
        return bool(reply.status == health_pb2.HealthCheckResponse.NOT_SERVING)

    await _wait_for(unhealthy)
    still = await _check(server, products)
    assert still.status.code == code_pb2.OK
    assert still.dynamic_metadata.fields["version"].string_value == old_version
    async with server.policy_channel() as channel:
        status = await policy_pb2_grpc.PolicyServiceStub(channel).Status(
            policy_pb2.PolicyStatusRequest(), timeout=10
        )
    assert not status.healthy and status.reload_failures >= 1
    assert "zz-broken.yaml, document 1, line 7: spec.rules[0].to[0].operation.pathz" in (
        status.last_error
    )

    # A valid change replaces the set: products are now denied to everyone.
    (policy_dir / "zz-broken.yaml").write_text(
        "apiVersion: meshca.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-products}\n"
        "spec:\n  action: DENY\n  rules:\n    - to: [{operation: {paths: ['/api/products']}}]\n"
    )

    async def denied() -> bool:
        reply = await _check(server, products)
        return bool(reply.status.code == code_pb2.PERMISSION_DENIED)

    await _wait_for(denied)
    assert await unhealthy() is False


async def test_decisions_are_recorded_and_queryable(
    server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    await _check(server, check_request(FRONTEND, BACKEND, "GET", "/api/products"))
    await _check(server, check_request(FRONTEND, BACKEND, "POST", "/admin/users"))
    engine = make_engine(server.settings.effective_database_url)
    store = SqlDecisionLog(engine)

    async def two() -> bool:
        return len(await store.list(limit=10)) >= 2

    try:
        await _wait_for(two)
        records = await store.list(limit=10)
    finally:
        store.close()
        engine.dispose()
    denied = next(r for r in records if not r.allowed)
    assert denied.policy == "admin-deny" and denied.rule == 0
    assert denied.api == "envoy.ext_authz.v3" and denied.request_id == "req-1"
    assert denied.source_ip == "10.1.2.3" and denied.destination_port == 8080
    allowed = next(r for r in records if r.allowed)
    assert allowed.policy == "shop/frontend-to-backend"
    assert allowed.version == denied.version

    code = await asyncio.to_thread(
        meshca_main,
        ["audit", "decisions", "--data-dir", str(server.settings.data_dir), "--denied"],
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "DENY" in out and "admin-deny rule 0" in out and "ALLOW " not in out


async def test_policy_status_command(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    roots = tmp_path / "roots.pem"
    roots.write_bytes(server.roots_pem)
    assert server.client is not None
    key, cert = tmp_path / "admin.key", tmp_path / "admin.pem"
    key.write_bytes(server.client[0])
    cert.write_bytes(server.client[1])
    target = f"127.0.0.1:{server.worker.policy_port}"
    base = ["policy", "status", "--server", target, "--ca-file", str(roots)]
    code = await asyncio.to_thread(meshca_main, [*base, "--cert", str(cert), "--key", str(key)])
    out = capsys.readouterr().out
    assert code == 0
    assert "policies        7" in out and "healthy         yes" in out
    # The main port serves no policy API; the policy port takes no caller without an SVID.
    for argv in (
        ["policy", "status", "--server", server.target, "--ca-file", str(roots)],
        base,
    ):
        assert await asyncio.to_thread(meshca_main, argv) == 1
    err = capsys.readouterr().err
    assert "UNIMPLEMENTED" in err and "UNAVAILABLE" in err
