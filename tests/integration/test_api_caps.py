"""Per-API caps on the real server: calls in progress and request size, per API.

Over a cap, a call is refused with RESOURCE_EXHAUSTED and a message saying which cap;
the CA APIs record the refusal; nothing crashes and every API keeps serving.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshca import app
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc
from meshca.adapters.grpc._gen.meshca.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    ca_pb2,
    ca_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
)
from meshca.adapters.grpc.limits import ApiCap, ApiCaps
from meshca.adapters.storage.audit_log import SqlAuditLog
from meshca.adapters.storage.engine import make_engine
from meshca.core.audit import AuditRecord
from tests.core.builders import csr_pem
from tests.integration.server_harness import RunningServer, TokenMinter, server_settings
from tests.integration.test_ext_authz import BACKEND, FRONTEND, check_request

pytestmark = pytest.mark.integration

POLICY_TOKEN = "policy-token-5d2e"

REPO = Path(__file__).resolve().parents[2]
WEB_ID = "spiffe://example.org/ns/default/sa/web"
AUDIT_TOKEN = "audit-token-" + "x" * 32
CAPS = ApiCaps(
    ca=ApiCap(max_in_flight=2, max_request_bytes=4096),
    bundle=ApiCap(max_in_flight=100, max_request_bytes=64),
    bundle_watch=ApiCap(max_in_flight=2, max_request_bytes=64),
    ext_authz=ApiCap(max_in_flight=100, max_request_bytes=2048),
    policy=ApiCap(max_in_flight=100, max_request_bytes=1024),
    audit=ApiCap(max_in_flight=100, max_request_bytes=512),
)


@pytest.fixture
async def capped(tmp_path: Path) -> AsyncIterator[RunningServer]:
    minter, jwks = TokenMinter.create(tmp_path)
    policy_dir = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policy_dir)
    token_file = tmp_path / "audit-token"
    token_file.write_text(AUDIT_TOKEN + "\n")
    policy_token_file = tmp_path / "policy-token"
    policy_token_file.write_text(POLICY_TOKEN + "\n")
    settings = server_settings(
        tmp_path / "data",
        jwks,
        policy_dir=policy_dir,
        # ext_authz and PolicyService on the main port, where this test reaches them.
        policy_insecure_main_port=True,
        policy_token_file=policy_token_file,
        audit_token_file=token_file,
    )
    app.prepare(settings)
    worker = await app.start_worker(settings, api_caps=CAPS)
    try:
        yield RunningServer(settings, worker, minter)
    finally:
        await worker.stop(grace=1)


def _exhausted(error: grpc.aio.AioRpcError, says: str) -> None:
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert says in (error.details() or ""), error.details()


async def _create(channel: grpc.aio.Channel, token: str, csr: str | None = None) -> str:
    try:
        await istio_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
            istio_pb2.IstioCertificateRequest(csr=csr or csr_pem(uris=[WEB_ID]).decode()),
            metadata=[("authorization", f"Bearer {token}")],
            timeout=20,
        )
    except grpc.aio.AioRpcError as error:
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error
        return error.details() or ""
    return "ok"


async def _records(server: RunningServer) -> list[AuditRecord]:
    engine = make_engine(server.settings.effective_database_url)
    log = SqlAuditLog(engine)
    try:
        return list(await log.list(limit=1000))
    finally:
        await log.aclose()
        engine.dispose()


async def _serving(channel: grpc.aio.Channel) -> bool:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=10
    )
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_signing_calls_over_the_cap_are_refused_recorded_and_the_rest_served(
    capped: RunningServer,
) -> None:
    tokens = [capped.minter.mint("default", "web") for _ in range(40)]
    async with capped.channel() as channel:
        outcomes = await asyncio.gather(*(_create(channel, t) for t in tokens))
        refused = [o for o in outcomes if o != "ok"]
        assert refused, "40 concurrent calls never had more than 2 in progress"
        assert outcomes.count("ok") >= 2
        for details in refused:
            assert details.startswith("ca is at its cap of 2 calls in progress")
        assert capped.worker.gate.limits is not None
        assert capped.worker.gate.limits.in_flight("ca") == 0  # every call counted out
        # Still healthy, and the next call is served.
        assert await _serving(channel)
        assert await _create(channel, capped.minter.mint("default", "web")) == "ok"
    records = await _records(capped)
    too_many = [r for r in records if r.reason == "too-many-calls"]
    assert len(too_many) == len(refused)
    assert all(r.outcome == "refused" and r.peer for r in too_many)
    assert all(r.api == "istio.v1.auth.CreateCertificate" for r in too_many)
    istio = [r for r in records if r.api == "istio.v1.auth.CreateCertificate"]
    assert sum(r.outcome == "issued" for r in istio) == outcomes.count("ok") + 1
    assert len(istio) == len(tokens) + 1  # every call, served or refused, has its record


async def test_watches_over_the_cap_are_refused_and_a_closed_one_frees_its_place(
    capped: RunningServer,
) -> None:
    async with capped.channel() as channel:
        stub = ca_pb2_grpc.CertificateServiceStub(channel)
        first = stub.WatchTrustBundle(ca_pb2.WatchTrustBundleRequest())
        second = stub.WatchTrustBundle(ca_pb2.WatchTrustBundleRequest())
        for stream in (first, second):
            assert (await asyncio.wait_for(stream.read(), 10)).sequence > 0
        third = stub.WatchTrustBundle(ca_pb2.WatchTrustBundleRequest())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(third.read(), 10)
        _exhausted(refused.value, "bundle-watch is at its cap of 2 calls in progress")
        # Bundle reads are another API, with their own room.
        assert (await stub.GetTrustBundle(ca_pb2.GetTrustBundleRequest(), timeout=10)).roots
        first.cancel()
        for _ in range(100):  # the server hears of the cancellation shortly
            fourth = stub.WatchTrustBundle(ca_pb2.WatchTrustBundleRequest())
            try:
                assert (await asyncio.wait_for(fourth.read(), 10)).sequence > 0
                break
            except grpc.aio.AioRpcError as error:
                _exhausted(error, "calls in progress")
                await asyncio.sleep(0.05)
        else:
            pytest.fail("a cancelled watch never gave its place back")
        second.cancel()
        fourth.cancel()
        assert await _serving(channel)


def _unknown_field(size: int) -> bytes:
    """Field 15, length-delimited: a parser keeps it as an unknown field."""
    assert size < 2**14
    return bytes([0x7A, 0x80 | (size & 0x7F), size >> 7]) + b"\0" * size


async def test_each_api_refuses_requests_over_its_size_cap_and_still_serves(
    capped: RunningServer,
) -> None:
    async with capped.channel() as channel:
        # CA: a 6 KiB CSR (the cap is 4 KiB; the server-wide one 64 KiB), recorded.
        big_csr = csr_pem(uris=[WEB_ID]).decode() + "#" * 6000
        token = capped.minter.mint("default", "web")
        details = await _create(channel, token, big_csr)
        assert "CreateCertificate request is" in details and "the limit is 4096" in details
        assert token not in details and "#" not in details
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await ca_pb2_grpc.CertificateServiceStub(channel).Sign(
                ca_pb2.SignRequest(csr=b"\x30" * 5000), timeout=10
            )
        _exhausted(error.value, "Sign request is 50")

        # Bundle: its request is empty; 100 bytes of unknown field are over 64.
        get = channel.unary_unary(
            "/meshca.v1.CertificateService/GetTrustBundle",
            request_serializer=None,
            response_deserializer=ca_pb2.TrustBundle.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await get(_unknown_field(100), timeout=10)
        _exhausted(error.value, "GetTrustBundle request is 103 bytes; the limit is 64")
        assert (await get(b"", timeout=10)).roots

        # ext_authz: a 3 KiB header (cap 2 KiB).
        authz = external_auth_pb2_grpc.AuthorizationStub(channel)
        fat = check_request(FRONTEND, BACKEND, "GET", "/", cookie="c" * 3000)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await authz.Check(fat, timeout=10)
        _exhausted(error.value, "Check request is")
        assert "c" * 100 not in (error.value.details() or "")
        assert await authz.Check(check_request(FRONTEND, BACKEND, "GET", "/"), timeout=10)

        # PolicyService: a 2 KiB path (cap 1 KiB).
        policy = policy_pb2_grpc.PolicyServiceStub(channel)
        long_path = policy_pb2.PolicyCheckRequest(source_principal=FRONTEND, path="/" + "p" * 2000)
        for call in (policy.Check, policy.Explain):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call(long_path, timeout=10)
            _exhausted(error.value, "request is")
        admin = [("authorization", f"Bearer {POLICY_TOKEN}")]
        status = await policy.Status(policy_pb2.PolicyStatusRequest(), metadata=admin, timeout=10)
        assert status.healthy

        # AuditService: a 1 KiB filter (cap 512), refused before the caller is checked.
        audit = audit_pb2_grpc.AuditServiceStub(channel)
        wide = audit_pb2.ListRecordsRequest(
            filter=audit_pb2.RecordFilter(spiffe_id_prefix="spiffe://" + "a" * 1000)
        )
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await audit.ListIssuances(wide, timeout=10)
        _exhausted(error.value, "ListIssuances request is")
        bearer = [("authorization", f"Bearer {AUDIT_TOKEN}")]
        listed = await audit.ListIssuances(audit_pb2.ListRecordsRequest(), metadata=bearer)
        assert listed is not None

        assert await _serving(channel)
        assert await _create(channel, capped.minter.mint("default", "web")) == "ok"
    records = await _records(capped)
    too_large = [r for r in records if r.reason == "request-too-large"]
    assert sorted(r.api for r in too_large) == [
        "istio.v1.auth.CreateCertificate",
        "meshca.v1.Sign",
    ]
