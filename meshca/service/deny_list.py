"""Following the deny-list: every serving process reloads it within one poll of a change.

Each round costs one small read (the list's revision); the entries are reloaded only when
it changed. While storage is down the last list read stays in force, and the follower
reports itself degraded and retries with backoff.
"""

from __future__ import annotations

import asyncio
import logging

from meshca.core.denylist import DenyList
from meshca.core.ports import DenyListSource
from meshca.service.polling import poll_with_backoff

__all__ = ["DenyListFollower"]

log = logging.getLogger(__name__)


class DenyListFollower:
    """Holds the current ``DenyList``; ``current`` is what the signing use case calls."""

    def __init__(self, source: DenyListSource, *, max_backoff: float = 60.0) -> None:
        self._source = source
        self._list = DenyList()
        self._max_backoff = max_backoff
        #: Why the last round failed, or None when it succeeded.
        self.degraded: str | None = None

    def current(self) -> DenyList:
        return self._list

    def refresh(self) -> bool:
        """Reload if the revision changed (blocking); True when a new list was taken."""
        if self._source.revision() == self._list.revision:
            return False
        loaded = self._source.load()
        if loaded.revision != self._list.revision:
            log.info(
                "deny-list revision %d: %d entr%s",
                loaded.revision,
                len(loaded.entries),
                "y" if len(loaded.entries) == 1 else "ies",
            )
        self._list = loaded
        return True

    async def run(self, stop: asyncio.Event, interval: float) -> None:
        """Refresh every ``interval`` seconds until ``stop``; back off while storage fails."""
        await poll_with_backoff(
            self.refresh,
            stop,
            interval=interval,
            max_backoff=self._max_backoff,
            report=self._set_degraded,
            log=log,
            what="deny-list",
        )

    def _set_degraded(self, problem: str | None) -> None:
        if problem == self.degraded:
            return
        if problem is None:
            log.info("deny-list refresh recovered")
        else:
            log.warning("deny-list not refreshed: %s (the last list read stays in force)", problem)
        self.degraded = problem
