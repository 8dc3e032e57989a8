"""A fleet of real agent loops (``service.agent.AgentRunner`` over gRPC) against a real
in-process server, for the taint test and ``bench/taint_move.py``.

Each agent renews over ``Sign`` and follows ``WatchTrustBundle`` exactly as ``meshca
agent`` does (same classes; only the Workload API socket is left out). A checker
verifies, every ``check_every`` seconds, every agent's chain against every distinct
bundle the agents hold (cryptography's X.509 path validation), counting failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from meshca.adapters.agent.upstream import GrpcUpstream, new_key_and_csr
from meshca.adapters.clock import SystemClock
from meshca.core.agent import AgentSvid
from meshca.service.agent import AgentRunner, AgentState
from tests.integration.server_harness import RunningServer

__all__ = ["Fleet", "IssuedSvid"]


@dataclass(frozen=True)
class IssuedSvid:
    """An SVID an agent received, when, and the SHA-256 of its issuer certificate."""

    agent: int
    at: float
    issuer_sha256: str


class _Recording(GrpcUpstream):
    """``GrpcUpstream`` that notes each SVID it returns (the transport, not the agent)."""

    def __init__(self, channel: object, agent: int, issued: list[IssuedSvid]) -> None:
        super().__init__(channel)  # type: ignore[arg-type]
        self._agent = agent
        self._issued = issued

    async def sign(
        self, token: str, csr_der: bytes, key_der: bytes
    ) -> tuple[AgentSvid, tuple[bytes, ...]]:
        svid, roots = await super().sign(token, csr_der, key_der)
        issuer = hashlib.sha256(svid.chain_der[1]).hexdigest() if len(svid.chain_der) > 1 else ""
        self._issued.append(IssuedSvid(self._agent, time.monotonic(), issuer))
        return svid, roots


@dataclass
class Fleet:
    server: RunningServer
    size: int
    states: list[AgentState] = field(default_factory=list)
    issued: list[IssuedSvid] = field(default_factory=list)
    verifications: int = 0
    failures: list[str] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _channels: list[object] = field(default_factory=list)

    async def start(self) -> None:
        for index in range(self.size):
            state = AgentState()
            channel = self.server.channel()
            token = self.server.minter.mint("fleet", f"proxy-{index}")
            runner = AgentRunner(
                state,
                _Recording(channel, index, self.issued),
                read_token=lambda token=token: token,  # type: ignore[misc]
                key_and_csr=new_key_and_csr,
                clock=SystemClock(),
                draw=random.random,
            )
            self.states.append(state)
            self._channels.append(channel)
            self._tasks.append(asyncio.create_task(runner.run_renewal()))
            self._tasks.append(asyncio.create_task(runner.run_bundle_watch()))

    async def wait(self, condition: Callable[[], bool], within: float) -> float:
        """Seconds until ``condition`` holds; AssertionError after ``within``."""
        started = time.monotonic()
        while not condition():
            if time.monotonic() - started > within:
                raise AssertionError(f"not within {within}s")
            await asyncio.sleep(0.02)
        return time.monotonic() - started

    def ready(self) -> bool:
        return all(s.current.svid is not None and s.current.bundle is not None for s in self.states)

    def issuers(self) -> list[str]:
        """The SHA-256 of each agent's current issuer certificate."""
        found = []
        for state in self.states:
            svid = state.current.svid
            assert svid is not None and len(svid.chain_der) > 1
            found.append(hashlib.sha256(svid.chain_der[1]).hexdigest())
        return found

    def check_once(self) -> None:
        """Verify every agent's current chain with every distinct bundle held now."""
        now = SystemClock().now()
        bundles = {s.current.bundle.roots_der for s in self.states if s.current.bundle is not None}
        chains = [s.current.svid.chain_der for s in self.states if s.current.svid is not None]
        for roots in bundles:
            store = Store([x509.load_der_x509_certificate(r) for r in roots])
            verifier = PolicyBuilder().store(store).time(now).build_client_verifier()
            for chain in chains:
                leaf = x509.load_der_x509_certificate(chain[0])
                intermediates = [x509.load_der_x509_certificate(c) for c in chain[1:]]
                self.verifications += 1
                try:
                    verifier.verify(leaf, intermediates)
                except VerificationError as error:
                    self.failures.append(f"{leaf.serial_number:x}: {error}")

    async def checking(self, every: float, until: Callable[[], Awaitable[None]]) -> None:
        """Run ``until`` while checking every ``every`` seconds (and once at the end)."""
        stop = asyncio.Event()

        async def loop() -> None:
            while not stop.is_set():
                self.check_once()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), every)

        checker = asyncio.create_task(loop())
        try:
            await until()
        finally:
            stop.set()
            await checker
            self.check_once()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for channel in self._channels:
            await channel.close()  # type: ignore[attr-defined]
