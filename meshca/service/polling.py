"""Following the database from every worker: a refresh every interval, backing off while
it fails, with the last good state kept in force meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from meshca.core.errors import MeshcaError

__all__ = ["poll_with_backoff"]


async def poll_with_backoff(
    refresh: Callable[[], object],
    stop: asyncio.Event,
    *,
    interval: float,
    max_backoff: float,
    report: Callable[[str | None], None],
    log: logging.Logger,
    what: str,
    after_round: Callable[[], None] | None = None,
) -> None:
    """Run ``refresh`` (blocking, in a thread) every ``interval`` seconds until ``stop``.

    A failed round doubles the pause, up to ``max_backoff``; ``report`` is told why (None
    once a round succeeds). ``after_round`` runs on the event loop after every round.
    """
    delay = interval
    ceiling = max(max_backoff, interval)
    while not stop.is_set():
        try:
            await asyncio.to_thread(refresh)
        except MeshcaError as error:
            delay = min(max(delay, interval) * 2, ceiling)
            report(f"{error.message}; retrying in {delay:.3g}s")
        except Exception as error:
            delay = min(max(delay, interval) * 2, ceiling)
            log.exception("%s refresh failed", what)
            report(f"unexpected {type(error).__name__}; retrying in {delay:.3g}s")
        else:
            delay = interval
            report(None)
        if after_round is not None:
            after_round()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
