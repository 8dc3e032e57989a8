"""``meshca agent`` under hostile conditions: socket paths already taken, a token file that
disappears, a server that is not there."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from spiffe import WorkloadApiClient
from spiffe._proto import workload_pb2, workload_pb2_grpc

from tests.integration.agent_harness import (
    AgentProcess,
    agent_command,
    launch_agent,
    short_dir,
    start_agent_process,
)
from tests.integration.serve_process import REPO
from tests.integration.server_harness import RunningServer, running_server

pytestmark = pytest.mark.integration

UPSTREAM = "meshca.agent.Upstream"


@pytest.fixture
def sockets() -> Iterator[Path]:
    directory = short_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    fast = {
        "journal_poll": timedelta(seconds=0.1),
        "max_svid_ttl": timedelta(seconds=4),
        "svid_ttl": timedelta(seconds=4),
    }
    async for running in running_server(tmp_path, **fast):
        yield running


def _serial(agent: AgentProcess) -> int:
    with WorkloadApiClient(socket_path=agent.endpoint, default_timeout=10) as client:
        return int(client.fetch_x509_svid().leaf.serial_number)


def _run_to_exit(command: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")}
    environ["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=environ, cwd=REPO
    )


async def test_socket_path_live_stale_and_regular_file(
    server: RunningServer, sockets: Path
) -> None:
    agent = await asyncio.to_thread(launch_agent, server, sockets)
    try:
        await asyncio.to_thread(agent.wait_health, "SERVING")
        # A live socket: a second agent refuses it and leaves the first one serving.
        second = await asyncio.to_thread(
            _run_to_exit,
            agent_command(server.target, agent.token_file, agent.socket, "--plaintext"),
        )
        assert second.returncode == 2, second.stderr
        assert "another process is listening on" in second.stderr
        assert await asyncio.to_thread(agent.health) == "SERVING"
    finally:
        await asyncio.to_thread(agent.stop)

    # A regular file: refused and left as it was.
    regular = sockets / "regular.sock"
    regular.write_text("not a socket")
    refused = await asyncio.to_thread(
        _run_to_exit, agent_command(server.target, agent.token_file, regular, "--plaintext")
    )
    assert refused.returncode == 2 and "is not a socket" in refused.stderr
    assert regular.read_text() == "not a socket"

    # A stale socket (bound, never listened on, its owner gone): replaced.
    stale = sockets / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(stale))
    assert stale.is_socket()
    ca_file = sockets / "ca.pem"
    command = agent_command(
        server.target, agent.token_file, stale, "--socket-mode", "0640", ca_file=ca_file
    )
    replaced = await asyncio.to_thread(
        start_agent_process, command, stale, agent.token_file, sockets / "out"
    )
    try:
        await asyncio.to_thread(replaced.wait_health, "SERVING")
        assert stale.is_socket() and stat.S_IMODE(stale.stat().st_mode) == 0o640
        assert await asyncio.to_thread(_serial, replaced) > 0
    finally:
        code = await asyncio.to_thread(replaced.stop)
    assert code == 0, replaced.log()
    assert not stale.exists(), "the agent removes its socket when it stops"


async def test_token_file_disappears_and_returns(server: RunningServer, sockets: Path) -> None:
    agent = await asyncio.to_thread(launch_agent, server, sockets)
    try:
        await asyncio.to_thread(agent.wait_health, "SERVING", UPSTREAM)
        held = await asyncio.to_thread(_serial, agent)
        token = agent.token_file.read_text()
        since = len(agent.output)
        agent.token_file.unlink()
        await asyncio.to_thread(
            agent.wait_for_log, r"token file .* cannot be read.*still serving SVID", 15, since
        )
        await asyncio.to_thread(agent.wait_health, "NOT_SERVING", UPSTREAM)
        # The last good SVID is still served while it lasts.
        assert await asyncio.to_thread(agent.health) == "SERVING"
        assert await asyncio.to_thread(_serial, agent) == held
        agent.token_file.write_text(token)
        await asyncio.to_thread(agent.wait_health, "SERVING", UPSTREAM, 20)
        await asyncio.to_thread(agent.wait_for_log, r"renewal works again", 5, since)
        assert await asyncio.to_thread(_serial, agent) != held
    finally:
        await asyncio.to_thread(agent.stop)


async def test_server_unreachable_at_start_then_gone(tmp_path: Path, sockets: Path) -> None:
    # Nobody listens on this port: the agent serves its socket and waits, saying why.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = sockets / "t.token"
    token.write_text("not-even-a-jwt")
    command = agent_command(f"127.0.0.1:{port}", token, sockets / "a.sock", "--plaintext")
    agent = await asyncio.to_thread(
        start_agent_process, command, sockets / "a.sock", token, sockets / "out"
    )
    try:
        await asyncio.to_thread(agent.wait_for_log, r"no SVID yet; retrying in")
        assert await asyncio.to_thread(agent.health) == "NOT_SERVING"
        assert await asyncio.to_thread(agent.health, UPSTREAM) == "NOT_SERVING"

        def fetch_code() -> grpc.StatusCode:
            with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
                stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
                stream = stub.FetchX509SVID(
                    workload_pb2.X509SVIDRequest(),
                    metadata=(("workload.spiffe.io", "true"),),
                    timeout=1,
                )
                try:
                    next(stream)
                except grpc.RpcError as exc:
                    return exc.code()
            return grpc.StatusCode.OK

        assert await asyncio.to_thread(fetch_code) == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await asyncio.to_thread(agent.stop)

    # With an SVID held, a server that goes away: the SVID stays served, health says so.
    (tmp_path / "s").mkdir()
    async for server in running_server(tmp_path / "s"):
        agent = await asyncio.to_thread(launch_agent, server, sockets)
        try:
            await asyncio.to_thread(agent.wait_health, "SERVING", UPSTREAM)
            held = await asyncio.to_thread(_serial, agent)
            await server.worker.stop(grace=0.1)
            await asyncio.to_thread(agent.wait_health, "NOT_SERVING", UPSTREAM)
            await asyncio.to_thread(agent.wait_for_log, r"trust bundle watch .*serving the last")
            assert await asyncio.to_thread(agent.health) == "SERVING"
            assert await asyncio.to_thread(_serial, agent) == held
        finally:
            await asyncio.to_thread(agent.stop)


def test_dev_agent_serves_py_spiffe_against_dev_serve(tmp_path: Path) -> None:
    data_dir = tmp_path / "dev"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")}
    environ["PYTHONPATH"] = str(REPO)
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshca",
            "dev",
            "serve",
            "--data-dir",
            str(data_dir),
            "--listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environ,
        cwd=REPO,
        start_new_session=True,
    )
    agent: subprocess.Popen[str] | None = None
    sockets = short_dir()
    try:
        assert serve.stdout is not None
        target = ""
        deadline = time.monotonic() + 60
        while not target and time.monotonic() < deadline:
            line = serve.stdout.readline()
            if "meshca dev CA serving on" in line:
                target = line.split()[5]
        assert target, "dev serve did not start"
        sock = sockets / "dev.sock"
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshca",
                "dev",
                "agent",
                "--data-dir",
                str(data_dir),
                "--server",
                target,
                "--socket",
                str(sock),
                "--service-account",
                "cart",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=environ,
            cwd=REPO,
        )
        assert agent.stdout is not None
        banner = [agent.stdout.readline() for _ in range(5)]
        assert any(f"export SPIFFE_ENDPOINT_SOCKET=unix://{sock}" in line for line in banner)

        # The agent logs (to the same pipe) once its socket accepts connections.
        for _ in range(50):
            if "serving on unix:" in agent.stdout.readline():
                break
        else:
            raise AssertionError("the dev agent never said it serves")

        def fetch() -> tuple[str, str, str]:
            with WorkloadApiClient(socket_path=f"unix://{sock}", default_timeout=20) as client:
                x509_id = str(client.fetch_x509_svid().spiffe_id)
                token = client.fetch_jwt_svid({"https://api.example.org"}).token
                valid = client.validate_jwt_svid(token, "https://api.example.org")
                return x509_id, str(valid.spiffe_id), token

        cart = "spiffe://cluster.local/ns/default/sa/cart"
        x509_id, jwt_id, token = fetch()
        assert (x509_id, jwt_id) == (cart, cart), "X509- and JWT-SVIDs from the dev agent"
        assert token.count(".") == 2
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(15)
            if agent.stdout is not None:
                agent.stdout.close()
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(30)
        if serve.stdout is not None:
            serve.stdout.close()
        shutil.rmtree(sockets, ignore_errors=True)
