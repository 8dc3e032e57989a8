"""The periodic loop: follow the journal everywhere, run rotation steps in one process.

Every process refreshes its issuer and bundle from the journal each ``interval``
seconds and publishes bundle changes to its watchers. Only the process for which
``is_leader()`` is true also runs the due rotation steps (``AuthorityService.tick``).
When a backend fails (the database, Vault) the loop keeps the current issuer, reports
itself degraded, and retries with exponential backoff up to ``max_backoff``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from meshca.core.errors import MeshcaError
from meshca.service.authority import AuthorityService, StepReport
from meshca.service.bundle import TrustBundleService

__all__ = ["Rotator"]

log = logging.getLogger(__name__)


class Rotator:
    def __init__(
        self,
        *,
        authorities: AuthorityService,
        bundle: TrustBundleService,
        is_leader: Callable[[], bool],
        interval: float,
        max_backoff: float = 60.0,
        on_health: Callable[[str | None], None] = lambda _problem: None,
    ) -> None:
        self._authorities = authorities
        self._bundle = bundle
        self._is_leader = is_leader
        self._interval = interval
        self._max_backoff = max(max_backoff, interval)
        self._on_health = on_health
        #: Why the last round failed, or None when it succeeded.
        self.degraded: str | None = None

    async def run_once(self) -> list[StepReport]:
        """One round: steps if leading, then follow the journal and publish the bundle."""
        reports: list[StepReport] = []
        # The leader check may be a database round trip: never on the event loop.
        if await asyncio.to_thread(self._is_leader):
            reports = await asyncio.to_thread(self._authorities.tick)
        view = await asyncio.to_thread(self._authorities.refresh)
        self._bundle.publish(view.bundle, view.bundle_sequence, view.jwt_keys, view.tainted)
        return reports

    async def run(self, stop: asyncio.Event) -> None:
        delay = self._interval
        while not stop.is_set():
            try:
                await self.run_once()
            except MeshcaError as error:
                delay = min(delay * 2, self._max_backoff)
                self._set_degraded(f"{error.message}; retrying in {delay:.3g}s")
            except Exception as error:
                delay = min(delay * 2, self._max_backoff)
                log.exception("CA rotation round failed")
                self._set_degraded(f"unexpected {type(error).__name__}; retrying in {delay:.3g}s")
            else:
                delay = self._interval
                self._set_degraded(None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    def _set_degraded(self, problem: str | None) -> None:
        if problem != self.degraded:
            if problem is None:
                log.info("CA rotation recovered")
            else:
                log.warning("CA degraded: %s (issuing under the current intermediate)", problem)
            self.degraded = problem
            self._authorities.health.degraded = problem
            self._on_health(problem)
