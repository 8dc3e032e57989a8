"""The running agent: its Unix-socket server (Workload API, SDS, health, reflection),
its renewal and bundle loops, the health it reports and the ``--out-dir`` writer.

Health on the socket (``grpc.health.v1``): the overall service ``""`` and
``SpiffeWorkloadAPI`` are SERVING while the agent holds an unexpired SVID and a bundle;
``meshca.agent.Upstream`` is SERVING while the last renewal and the bundle watch worked,
NOT_SERVING while the agent lives on its last good SVID (the log says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
from envoy.service.secret.v3 import sds_pb2, sds_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from spiffe._proto import workload_pb2

from meshca.adapters.agent.out_dir import write_snapshot
from meshca.adapters.agent.sds import SdsServicer
from meshca.adapters.agent.socket_path import claim_socket_path
from meshca.adapters.agent.workload_api import SERVICE_NAME, add_workload_api
from meshca.core.agent import RenewalPolicy, svid_usable
from meshca.service.agent import AgentRunner, AgentSnapshot, AgentState
from meshca.service.agent_jwt import AgentJwt

__all__ = ["UPSTREAM_HEALTH", "AgentConfig", "RunningAgent", "serve_agent", "upstream_channel"]

log = logging.getLogger("meshca.agent")

UPSTREAM_HEALTH = "meshca.agent.Upstream"
SDS_SERVICE = sds_pb2.DESCRIPTOR.services_by_name["SecretDiscoveryService"].full_name


@dataclass(frozen=True)
class AgentConfig:
    """Everything ``meshca agent`` is told on its command line."""

    server: str
    token_file: Path
    socket: Path
    ca_file: Path | None = None
    plaintext: bool = False
    server_name: str | None = None
    out_dir: Path | None = None
    socket_mode: int = 0o600
    policy: RenewalPolicy = field(default_factory=RenewalPolicy)


class RunningAgent:
    """Started by ``start_agent``; ``stop()`` ends the loops and the server."""

    def __init__(
        self,
        config: AgentConfig,
        server: grpc.aio.Server,
        channel: grpc.aio.Channel,
        state: AgentState,
        tasks: list[asyncio.Task[None]],
    ) -> None:
        self.config = config
        self.state = state
        self._server = server
        self._channel = channel
        self._tasks = tasks

    async def wait(self) -> None:
        """Until a loop ends (they only end by failing: logged here) or ``stop()``."""
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("agent loop %s failed", task.get_name(), exc_info=task.exception())

    async def stop(self) -> None:
        """End the loops and the server, close the channel and remove the socket file."""
        try:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:
                    log.exception("agent loop %s had failed", task.get_name())
            await self._server.stop(grace=1)
            await self._channel.close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.config.socket.unlink()


def _status(ok: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return (
        health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
    )


async def _follow_health(state: AgentState, servicer: health.aio.HealthServicer) -> None:
    tick = -1
    said: tuple[bool, str | None] | None = None
    while True:
        snapshot = state.current
        now = datetime.now(UTC)
        serving = snapshot.bundle is not None and svid_usable(snapshot.svid, now)
        for name in ("", SERVICE_NAME):
            await servicer.set(name, _status(serving))
        await servicer.set(UPSTREAM_HEALTH, _status(snapshot.upstream_problem is None))
        if said is not None and (serving, snapshot.upstream_problem) != said:
            if snapshot.upstream_problem is None:
                log.info("health: serving, server reachable")
            else:
                log.warning(
                    "health: %s; upstream NOT_SERVING (%s)",
                    "serving the last good SVID" if serving else "NOT_SERVING, no usable SVID",
                    snapshot.upstream_problem,
                )
        said = (serving, snapshot.upstream_problem)
        # Wake on any change, and when the SVID held would expire.
        timeout = None
        if snapshot.svid is not None and snapshot.svid.not_after > now:
            timeout = (snapshot.svid.not_after - now).total_seconds() + 0.01
        with contextlib.suppress(TimeoutError):
            tick = await asyncio.wait_for(state.wait_tick(tick), timeout)


async def _write_out_dir(state: AgentState, out_dir: Path) -> None:
    version = 0
    while True:
        snapshot: AgentSnapshot = await state.wait_newer(version)
        version = snapshot.version
        try:
            written = await asyncio.to_thread(write_snapshot, out_dir, snapshot)
        except OSError as exc:
            log.error("cannot write --out-dir %s: %s", out_dir, exc)
            continue
        log.info("wrote %s in %s", ", ".join(written), out_dir)


def upstream_channel(config: AgentConfig) -> grpc.aio.Channel:
    """The channel to the CA server: TLS verified against ``--ca-file`` (or, without
    one, the system's roots), or plaintext. Raises ``OSError`` for an unreadable CA file."""
    if config.plaintext:
        return grpc.aio.insecure_channel(config.server)
    roots_pem = config.ca_file.read_bytes() if config.ca_file else None
    name = [("grpc.ssl_target_name_override", config.server_name)] if config.server_name else []
    return grpc.aio.secure_channel(config.server, grpc.ssl_channel_credentials(roots_pem), name)


async def serve_agent(
    config: AgentConfig,
    state: AgentState,
    runner: AgentRunner,
    channel: grpc.aio.Channel,
    jwt: AgentJwt,
) -> RunningAgent:
    """Claim the socket, serve on it and start ``runner``'s loops, health and --out-dir.

    Raises ``SocketPathError`` when the socket path is taken. An unreachable server is
    not an error: the socket is served at once (health NOT_SERVING, streams waiting)
    while the runner retries with backoff.
    """
    claim_socket_path(config.socket)
    server = grpc.aio.server()
    add_workload_api(server, state, jwt)
    sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(SdsServicer(state), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            workload_pb2.DESCRIPTOR.services_by_name[SERVICE_NAME].full_name,
            SDS_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    # The socket file is created by bind(): a umask makes it private from the start,
    # and the chmod sets the mode asked for.
    old_umask = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix:{config.socket}")
        await server.start()
    finally:
        os.umask(old_umask)
    os.chmod(config.socket, config.socket_mode)
    log.info(
        "meshca agent serving on unix:%s (mode %04o): SPIFFE Workload API, Envoy SDS; CA server %s",
        config.socket,
        config.socket_mode,
        config.server,
    )
    tasks = [
        asyncio.create_task(runner.run_renewal(), name="agent-renewal"),
        asyncio.create_task(runner.run_bundle_watch(), name="agent-bundle"),
        asyncio.create_task(_follow_health(state, health_servicer), name="agent-health"),
    ]
    if config.out_dir is not None:
        tasks.append(asyncio.create_task(_write_out_dir(state, config.out_dir), name="agent-out"))
    return RunningAgent(config, server, channel, state, tasks)
