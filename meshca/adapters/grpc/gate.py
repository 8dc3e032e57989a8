"""The door every call of ours comes through, closed when the server drains.

grpc.aio's ``server.stop(grace)`` waits only for calls already handed to the event
loop: calls that grpc has received but the loop has not picked up yet (under load, most
of them) are cancelled at once, and their clients see CANCELLED. So a drain first
closes this gate, with the server still running: the loop keeps picking calls up, each
new one is answered UNAVAILABLE at once (the client retries another replica), open
streams end with UNAVAILABLE, and the unary calls already admitted run to their end.
Only when those are done, and no call has knocked for a moment, is the server stopped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from meshca.adapters.grpc.limits import CallLimits

__all__ = ["DRAINING", "CallGate"]

T = TypeVar("T")

#: The UNAVAILABLE message of a call refused or ended by the drain.
DRAINING = "meshca is shutting down; retry another replica"
#: How often ``idle`` looks again: a drain is not a hot path.
_POLL = 0.01


class CallGate:
    """Admits calls until ``close``; counts the unary calls admitted and not yet done.

    Streams are not counted (a watch never ends by itself): ``until_closed`` ends them.
    ``limits``: the per-API caps each call meets once admitted (``limits.CallLimits``).
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, limits: CallLimits | None = None
    ) -> None:
        self._clock = clock
        self.limits = limits
        self._closed = asyncio.Event()
        self.in_flight = 0
        self._last_knock = clock()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        self._closed.set()
        self._last_knock = self._clock()

    def admit(self) -> bool:
        """Whether a unary call may run; if so, ``release`` it when it ends."""
        if self._closed.is_set():
            self._last_knock = self._clock()
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1

    def admit_stream(self) -> bool:
        if self._closed.is_set():
            self._last_knock = self._clock()
            return False
        return True

    async def idle(self, within: float, quiet: float = 0.05) -> bool:
        """Wait until no admitted call runs and none has been refused for ``quiet``
        seconds; False if that did not happen ``within`` seconds."""
        deadline = self._clock() + within
        while True:
            now = self._clock()
            if self.in_flight == 0 and now - self._last_knock >= quiet:
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(min(_POLL, deadline - now))

    async def until_closed(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """``items`` until the gate closes; then the inner iterator is closed."""
        closed = asyncio.ensure_future(self._closed.wait())
        following: asyncio.Future[T] | None = None
        try:
            while True:
                following = asyncio.ensure_future(anext(items))
                await asyncio.wait((following, closed), return_when=asyncio.FIRST_COMPLETED)
                if not following.done():
                    return
                try:
                    item = following.result()
                except StopAsyncIteration:
                    return
                yield item
        finally:
            closed.cancel()
            # The pending step must end before the iterator is closed: on a drain, and
            # when the client cancels the call while we wait (the CancelledError lands
            # here), aclose() on an iterator still running raises RuntimeError.
            if following is not None and not following.done():
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()
