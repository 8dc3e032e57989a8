"""Graceful shutdown of ``meshca serve --workers 2`` and ``meshca dev serve``, for real.

Each test runs the server as a subprocess, drives concurrent CreateCertificate calls from
this process (one channel per client), sends SIGTERM, and checks that every call either
returned a certificate whose serial has an ISSUED record in the database or failed with
UNAVAILABLE, and that the process and its children were gone within the grace period.
Slow calls come from the Kubernetes API stand-in answering TokenReviews late.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc
from meshca.adapters.k8s.dev_issuer import DevTokenIssuer
from tests.fixtures_k8s import K8sApiStandIn
from tests.integration.server_harness import TokenMinter, serve_command
from tests.integration.shutdown_harness import (
    DEV_PORT,
    OK,
    SERVE_PORT,
    UNAVAILABLE,
    Load,
    Served,
    Stopped,
    csr_pem,
    dev_command,
    end_served,
    issued_serials,
    sigterm_under_load,
    start_served,
    wait_gone,
)

pytestmark = pytest.mark.integration

GRACE = 4.0
#: The supervisor's writer margin (1 s) and process exit, on a shared, noisy machine.
EXIT_MARGIN = 2.0
CLIENTS = 48


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[Served, TokenMinter]]:
    minter, jwks = TokenMinter.create(tmp_path)
    flags = ["--plaintext", "--shutdown-grace", f"{GRACE}s"]
    command = serve_command(tmp_path / "data", jwks, workers=2, extra=flags)
    served = start_served(command, tmp_path / "data", SERVE_PORT, "serving on", 2)
    try:
        yield served, minter
    finally:
        end_served(served)


@pytest.fixture
def dev_serve(tmp_path: Path) -> Iterator[Served]:
    data_dir = tmp_path / "dev"
    served = start_served(dev_command(data_dir, GRACE), data_dir, DEV_PORT, "serving on", 1)
    try:
        yield served
    finally:
        end_served(served)


def _check(served: Served, load: Load, stopped: Stopped) -> None:
    report = f"{stopped} {dict(load.outcomes)}\n{served.log()}"
    # Only two endings: a certificate with its record, or UNAVAILABLE.
    assert set(load.outcomes) <= {OK, UNAVAILABLE}, (load.details, report)
    missing = set(load.serials) - issued_serials(served.data_dir)
    assert not missing, (f"{len(missing)} certificates without a record", report)
    assert stopped.exit_code == 0, report
    assert stopped.tree_gone_seconds < GRACE + EXIT_MARGIN, report
    print(
        f"in flight at SIGTERM {stopped.in_flight_at_signal}; "
        f"{load.outcomes[OK]} OK, {load.outcomes[UNAVAILABLE]} UNAVAILABLE; "
        f"exit after {stopped.exit_seconds:.2f}s, tree gone after {stopped.tree_gone_seconds:.2f}s"
    )


async def test_serve_drains_under_load(serve: tuple[Served, TokenMinter]) -> None:
    served, minter = serve
    tokens = [minter.mint("shop", f"sa{i}") for i in range(CLIENTS)]
    load = Load(served.target, tokens)
    stopped = await sigterm_under_load(served, load, warmup=1.0)
    _check(served, load, stopped)
    assert stopped.in_flight_at_signal > 0


async def test_dev_serve_drains_under_load(dev_serve: Served) -> None:
    issuer = DevTokenIssuer(dev_serve.data_dir / "dev-issuer")
    now = datetime.now(UTC)
    tokens = [issuer.mint("shop", f"sa{i}", "meshca", now=now) for i in range(CLIENTS)]
    load = Load(dev_serve.target, tokens)
    stopped = await sigterm_under_load(dev_serve, load, warmup=1.0)
    _check(dev_serve, load, stopped)
    assert stopped.in_flight_at_signal > 0


def _now(api: K8sApiStandIn) -> K8sApiStandIn:
    # The stand-in mints with its own clock; the server checks with the real one.
    api.clock._now = datetime.now(UTC).replace(microsecond=0)
    return api


def _tokenreview_flags(api: K8sApiStandIn) -> list[str]:
    return [
        "--trust-domain", "example.org",
        "--k8s-mode", "tokenreview",
        "--k8s-api-server", api.url,
        "--k8s-token-file", str(api.caller_token_file),
    ]  # fmt: skip


async def _slow_calls(target: str, api: K8sApiStandIn, count: int) -> list[asyncio.Task[str]]:
    """``count`` CreateCertificate calls, returned once the stand-in holds all their reviews."""

    async def call(token: str) -> str:
        request = istio_pb2.IstioCertificateRequest(csr=csr_pem())
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            try:
                response = await istio_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
                    request, metadata=[("authorization", f"Bearer {token}")], timeout=30
                )
            except grpc.aio.AioRpcError as error:
                return error.code().name
        leaf = x509.load_pem_x509_certificate(response.cert_chain[0].encode())
        return f"{leaf.serial_number:x}"

    before = api.review_arrivals
    calls = [asyncio.create_task(call(api.minter.token())) for _ in range(count)]
    deadline = time.monotonic() + 20
    while api.review_arrivals < before + count:
        assert time.monotonic() < deadline, "the calls never reached the API server"
        await asyncio.sleep(0.01)
    return calls


async def test_serve_finishes_a_slow_call_in_flight(tmp_path: Path, k8s_api: K8sApiStandIn) -> None:
    """Calls waiting 2 s on TokenReview when SIGTERM comes still get their certificates."""
    api = _now(k8s_api)
    data_dir = tmp_path / "data"
    command = [
        sys.executable, "-m", "meshca", "serve", "--listen", "127.0.0.1:0",
        "--data-dir", str(data_dir), "--workers", "2", "--plaintext",
        "--shutdown-grace", f"{GRACE}s", *_tokenreview_flags(api),
    ]  # fmt: skip
    served = start_served(command, data_dir, SERVE_PORT, "serving on", 2)
    try:
        api.delay = 2.0
        calls = await _slow_calls(served.target, api, 8)
        descendants = served.descendants()
        started = time.monotonic()
        served.process.send_signal(signal.SIGTERM)
        # While the calls finish: health is off and new calls are refused.
        await asyncio.sleep(0.3)
        health = await _health(served.target)
        late = await _slow_call_refused(served.target, api)
        results = await asyncio.gather(*calls)
        exit_code = await asyncio.to_thread(served.process.wait, 30)
        gone = await asyncio.to_thread(wait_gone, descendants, started)
        report = (
            f"{results} health={health} late={late} exit={exit_code} gone={gone:.2f}s\n"
            f"{served.log()}"
        )
        assert health == {"": "NOT_SERVING", "meshca.ready": "NOT_SERVING"}, report
        # The workers' gates held the 8 calls (in their handlers) when the drain began.
        counted = re.findall(r"(\d+) call\(s\) in flight", "".join(served.output))
        assert len(counted) == 2 and sum(map(int, counted)) == 8, report
        assert late == UNAVAILABLE, report
        assert all(re.fullmatch(r"[0-9a-f]+", r) for r in results), report
        assert set(results) <= issued_serials(data_dir), report
        assert exit_code == 0 and gone < GRACE + EXIT_MARGIN, report
        # The drain waited for the calls (about the rest of the 2 s review), not longer.
        assert gone > 1.0, report
    finally:
        end_served(served)


async def _health(target: str) -> dict[str, str]:
    """Liveness and readiness as one of the workers answers them."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    found = {}
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        for name in ("", "meshca.ready"):
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=name), timeout=5
            )
            found[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return found


async def _slow_call_refused(target: str, api: K8sApiStandIn) -> str:
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        try:
            await istio_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
                istio_pb2.IstioCertificateRequest(csr=csr_pem()),
                metadata=[("authorization", f"Bearer {api.minter.token()}")],
                timeout=10,
            )
        except grpc.aio.AioRpcError as error:
            return error.code().name
    return OK


