"""Fakes for the core's ports, each with hooks to inject faults."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from meshca.core.audit import AuditRecord
from meshca.core.errors import AuthenticationFailed, BackendUnavailable
from meshca.core.identity import KubernetesIdentity


@dataclass
class FakeClock:
    current: datetime = field(default_factory=lambda: datetime(2026, 1, 1, tzinfo=UTC))

    def now(self) -> datetime:
        return self.current

    def advance(self, delta: timedelta) -> None:
        self.current += delta


@dataclass
class FakeAttestor:
    """Maps tokens to identities; any other token is refused."""

    identities: dict[str, KubernetesIdentity] = field(default_factory=dict)
    down: bool = False
    calls: int = 0

    async def attest(self, token: str) -> KubernetesIdentity:
        self.calls += 1
        if self.down:
            raise BackendUnavailable("token reviewer is down")
        try:
            return self.identities[token]
        except KeyError:
            raise AuthenticationFailed("token is not valid", reason="token-invalid") from None


@dataclass
class MemoryAuditLog:
    """Keeps records in a list. ``fail`` makes every append raise BackendUnavailable;
    ``problem`` is what it reports as its writer's state (``RecordWriterStatus``)."""

    records: list[AuditRecord] = field(default_factory=list)
    fail: bool = False
    problem: str | None = None
    failures: int = 0

    async def append(self, record: AuditRecord) -> None:
        await asyncio.sleep(0)
        if self.fail:
            self.failures += 1
            raise BackendUnavailable("issuance record storage is down")
        self.records.append(record)

    @property
    def write_failures(self) -> int:
        return self.failures

    @property
    def writer_problem(self) -> str | None:
        return self.problem

    async def list(
        self, *, limit: int = 50, spiffe_id: str | None = None, serial: str | None = None
    ) -> Sequence[AuditRecord]:
        found = [
            r
            for r in reversed(self.records)
            if (spiffe_id is None or r.spiffe_id == spiffe_id)
            and (serial is None or r.serial == serial)
        ]
        return found[:limit]


@dataclass
class FakeUpstream:
    """``meshca.core.agent.Upstream``: signs for ``valid_token`` with ``lifetime`` from the
    clock; ``down`` makes every call fail as an unreachable server would."""

    clock: FakeClock
    valid_token: str = "token"
    lifetime: timedelta = timedelta(seconds=60)
    roots: tuple[bytes, ...] = (b"root-1",)
    down: bool = False
    signed: int = 0
    bundles: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    #: Intermediates (DER) sent after each leaf.
    intermediates: tuple[bytes, ...] = ()

    async def sign(self, token: str, csr_der: bytes, key_der: bytes) -> tuple[object, ...]:
        from meshca.core.agent import AgentSvid

        await asyncio.sleep(0)
        if self.down:
            raise BackendUnavailable("connection refused")
        if token != self.valid_token:
            raise AuthenticationFailed("token is not valid", reason="token-invalid")
        self.signed += 1
        now = self.clock.now()
        svid = AgentSvid(
            "spiffe://td/ns/a/sa/b",
            (b"leaf-%d" % self.signed, *self.intermediates),
            key_der,
            now,
            now + self.lifetime,
            str(self.signed),
        )
        return svid, self.roots

    async def watch_bundle(self):  # type: ignore[no-untyped-def]
        """Yields what is put in ``bundles``; an exception put there is raised."""
        while True:
            item = await self.bundles.get()
            if isinstance(item, BaseException):
                raise item
            yield item
