"""Fault trials against meshca's upstreams: the Kubernetes API server in tokenreview mode
and Vault (a real OpenBao) as the upstream CA, each taken away and brought back while the
real server keeps running. The figures for docs/reliability.md come from
``bench/upstream_faults.py``; these tests check the behaviour with generous bounds."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc
from meshca.adapters.grpc.server import READY_HEALTH as READY
from meshca.adapters.k8s.token_review import API_SERVER_UNAVAILABLE
from meshca.app import AUTHORITY_HEALTH
from meshca.core.audit import Outcome
from meshca.service.ca import serial_hex
from tests.fixtures_k8s import K8sApiStandIn, SigningKey
from tests.fixtures_vault import OpenBao, vault_overrides
from tests.integration.server_harness import RunningServer, running_server
from tests.integration.test_grpc_server import _key_and_csr, _pem, _records

pytestmark = pytest.mark.integration

CACHE_TTL = 2.0


def _tokenreview(api: K8sApiStandIn) -> dict[str, Any]:
    return {
        "k8s_mode": "tokenreview",
        "k8s_issuer": None,
        "k8s_jwks_file": None,
        "k8s_api_server": api.url,
        "k8s_token_file": api.caller_token_file,
        "token_cache_ttl": timedelta(seconds=CACHE_TTL),
    }


async def _code(server: RunningServer, token: str, deadline: float = 10) -> grpc.StatusCode:
    """The status of one CreateCertificate call (OK when a chain came back)."""
    async with server.channel() as channel:
        stub = istio_grpc.IstioCertificateServiceStub(channel)
        request = istio_pb2.IstioCertificateRequest(csr=_pem(_key_and_csr()[1]))
        try:
            response = await stub.CreateCertificate(
                request, metadata=[("authorization", f"Bearer {token}")], timeout=deadline
            )
        except grpc.aio.AioRpcError as error:
            return error.code()
    assert len(response.cert_chain) >= 2
    return grpc.StatusCode.OK


async def test_api_server_down_in_tokenreview_mode(
    tmp_path: Path, k8s_api: K8sApiStandIn, k8s_signing_keys: dict[str, SigningKey]
) -> None:
    api = k8s_api
    # The stand-in mints with its own clock; the server checks with the real one.
    api.clock._now = datetime.now(UTC).replace(microsecond=0)
    port = int(api.url.rsplit(":", 1)[1])
    known = api.minter.token(service_account="cart")
    new = api.minter.token(service_account="orders")
    async for server in running_server(tmp_path, **_tokenreview(api)):
        asked_first = time.monotonic()
        assert await _code(server, known) == grpc.StatusCode.OK
        answered_first = time.monotonic()
        api.stop()  # connections are refused from here on

        # The token reviewed before the outage keeps working until the cache forgets it.
        codes: list[grpc.StatusCode] = []
        while time.monotonic() - answered_first < CACHE_TTL + 3:
            codes.append(await _code(server, known))
            if codes[-1] != grpc.StatusCode.OK:
                break
        expired_at = time.monotonic()
        assert codes[0] == grpc.StatusCode.OK, "a verified token must outlive the outage's start"
        assert codes[-1] == grpc.StatusCode.UNAVAILABLE, codes
        # Remembered from the review on, for the TTL (the clocks agree to a tick).
        assert expired_at - asked_first >= CACHE_TTL - 0.1

        # A token never seen is not known bad: UNAVAILABLE at once, never UNAUTHENTICATED.
        asked = time.monotonic()
        assert await _code(server, new) == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - asked < 2.0

        refused = [r for r in await _records(server) if r.outcome == Outcome.REFUSED]
        assert len(refused) == 2
        assert {r.reason for r in refused} == {API_SERVER_UNAVAILABLE}
        for record in refused:
            assert "Kubernetes API server" in record.detail and api.url in record.detail
            assert "unreachable" in record.detail

        # The API server returns at the same address: no restart of meshca is needed.
        back = K8sApiStandIn(k8s_signing_keys, clock=api.clock, port=port)
        back.caller_token_file = api.caller_token_file
        try:
            assert await _code(server, new) == grpc.StatusCode.OK
            assert await _code(server, known) == grpc.StatusCode.OK
            assert back.reviews == 2
        finally:
            back.stop()


async def test_a_hung_api_server_does_not_take_readiness_down(
    tmp_path: Path, k8s_api: K8sApiStandIn
) -> None:
    """Reviews that hang until their timeout must not starve the other blocking work
    (the readiness probe's database round trip): a replica that can still sign for every
    cached token stays ready."""
    api = k8s_api
    api.clock._now = datetime.now(UTC).replace(microsecond=0)
    known = api.minter.token(service_account="cart")
    settings = {**_tokenreview(api), "token_cache_ttl": timedelta(seconds=60)}
    settings["journal_poll"] = timedelta(seconds=0.5)  # readiness rounds every 0.5 s
    async for server in running_server(tmp_path, **settings):
        assert await _code(server, known) == grpc.StatusCode.OK
        api.delay = 30  # the API server accepts and never answers (5 s review timeout)
        # More new tokens than any default thread pool has threads (32 at most).
        flood = [
            asyncio.ensure_future(_code(server, api.minter.token(service_account=f"sa-{i}"), 8))
            for i in range(40)
        ]
        try:
            async with server.channel() as channel:
                health = health_pb2_grpc.HealthStub(channel)
                started = time.monotonic()
                while time.monotonic() - started < 7:  # past the probe's 5 s timeout
                    ready = await health.Check(health_pb2.HealthCheckRequest(service=READY))
                    assert ready.status == health_pb2.HealthCheckResponse.SERVING
                    assert await _code(server, known) == grpc.StatusCode.OK
                    await asyncio.sleep(0.5)
        finally:
            codes = await asyncio.gather(*flood)
        assert set(codes) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
        assert grpc.StatusCode.UNAVAILABLE in codes


#: Vault backdates what it signs by 30 s; capped at 40 s, an intermediate lives 70 s and is
#: due for renewal 5 s after it is signed (meshca itself never asks for less than 60 s).
#: Plaintext: meshca's own serving certificate would need 60 s left on its intermediate.
VAULT_MAX_TTL = "40s"
VAULT_FAST: dict[str, Any] = {
    "plaintext": True,
    "journal_poll": timedelta(seconds=0.1),
    "max_svid_ttl": timedelta(seconds=4),
    "svid_ttl": timedelta(seconds=4),
    "propagation_delay": timedelta(seconds=2),
    "intermediate_ttl": timedelta(seconds=40),
}


async def _chain(server: RunningServer) -> list[x509.Certificate]:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = istio_grpc.IstioCertificateServiceStub(channel)
        response = await stub.CreateCertificate(
            istio_pb2.IstioCertificateRequest(csr=_pem(_key_and_csr()[1])),
            metadata=[("authorization", f"Bearer {server.minter.mint()}")],
            timeout=10,
        )
    return [x509.load_pem_x509_certificate(p.encode()) for p in response.cert_chain]


async def _authority_health(server: RunningServer) -> int:
    async with grpc.aio.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=AUTHORITY_HEALTH))
    return int(answer.status)


def _half_life(certificate: x509.Certificate) -> datetime:
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    return start + (end - start) / 2


@pytest.mark.parametrize("dedicated_openbao", [True], ids=["raft"], indirect=True)
async def test_openbao_killed_while_the_intermediate_falls_due(
    dedicated_openbao: OpenBao, tmp_path: Path
) -> None:
    bao = dedicated_openbao
    overrides = vault_overrides(bao, tmp_path, transit=False)
    bao.call(
        "POST", f"sys/mounts/{overrides['vault_pki_mount']}/tune", {"max_lease_ttl": VAULT_MAX_TTL}
    )
    serving = health_pb2.HealthCheckResponse.SERVING
    async for server in running_server(tmp_path, **VAULT_FAST, **overrides):
        first = await _chain(server)
        intermediate, vault_root = first[1], first[-1]
        due = _half_life(intermediate)
        assert await _authority_health(server) == serving
        bao.kill()  # kill -9

        # Issuance goes on under the current intermediate, before and after it falls due.
        received: list[x509.Certificate] = []
        while datetime.now(UTC) < due + timedelta(seconds=1):
            chain = await _chain(server)
            assert chain[1] == intermediate
            received.append(chain[0])
            await asyncio.sleep(0.05)
        assert server.worker.authorities.rotation().should_prepare_intermediate(
            datetime.now(UTC)
        ), "the renewal is due and cannot happen"
        # ...and the CA says it is degraded, without claiming to be down.
        assert server.worker.rotator.degraded and "unreachable" in server.worker.rotator.degraded
        assert await _authority_health(server) == health_pb2.HealthCheckResponse.NOT_SERVING
        chain = await _chain(server)
        assert chain[1] == intermediate and chain[0].not_valid_after_utc <= (
            intermediate.not_valid_after_utc
        )
        received.append(chain[0])

        # OpenBao comes back on the same storage: meshca renews and recovers by itself.
        bao.start()
        back = time.monotonic()
        while time.monotonic() - back < 30:
            renewed = server.worker.authorities.current().certificate != intermediate
            if renewed and await _authority_health(server) == serving:
                break
            await asyncio.sleep(0.1)
        assert server.worker.authorities.current().certificate != intermediate
        assert await _authority_health(server) == serving
        assert server.worker.rotator.degraded is None
        chain = await _chain(server)
        assert chain[1] != intermediate and chain[-1] == vault_root
        received.append(chain[0])

    # Every certificate a client received has its record.
    issued = {r.serial for r in await _records(server) if r.outcome == Outcome.ISSUED}
    assert {serial_hex(c.serial_number) for c in received} <= issued