async def test_dev_serve_aborts_calls_past_the_grace(
    tmp_path: Path, k8s_api: K8sApiStandIn
) -> None:
    """A TokenReview slower than the grace: the call fails UNAVAILABLE, and the process
    is gone within the grace although a thread is still stuck in the review."""
    api = _now(k8s_api)
    grace = 1.5
    data_dir = tmp_path / "dev"
    command = dev_command(data_dir, grace, *_tokenreview_flags(api))
    served = start_served(command, data_dir, DEV_PORT, "serving on", 1)
    try:
        api.delay = 30.0  # longer than the attestor's own 5 s timeout
        calls = await _slow_calls(served.target, api, 4)
        started = time.monotonic()
        served.process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(served.process.wait, 30)
        gone = time.monotonic() - started
        results = await asyncio.gather(*calls)
        report = f"{results} exit={exit_code} gone={gone:.2f}s\n{served.log()}"
        assert results == [UNAVAILABLE] * 4, report
        assert gone < grace + EXIT_MARGIN, report
        assert "4 call(s) still running" in served.log(), report
        # The review's thread outlives the drain; it runs on the attestor's own pool, which
        # the exit does not wait for. Had anything held the exit, the watchdog would have
        # ended the process (status 1) by the grace's end.
        assert exit_code == 0 or "exiting now" in served.log(), report
    finally:
        end_served(served)


async def test_dev_serve_second_sigterm_cuts_the_drain_short(
    tmp_path: Path, k8s_api: K8sApiStandIn
) -> None:
    """With a 10 s grace and a review that never answers in time, a second SIGTERM ends
    the calls (UNAVAILABLE) and the process at once."""
    api = _now(k8s_api)
    data_dir = tmp_path / "dev"
    command = dev_command(data_dir, 10.0, *_tokenreview_flags(api))
    served = start_served(command, data_dir, DEV_PORT, "serving on", 1)
    try:
        api.delay = 30.0
        calls = await _slow_calls(served.target, api, 4)
        served.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        again = time.monotonic()
        served.process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(served.process.wait, 30)
        gone = time.monotonic() - again
        results = await asyncio.gather(*calls)
        report = f"{results} exit={exit_code} gone={gone:.2f}s\n{served.log()}"
        assert results == [UNAVAILABLE] * 4, report
        # The cleanup's share of the grace (1 s), then the watchdog: not the 10 s grace.
        assert gone < 1.0 + EXIT_MARGIN, report
        assert "SIGTERM again: cutting the drain short" in served.log(), report
    finally:
        end_served(served)
