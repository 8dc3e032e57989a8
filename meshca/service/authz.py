"""The authorization service: holds the current policy set, swaps it atomically, decides.

``reload`` compiles whatever the source holds now. Only a set that is valid as a whole
replaces the current one, in one assignment, so a check sees either the old set or the
new one, never a mixture. An invalid set changes nothing that is served: the failure is
kept in ``status`` (and logged, and reported through ``on_status``) until a later valid
set clears it. Before the first valid set, every request is denied.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

from meshca.core.errors import InvalidPolicy
from meshca.core.policy import (
    AuthzRequest,
    Decision,
    DecisionRecord,
    Explanation,
    PolicySet,
    evaluate,
    explain,
    headers_for_record,
)
from meshca.core.ports import Clock

__all__ = [
    "AuthorizationService",
    "DecisionLog",
    "PolicySource",
    "PolicyStatus",
]

log = logging.getLogger(__name__)


class PolicySource(Protocol):
    """Where policy sets come from (a directory of files)."""

    def version(self) -> str:
        """A hash of what the source holds now; changes whenever its content does."""
        ...

    def load(self) -> PolicySet:
        """Compile what the source holds now; raises ``InvalidPolicy`` naming every problem."""
        ...


class DecisionLog(Protocol):
    """Where decisions are recorded."""

    def record(self, record: DecisionRecord) -> None:
        """Queue ``record`` without waiting; never raises (failures are counted, logged)."""
        ...


@dataclass(frozen=True, slots=True)
class PolicyStatus:
    """What is being served and how the last attempt to load went; counters since start."""

    version: str | None = None
    policies: int = 0
    loaded_at: datetime | None = None
    last_attempt_at: datetime | None = None
    #: The problems of the newest content, if it is invalid (the old set keeps serving).
    last_error: str | None = None
    failed_version: str | None = None
    reloads: int = 0
    reload_failures: int = 0
    allowed: int = 0
    denied: int = 0

    @property
    def healthy(self) -> bool:
        """A set is loaded and it is the newest content."""
        return self.version is not None and self.last_error is None


class AuthorizationService:
    """Decides requests with the current policy set and records the decisions.

    ``sample_rate`` (0..1) is the share of allowed decisions recorded; denied ones and
    those an AUDIT policy matched are always recorded. ``random`` returns a float in
    [0, 1) and is only called for allowed decisions.
    """

    def __init__(
        self,
        *,
        source: PolicySource | None,
        clock: Clock,
        default_allow: bool = False,
        decision_log: DecisionLog | None = None,
        sample_rate: float = 1.0,
        random: Callable[[], float] = lambda: 0.0,
        on_status: Callable[[PolicyStatus], Awaitable[None]] | None = None,
        on_decision: Callable[[Decision], None] | None = None,
    ) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be within 0..1, not {sample_rate}")
        self._source = source
        self._clock = clock
        self._default_allow = default_allow
        self._log = decision_log
        self._sample_rate = sample_rate
        self._random = random
        self._on_status = on_status
        self._on_decision = on_decision
        self._set: PolicySet | None = None
        self._status = PolicyStatus()
        self._allowed = 0
        self._denied = 0
        self._reload_lock = asyncio.Lock()

    @property
    def policy_set(self) -> PolicySet | None:
        return self._set

    @property
    def default_allow(self) -> bool:
        return self._default_allow

    def status(self) -> PolicyStatus:
        return replace(self._status, allowed=self._allowed, denied=self._denied)

    def install(self, policy_set: PolicySet) -> None:
        """Serve ``policy_set`` from now on (tests and tools; the server uses ``reload``)."""
        self._set = policy_set
        now = self._clock.now()
        self._status = replace(
            self._status,
            version=policy_set.version,
            policies=len(policy_set),
            loaded_at=now,
            last_attempt_at=now,
            last_error=None,
            failed_version=None,
        )

    async def reload(self) -> bool:
        """Load the source's content if it changed; True if a new set is now served.

        Never raises for invalid policies: they are reported in ``status``. Content that
        already failed is not compiled again until it changes.
        """
        if self._source is None:
            return False
        source = self._source
        async with self._reload_lock:
            try:
                version = await asyncio.to_thread(source.version)
            except OSError as exc:
                await self._failed(None, f"cannot read the policies: {exc}")
                return False
            current = self._set.version if self._set is not None else None
            if version in (current, self._status.failed_version):
                return False
            try:
                policy_set = await asyncio.to_thread(source.load)
            except InvalidPolicy as exc:
                text = "\n".join(str(p) for p in exc.problems)
                await self._failed(version, text)
                return False
            except OSError as exc:
                await self._failed(version, f"cannot read the policies: {exc}")
                return False
            previous = self._set
            self.install(policy_set)
            self._status = replace(self._status, reloads=self._status.reloads + 1)
            log.info(
                "policy set %s loaded: %d policies (was %s)",
                policy_set.version,
                len(policy_set),
                previous.version if previous is not None else "none",
            )
            await self._notify()
            return True

    async def _failed(self, version: str | None, text: str) -> None:
        serving = self._set.version if self._set is not None else "nothing (every request denied)"
        log.error("policy files rejected; still serving %s. Problems:\n%s", serving, text)
        self._status = replace(
            self._status,
            last_attempt_at=self._clock.now(),
            last_error=text,
            failed_version=version,
            reload_failures=self._status.reload_failures + 1,
        )
        await self._notify()

    async def _notify(self) -> None:
        if self._on_status is not None:
            await self._on_status(self.status())

    async def run(self, stop: asyncio.Event, interval: float) -> None:
        """Reload every ``interval`` seconds until ``stop`` is set."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass
            if stop.is_set():
                return
            try:
                await self.reload()
            except Exception:
                # A bug in loading must not stop the loop: the old set keeps serving.
                log.exception("policy reload failed unexpectedly")

    def check(self, request: AuthzRequest, *, api: str) -> Decision:
        """Decide ``request`` and record the decision as configured."""
        decision = evaluate(self._set, request, default_allow=self._default_allow)
        if decision.allowed:
            self._allowed += 1
        else:
            self._denied += 1
        if self._on_decision is not None:
            self._on_decision(decision)
        if self._log is not None and (
            not decision.allowed
            or decision.audit
            or self._sample_rate >= 1.0
            or (self._sample_rate > 0.0 and self._random() < self._sample_rate)
        ):
            self._log.record(self._record(request, decision, api))
        return decision

    def explain(self, request: AuthzRequest) -> Explanation:
        """How the current set decides ``request``; nothing is recorded."""
        return explain(self._set, request, default_allow=self._default_allow)

    def _record(self, request: AuthzRequest, decision: Decision, api: str) -> DecisionRecord:
        return DecisionRecord(
            time=self._clock.now(),
            api=api,
            allowed=decision.allowed,
            reason=decision.reason.value,
            version=decision.version,
            policy=decision.policy.key if decision.policy is not None else None,
            rule=decision.rule,
            source_principal=request.source_principal,
            destination_principal=request.destination_principal,
            method=request.method,
            path=request.path,
            host=request.host,
            headers=headers_for_record(request.headers, self._set),
            source_ip=request.source_ip,
            destination_ip=request.destination_ip,
            destination_port=request.destination_port,
            sni=request.sni,
            request_id=request.request_id,
            audit=tuple(p.key for p in decision.audit),
            detail=decision.detail,
        )
