"""The real server attesting proxies through the Kubernetes API stand-in, in both modes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from meshca.core.audit import Outcome
from tests.fixtures_k8s import K8sApiStandIn
from tests.integration.server_harness import RunningServer, running_server
from tests.integration.test_grpc_server import _create, _key_and_csr, _pem, _records

pytestmark = pytest.mark.integration

CART = "spiffe://example.org/ns/shop/sa/cart"


def _now(api: K8sApiStandIn) -> K8sApiStandIn:
    # The stand-in mints with its own clock; the server checks with the real one.
    api.clock._now = datetime.now(UTC).replace(microsecond=0)
    return api


@pytest.fixture
async def reviewed(tmp_path: Path, k8s_api_tls: K8sApiStandIn) -> AsyncIterator[RunningServer]:
    api = _now(k8s_api_tls)
    async for server in running_server(
        tmp_path,
        k8s_mode="tokenreview",
        k8s_issuer=None,
        k8s_jwks_file=None,
        k8s_api_server=api.url,
        k8s_ca_file=Path(api.ca_file or ""),
        k8s_token_file=api.caller_token_file,
    ):
        yield server


async def test_tokenreview_issues_and_reviews_each_token_once(
    reviewed: RunningServer, k8s_api_tls: K8sApiStandIn
) -> None:
    token = k8s_api_tls.minter.token()
    for _ in range(3):
        chain = await _create(reviewed, _pem(_key_and_csr()[1]), token)
        assert len(chain) == 3
    assert k8s_api_tls.reviews == 1  # cached after the first review
    [review] = k8s_api_tls.review_requests
    assert review["spec"]["audiences"] == ["meshca"]
    issued = [r for r in await _records(reviewed) if r.outcome == Outcome.ISSUED and r.pod_uid]
    assert {r.spiffe_id for r in issued} == {CART}
    assert {(r.pod_name, r.pod_uid, r.node_name) for r in issued} == {
        ("cart-7d9f", "uid-pod-1", "node-a")
    }


async def test_tokenreview_refusal_and_outage(
    reviewed: RunningServer, k8s_api_tls: K8sApiStandIn
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _create(reviewed, _pem(_key_and_csr()[1]), k8s_api_tls.minter.token(aud=["other"]))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    k8s_api_tls.fail_status = 503
    with pytest.raises(grpc.aio.AioRpcError) as down:
        await _create(reviewed, _pem(_key_and_csr()[1]), k8s_api_tls.minter.token())
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    reasons = [r.reason for r in await _records(reviewed) if r.outcome == Outcome.REFUSED]
    assert sorted(reasons) == ["k8s-api-unavailable", "token-wrong-audience"]


async def test_jwks_by_oidc_discovery_follows_a_key_rotation(
    tmp_path: Path, k8s_api: K8sApiStandIn
) -> None:
    api = _now(k8s_api)
    api.publish("rsa-1")
    async for server in running_server(
        tmp_path,
        k8s_issuer=api.issuer,
        k8s_jwks_file=None,
        k8s_audience=("meshca",),
        k8s_jwks_min_refresh=timedelta(milliseconds=200),
    ):
        first = await _create(server, _pem(_key_and_csr()[1]), api.minter.token(key="rsa-1"))
        assert len(first) == 3
        # The cluster starts signing with a key meshca has not seen: it refetches once.
        api.publish("rsa-1", "ec-1")
        await asyncio.sleep(0.3)
        rotated = await _create(server, _pem(_key_and_csr()[1]), api.minter.token(key="ec-1"))
        assert len(rotated) == 3
        with pytest.raises(grpc.aio.AioRpcError) as rogue:
            await _create(server, _pem(_key_and_csr()[1]), api.minter.token(key="rogue-ec"))
        assert rogue.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert api.discovery_fetches >= 1
    # The first load and one refresh for ec-1; the rogue kid came within the refresh
    # interval, so it cost the cluster nothing.
    assert api.jwks_fetches == 2
