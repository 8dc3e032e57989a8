"""``--issuance-rate`` on the real server: one pod hammering is cut off, its neighbours
are not, both outcomes are in the issuance record, and the rate comes back."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc
from meshca.adapters.grpc._gen.meshca.v1 import ca_pb2, ca_pb2_grpc
from meshca.adapters.storage.audit_log import SqlAuditLog
from meshca.adapters.storage.engine import make_engine
from meshca.core.audit import AuditRecord
from tests.core.builders import csr_der, csr_pem
from tests.fixtures_k8s import K8sApiStandIn
from tests.integration.serve_process import launch
from tests.integration.server_harness import (
    RunningServer,
    TokenMinter,
    running_server,
    serve_command,
)

pytestmark = pytest.mark.integration

WEB_ID = "spiffe://example.org/ns/default/sa/web"
API_ID = "spiffe://example.org/ns/default/sa/api"
#: Short enough to wait out in a test; long enough that 10 calls fit well inside it.
RATE, PERIOD = 3, 4.0


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async for running in running_server(tmp_path, issuance_rate=f"{RATE}/{PERIOD:g}s"):
        yield running


def _pod_token(server: RunningServer, service_account: str, pod_uid: str) -> str:
    """A token bound to the pod ``pod_uid`` (each mint is a different token)."""
    now = int(time.time())
    return server.minter.mint(
        "default",
        service_account,
        **{
            "kubernetes.io": {
                "namespace": "default",
                "serviceaccount": {"name": service_account, "uid": f"sa-{service_account}"},
                "pod": {"name": f"{service_account}-{pod_uid[:5]}", "uid": pod_uid},
                "node": {"name": "node-1", "uid": "node-uid"},
            },
            "iat": now,
            "jti": uuid.uuid4().hex,
        },
    )


async def _sign(channel: grpc.aio.Channel, token: str, spiffe_id: str) -> grpc.StatusCode:
    stub = istio_grpc.IstioCertificateServiceStub(channel)
    try:
        await stub.CreateCertificate(
            istio_pb2.IstioCertificateRequest(csr=csr_pem(uris=[spiffe_id]).decode()),
            metadata=[("authorization", f"Bearer {token}")],
            timeout=10,
        )
    except grpc.aio.AioRpcError as error:
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        details = error.details() or ""
        assert "issuance rate limit" in details and "retry in" in details
        assert token not in details
        return error.code()
    return grpc.StatusCode.OK


async def _records(server: RunningServer) -> list[AuditRecord]:
    engine = make_engine(server.settings.effective_database_url)
    log = SqlAuditLog(engine)
    try:
        return list(await log.list(limit=1000))
    finally:
        await log.aclose()
        engine.dispose()


async def test_one_pod_hammering_is_limited_and_its_neighbours_are_not(
    server: RunningServer,
) -> None:
    hammer = _pod_token(server, "web", "pod-hammer")
    neighbour = _pod_token(server, "web", "pod-neighbour")  # same service account
    other = _pod_token(server, "api", "pod-other")  # another identity
    async with server.channel() as channel:
        # The hammer replays its token over ten concurrent calls, while the others ask.
        results = await asyncio.gather(
            *(_sign(channel, hammer, WEB_ID) for _ in range(10)),
            _sign(channel, neighbour, WEB_ID),
            _sign(channel, neighbour, WEB_ID),
            _sign(channel, other, API_ID),
        )
        # A second token for the hammering pod is the same pod: still refused.
        again = await _sign(channel, _pod_token(server, "web", "pod-hammer"), WEB_ID)
    hammered, others = results[:10], results[10:]
    assert hammered.count(grpc.StatusCode.OK) == RATE
    assert hammered.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 10 - RATE
    assert others == [grpc.StatusCode.OK] * 3
    assert again is grpc.StatusCode.RESOURCE_EXHAUSTED

    records = await _records(server)
    by_pod: dict[str | None, list[tuple[str, str]]] = {}
    for record in records:
        by_pod.setdefault(record.pod_uid, []).append((record.outcome, record.reason))
    assert sorted(by_pod["pod-hammer"]) == sorted(
        [("issued", "ok")] * RATE + [("refused", "rate-limited")] * (10 - RATE + 1)
    )
    assert by_pod["pod-neighbour"] == [("issued", "ok")] * 2
    assert by_pod["pod-other"] == [("issued", "ok")]
    for record in records:
        if record.reason == "rate-limited":
            assert record.spiffe_id == WEB_ID and record.serial is None
            assert record.api == "istio.v1.auth.CreateCertificate"
            assert record.peer and "127.0.0.1" in record.peer


async def test_the_rate_comes_back_after_the_period(server: RunningServer) -> None:
    token = _pod_token(server, "web", "pod-recovering")
    async with server.channel() as channel:
        started = time.monotonic()
        first = [await _sign(channel, token, WEB_ID) for _ in range(RATE + 2)]
        burst_done = time.monotonic()
        assert first == [grpc.StatusCode.OK] * RATE + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        # Asking all through the wait, refused each time (until just before the first
        # one comes back, a period/RATE after the first issuance), pushes nothing back.
        while time.monotonic() < started + PERIOD / RATE - 0.3:
            assert await _sign(channel, token, WEB_ID) is grpc.StatusCode.RESOURCE_EXHAUSTED
            await asyncio.sleep(0.05)
        # A full period after the last issuance, the whole burst is back.
        await asyncio.sleep(max(0.0, burst_done + PERIOD + 0.1 - time.monotonic()))
        after = [await _sign(channel, token, WEB_ID) for _ in range(RATE + 1)]
    assert after == [grpc.StatusCode.OK] * RATE + [grpc.StatusCode.RESOURCE_EXHAUSTED]


async def test_meshca_sign_is_limited_too_and_says_so_without_the_token(
    server: RunningServer,
) -> None:
    token = _pod_token(server, "web", "pod-sign")
    codes = []
    async with server.channel() as channel:
        stub = ca_pb2_grpc.CertificateServiceStub(channel)
        for _ in range(RATE + 1):
            try:
                await stub.Sign(
                    ca_pb2.SignRequest(csr=csr_der(uris=[WEB_ID])),
                    metadata=[("authorization", f"Bearer {token}")],
                    timeout=10,
                )
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as error:
                codes.append(error.code())
                assert "pod pod-sign" in (error.details() or "")
                assert token not in (error.details() or "")
    assert codes == [grpc.StatusCode.OK] * RATE + [grpc.StatusCode.RESOURCE_EXHAUSTED]


async def test_across_workers_a_replayed_token_gets_the_rate_once_per_host(
    tmp_path: Path,
) -> None:
    """``meshca serve --workers 2``: one token replayed over 40 fresh connections, which
    the kernel spreads over both workers, gets RATE certificates in all, not RATE per
    worker: the workers count in one table (adapters/shared_rate.py), removed at exit."""
    minter, jwks = TokenMinter.create(tmp_path)
    data_dir = tmp_path / "data"
    extra = ["--plaintext", "--issuance-rate", "3/1m"]
    command = serve_command(data_dir, jwks, workers=2, extra=extra)
    server = await asyncio.to_thread(launch, "meshca", data_dir, command, workers=2)
    try:
        assert [p.name for p in data_dir.glob("issuance-rate-*.table")] == [
            f"issuance-rate-{server.process.pid}.table"
        ]
        token = minter.mint("default", "web")

        async def one_connection() -> grpc.StatusCode:
            # A channel of its own, not shared: a new TCP connection each time.
            options = [("grpc.use_local_subchannel_pool", 1)]
            async with grpc.aio.insecure_channel(server.target, options=options) as channel:
                return await _sign(channel, token, WEB_ID)

        codes = [await one_connection() for _ in range(40)]
    finally:
        await asyncio.to_thread(server.stop)
    assert codes.count(grpc.StatusCode.OK) == 3, (codes, server.log())
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 37
    assert not list(data_dir.glob("issuance-rate-*"))
    # Both workers answered (each logs its refusals under its own name): the count
    # was shared, not one worker's.
    refusing = {
        found.group(1)
        for line in server.output
        if (found := re.search(r" (worker-\d+) \S+: request refused: issuance rate", line))
    }
    assert refusing == {"worker-0", "worker-1"}, server.log()


def _k8s_pod(api: K8sApiStandIn, service_account: str, pod_uid: str | None) -> str:
    """A token from the API stand-in, bound to ``pod_uid`` (None: to no pod)."""
    if pod_uid is None:
        return api.minter.token(service_account=service_account, pod=False)
    return api.minter.token(
        **{
            "kubernetes.io": {
                "namespace": "shop",
                "serviceaccount": {"name": service_account, "uid": f"uid-sa-{service_account}"},
                "pod": {"name": f"{service_account}-{pod_uid}", "uid": pod_uid},
                "node": {"name": "node-a", "uid": "uid-node-a"},
            }
        },
        service_account=service_account,
    )


async def test_tokenreview_counts_by_the_pod_the_api_server_names(
    tmp_path: Path, k8s_api_tls: K8sApiStandIn
) -> None:
    """In tokenreview mode (the default) the pod UID comes from the review's
    ``authentication.kubernetes.io/pod-uid``: the same counting as jwks mode."""
    api = k8s_api_tls
    api.clock._now = datetime.now(UTC).replace(microsecond=0)
    cart = "spiffe://example.org/ns/shop/sa/cart"
    async for server in running_server(
        tmp_path,
        issuance_rate="2/1m",
        k8s_mode="tokenreview",
        k8s_issuer=None,
        k8s_jwks_file=None,
        k8s_api_server=api.url,
        k8s_ca_file=Path(api.ca_file or ""),
        k8s_token_file=api.caller_token_file,
    ):
        async with server.channel() as channel:

            async def ask(token: str, times: int) -> str:
                codes = [await _sign(channel, token, cart) for _ in range(times)]
                return "".join("i" if c is grpc.StatusCode.OK else "r" for c in codes)

            assert await ask(_k8s_pod(api, "cart", "pod-a"), 3) == "iir"
            assert await ask(_k8s_pod(api, "cart", "pod-a"), 1) == "r"  # same pod, new token
            assert await ask(_k8s_pod(api, "cart", "pod-b"), 2) == "ii"  # same SA, other pod
            no_pod = _k8s_pod(api, "cart", None)
            assert await ask(no_pod, 3) == "iir"  # a token bound to no pod: by itself
            assert await ask(_k8s_pod(api, "cart", None), 1) == "i"
        records = [r for r in await _records(server) if r.api.startswith("istio")]
    limited = [(r.pod_uid, r.spiffe_id) for r in records if r.reason == "rate-limited"]
    assert sorted(limited, key=str) == sorted(
        [("pod-a", cart), ("pod-a", cart), (None, cart)], key=str
    )
