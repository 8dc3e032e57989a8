"""The plaintext health port for Kubernetes probes: liveness ("") and readiness
(``meshca.ready``), in-process and through the real multi-process ``meshca serve``."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc
from meshca.adapters.grpc._gen.meshca.v1 import ca_pb2, ca_pb2_grpc
from tests.core.builders import csr_pem
from tests.fixtures_pg import PostgresServer
from tests.fixtures_vault import OpenBao, vault_overrides
from tests.integration.server_harness import (
    RunningServer,
    TokenMinter,
    running_server,
    serve_command,
)

pytestmark = pytest.mark.integration

READY = "meshca.ready"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
#: How long a readiness change may take to show: rounds run every 0.2 s here.
DEADLINE = 10.0


async def _status(channel: grpc.aio.Channel, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    response = await health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
    return int(response.status)


async def _await_ready(channel: grpc.aio.Channel, wanted: int) -> None:
    """Poll ``meshca.ready`` until it is ``wanted``; liveness must stay SERVING meanwhile."""
    deadline = time.monotonic() + DEADLINE
    seen = None
    while time.monotonic() < deadline:
        assert await _status(channel, "") == SERVING
        seen = await _status(channel, READY)
        if seen == wanted:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{READY} is still {seen} after {DEADLINE}s, not {wanted}")


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async for running in running_server(tmp_path, health_listen="127.0.0.1:0"):
        yield running


async def test_health_port_is_plaintext_and_serves_only_health(server: RunningServer) -> None:
    assert server.worker.health_port not in (None, server.worker.port)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.worker.health_port}") as channel:
        assert await _status(channel, "") == SERVING
        assert await _status(channel, READY) == SERVING
        assert await _status(channel, "meshca.v1.CertificateService") == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ca_pb2_grpc.CertificateServiceStub(channel).GetTrustBundle(
                ca_pb2.GetTrustBundleRequest(), timeout=5
            )
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await istio_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
                istio_pb2.IstioCertificateRequest(csr=csr_pem().decode()), timeout=5
            )
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await reflection.read()
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # The TLS port reports the same statuses, and still refuses plaintext.
    async with server.channel() as channel:
        assert await _status(channel, READY) == SERVING
    async with grpc.aio.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _status(channel, "")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_no_health_port_unless_asked(tmp_path: Path) -> None:
    async for running in running_server(tmp_path):
        assert running.worker.health_port is None
        assert running.worker.health_server is None


async def test_readiness_follows_postgresql_while_liveness_stays(
    tmp_path: Path, dedicated_postgres: PostgresServer
) -> None:
    async for server in running_server(
        tmp_path,
        database_url=dedicated_postgres.url(),
        health_listen="127.0.0.1:0",
        journal_poll=timedelta(seconds=0.2),
    ):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.worker.health_port}") as channel:
            await _await_ready(channel, SERVING)
            await asyncio.to_thread(dedicated_postgres.stop)
            await _await_ready(channel, NOT_SERVING)
            await asyncio.to_thread(dedicated_postgres.start)
            await _await_ready(channel, SERVING)
        # Ready again means it really signs and records again, with the same process.
        async with server.channel() as channel:
            response = await istio_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
                istio_pb2.IstioCertificateRequest(csr=csr_pem().decode()),
                metadata=[("authorization", f"Bearer {server.minter.mint()}")],
                timeout=10,
            )
        assert len(response.cert_chain) == 3


@pytest.mark.parametrize("dedicated_openbao", [True], ids=["raft"], indirect=True)
async def test_readiness_needs_the_transit_key(dedicated_openbao: OpenBao, tmp_path: Path) -> None:
    # The issuer's key is in Vault's Transit engine: each round's signature goes there.
    overrides = vault_overrides(dedicated_openbao, tmp_path, transit=True)
    async for server in running_server(
        tmp_path, health_listen="127.0.0.1:0", journal_poll=timedelta(seconds=0.2), **overrides
    ):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.worker.health_port}") as channel:
            await _await_ready(channel, SERVING)
            await asyncio.to_thread(dedicated_openbao.kill)
            await _await_ready(channel, NOT_SERVING)
            await asyncio.to_thread(dedicated_openbao.start)
            await _await_ready(channel, SERVING)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@dataclass
class Served:
    """``meshca serve --workers 2 --health-listen 127.0.0.1:<port>`` in a subprocess."""

    health_port: int
    output: list[str]

    def health_lines(self) -> set[str]:
        """The workers that said they serve health on ``health_port``."""
        pattern = rf"(worker-\d)\S* \S+: health on 127\.0\.0\.1:{self.health_port}\b"
        return set(re.findall(pattern, "".join(self.output)))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    # A fixed port: with port 0, each worker would bind a port of its own.
    health_port = _free_port()
    _, jwks = TokenMinter.create(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")}
    command = serve_command(
        tmp_path / "data",
        jwks,
        workers=2,
        extra=["--health-listen", f"127.0.0.1:{health_port}", "--journal-poll", "0.2s"],
    )
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    served = Served(health_port, [])
    both = threading.Event()

    def collect() -> None:
        # Read to the end, so the server never blocks on a full pipe.
        assert process.stdout is not None
        for line in process.stdout:
            served.output.append(line)
            if len(served.health_lines()) == 2:
                both.set()
        both.set()

    reader = threading.Thread(target=collect, name="serve-output", daemon=True)
    reader.start()
    try:
        assert both.wait(60) and process.poll() is None, "".join(served.output)
        yield served
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=30) == 0, "".join(served.output[-50:])
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            reader.join(10)
            if process.stdout:
                process.stdout.close()


async def test_serve_workers_share_the_health_port(served: Served) -> None:
    # Both workers bound the one port (without SO_REUSEPORT the second could not).
    assert served.health_lines() == {"worker-0", "worker-1"}, "".join(served.output)
    # The kernel spreads connections over the workers: each must answer health, only that.
    for _ in range(6):
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{served.health_port}", options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            await _await_ready(channel, SERVING)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await ca_pb2_grpc.CertificateServiceStub(channel).GetTrustBundle(
                    ca_pb2.GetTrustBundleRequest(), timeout=5
                )
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
