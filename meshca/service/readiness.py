"""The readiness loop: probe signing and recording every few seconds, report each change.

Each round signs a short random message with the current issuer's key, runs one
database round trip, and reads the record writer's state; ``core.readiness.assess``
turns that into ready or not. A probe that does not answer within ``timeout`` counts
as failed, and is not started again until it has finished, so a hung backend costs
one thread, not one per round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from meshca.core.authority import Authority
from meshca.core.errors import MeshcaError
from meshca.core.ports import RecordWriterStatus
from meshca.core.readiness import ProbeResults, Readiness, assess, probe_signature

__all__ = ["ReadinessChecker"]

log = logging.getLogger(__name__)

#: Bytes signed by each probe: random, so a signature is never a replay of a cached one.
PROBE_MESSAGE_BYTES = 32


class ReadinessChecker:
    """Whether this replica can sign and record right now; ``on_change`` hears each change.

    ``authority`` raises ``AuthorityNotReady`` when there is no issuer. ``offload`` runs
    the signature where it may block (a remote key); None signs in the loop, as a local
    key takes microseconds. ``ping_database`` is blocking and runs in a thread.
    ``status`` starts not ready ("not checked yet") until the first round.
    """

    def __init__(
        self,
        *,
        authority: Callable[[], Authority],
        ping_database: Callable[[], None],
        writer: RecordWriterStatus,
        on_change: Callable[[Readiness], Awaitable[None]],
        interval: float,
        timeout: float = 5.0,
        offload: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._authority = authority
        self._ping_database = ping_database
        self._writer = writer
        self._on_change = on_change
        self._interval = interval
        self._timeout = timeout
        self._offload = offload
        self._random_bytes = random_bytes
        self._running: dict[str, asyncio.Future[Any]] = {}
        self.status = Readiness("not checked yet", writer.write_failures)

    async def check(self) -> Readiness:
        """One round; reports (and logs) the result if it differs from the last one."""
        signing, database = await asyncio.gather(
            self._probe("signing", self._sign), self._probe("database", self._database)
        )
        results = ProbeResults(
            signing=signing,
            database=database,
            writer=self._writer.writer_problem,
            write_failures=self._writer.write_failures,
        )
        previous, self.status = self.status, assess(self.status, results)
        if self.status.problem != previous.problem:
            if self.status.ready:
                log.info("ready: this replica can sign and record certificates")
            else:
                log.warning("not ready: %s", self.status.problem)
            await self._on_change(self.status)
        return self.status

    async def run(self, stop: asyncio.Event) -> None:
        """A round every ``interval`` seconds until ``stop``, then report "stopping".

        The first round comes after one interval: ``check`` once before, to know the
        status at start.
        """
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)
            if stop.is_set():
                break
            try:
                await self.check()
            except Exception:
                log.exception("readiness check failed unexpectedly")
        # Draining: new requests should go to other replicas. After the last round, so
        # that no round reports SERVING again.
        self.status = Readiness("stopping", self.status.write_failures)
        await self._on_change(self.status)

    async def _sign(self) -> None:
        authority = self._authority()
        message = self._random_bytes(PROBE_MESSAGE_BYTES)
        if self._offload is None:
            probe_signature(authority, message)
        else:
            await self._offload(lambda: probe_signature(authority, message))

    async def _database(self) -> None:
        await asyncio.to_thread(self._ping_database)

    async def _probe(self, name: str, start: Callable[[], Awaitable[None]]) -> str | None:
        """None if ``start``'s work succeeded within the timeout, else why it did not."""
        running = self._running.get(name)
        try:
            if running is None or running.done():
                running = self._running[name] = asyncio.ensure_future(start())
                # Read its outcome even if no round is left to await it.
                running.add_done_callback(lambda done: done.cancelled() or done.exception())
            await asyncio.wait_for(asyncio.shield(running), self._timeout)
        except TimeoutError:
            return f"no answer within {self._timeout:g}s"
        except MeshcaError as error:
            return error.message
        except Exception as error:
            return f"{type(error).__name__}: {error}"
        return None
