"""Per-API caps at the door, on an in-process grpc.aio server: counted in, counted out
whatever way a call ends, refused with RESOURCE_EXHAUSTED, and the refusal reported."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from meshca.adapters.grpc._gen.meshca.v1 import (
    ca_pb2,
    ca_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
)
from meshca.adapters.grpc.audit_servicer import AuditServicer
from meshca.adapters.grpc.ca_servicer import CertificateServicer, IstioCertificateServicer
from meshca.adapters.grpc.errors import error_mapped
from meshca.adapters.grpc.ext_authz import ExtAuthzServicer
from meshca.adapters.grpc.gate import CallGate
from meshca.adapters.grpc.jwt_servicer import JwtSvidServicer
from meshca.adapters.grpc.limits import ApiCap, ApiCaps, CallLimits, api_of
from meshca.adapters.grpc.policy_servicer import PolicyServicer
from meshca.core import errors

TIGHT = ApiCaps(
    policy=ApiCap(max_in_flight=1, max_request_bytes=256),
    bundle_watch=ApiCap(max_in_flight=1, max_request_bytes=16),
)


@pytest.mark.parametrize(
    ("servicer", "method", "api"),
    [
        pytest.param(CertificateServicer, "Sign", "ca", id="ok/sign"),
        pytest.param(IstioCertificateServicer, "CreateCertificate", "ca", id="ok/istio"),
        pytest.param(CertificateServicer, "GetTrustBundle", "bundle", id="ok/bundle"),
        pytest.param(CertificateServicer, "WatchTrustBundle", "bundle_watch", id="ok/watch"),
        pytest.param(ExtAuthzServicer, "Check", "ext_authz", id="ok/ext-authz"),
        pytest.param(PolicyServicer, "Check", "policy", id="ok/policy-check"),
        pytest.param(PolicyServicer, "Explain", "policy", id="ok/policy-explain"),
        pytest.param(AuditServicer, "Export", "audit", id="ok/audit"),
        pytest.param(JwtSvidServicer, "SignJwtSvid", "jwt_svid", id="ok/jwt-svid"),
        pytest.param(object, "Check", None, id="ok/unknown-servicer"),
    ],
)
def test_every_servicer_of_ours_has_its_api(servicer: type, method: str, api: str | None) -> None:
    assert api_of(object.__new__(servicer), method) == api
    if api is not None:
        assert isinstance(getattr(ApiCaps(), api), ApiCap)


@pytest.mark.parametrize(("in_flight", "size"), [(0, 1), (1, 0), (-1, 5)])
def test_caps_must_be_positive(in_flight: int, size: int) -> None:
    with pytest.raises(ValueError):
        ApiCap(in_flight, size)


class _Policy(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()

    async def Explain(self, request: Any, context: Any) -> policy_pb2.PolicyExplanation:
        self.entered.set()
        await self.release.wait()
        return policy_pb2.PolicyExplanation(text="done")

    async def Check(self, request: Any, context: Any) -> policy_pb2.PolicyDecision:
        raise errors.NotAuthorized("no")

    async def Status(self, request: Any, context: Any) -> policy_pb2.PolicyStatus:
        raise RuntimeError("a bug")


class _Bundle(ca_pb2_grpc.CertificateServiceServicer):
    async def WatchTrustBundle(self, request: Any, context: Any) -> AsyncIterator[Any]:
        yield ca_pb2.TrustBundle(sequence=1)
        raise errors.BackendUnavailable("gone")


async def test_counted_in_and_out_however_a_call_ends() -> None:
    heard: list[tuple[str, str, str]] = []

    async def hook(api: str, method: str, context: Any, error: errors.MeshcaError) -> None:
        heard.append((api, method, error.reason))

    limits = CallLimits(TIGHT, on_refusal=hook)
    gate = CallGate(limits=limits)
    policy = _Policy()
    server = grpc.aio.server()
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(error_mapped(policy, gate), server)
    ca_pb2_grpc.add_CertificateServiceServicer_to_server(error_mapped(_Bundle(), gate), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            request = policy_pb2.PolicyCheckRequest(path="/x")
            held = asyncio.ensure_future(stub.Explain(request, timeout=10))
            await asyncio.wait_for(policy.entered.wait(), 10)
            assert limits.in_flight("policy") == 1
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Check(request, timeout=10)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "policy is at its cap of 1 calls in progress" in str(refused.value.details())
            policy.release.set()
            assert (await held).text == "done"
            # Ends by a core error, by a bug, by an oversized request: each counted out.
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.Check(request, timeout=10)
            assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as bug:
                await stub.Status(policy_pb2.PolicyStatusRequest(), timeout=10)
            assert bug.value.code() is grpc.StatusCode.INTERNAL
            with pytest.raises(grpc.aio.AioRpcError) as big:
                await stub.Check(policy_pb2.PolicyCheckRequest(path="/" + "x" * 300), timeout=10)
            assert big.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "Check request is 30" in str(big.value.details())
            assert "xxxx" not in str(big.value.details())
            assert limits.in_flight("policy") == 0

            # A stream that fails midway gives its place back.
            watch_stub = ca_pb2_grpc.CertificateServiceStub(channel)
            for _ in range(3):
                stream = watch_stub.WatchTrustBundle(ca_pb2.WatchTrustBundleRequest())
                assert (await stream.read()).sequence == 1
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await stream.read()
                assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
            assert limits.in_flight("bundle_watch") == 0
    finally:
        await server.stop(None)
    assert heard == [
        ("policy", "Check", "too-many-calls"),
        ("policy", "Check", "request-too-large"),
    ]


async def test_a_failing_recorder_does_not_change_the_answer() -> None:
    async def broken(api: str, method: str, context: Any, error: errors.MeshcaError) -> None:
        raise RuntimeError("recorder down")

    gate = CallGate(limits=CallLimits(TIGHT, on_refusal=broken))
    server = grpc.aio.server()
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(error_mapped(_Policy(), gate), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as big:
                await stub.Check(policy_pb2.PolicyCheckRequest(path="/" + "x" * 300), timeout=10)
    finally:
        await server.stop(None)
    assert big.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_gate_without_limits_caps_nothing() -> None:
    server = grpc.aio.server()
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(error_mapped(_Policy(), CallGate()), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as ran:
                await stub.Check(policy_pb2.PolicyCheckRequest(path="/" + "x" * 300), timeout=10)
    finally:
        await server.stop(None)
    assert ran.value.code() is grpc.StatusCode.PERMISSION_DENIED  # the method itself ran
