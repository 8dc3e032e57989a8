"""How a server spends its shutdown grace period, and what each stop signal means.

The first SIGTERM or SIGINT starts a drain: the server stops accepting calls, finishes
the ones in flight within the grace period, then cleans up. What a repeated signal does
depends on who receives it: the process an operator started (``meshca serve``'s
supervisor, ``meshca dev serve``) cuts the drain short; a worker of ``serve`` ignores
it, since its supervisor forwards every stop and a terminal's Ctrl-C reaches it too.
Times are plain seconds on a monotonic clock, passed in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["CLEANUP_SHARE", "MAX_CLEANUP", "DrainBudget", "Shutdown", "SignalAction"]

#: Share of the grace kept for stopping background tasks and closing the record writer.
CLEANUP_SHARE = 0.2
#: Seconds of cleanup at most: closing takes milliseconds unless a backend hangs.
MAX_CLEANUP = 1.0


@dataclass(frozen=True)
class DrainBudget:
    """The grace period split: calls in flight first, then cleanup.

    ``calls + cleanup == grace``; both are positive for a positive grace.
    """

    grace: float

    def __post_init__(self) -> None:
        if self.grace <= 0:
            raise ValueError(f"the shutdown grace must be positive, not {self.grace}")

    @property
    def cleanup(self) -> float:
        return min(MAX_CLEANUP, self.grace * CLEANUP_SHARE)

    @property
    def calls(self) -> float:
        return self.grace - self.cleanup


class SignalAction(enum.Enum):
    DRAIN = "drain"
    CUT_SHORT = "cut-short"
    IGNORE = "ignore"


@dataclass
class Shutdown:
    """A process's stop signals so far: whether it drains, until when, or hurries.

    ``signal(now)`` says what the latest signal means; ``remaining(now)`` is the time
    left of the grace (None before any signal, 0 once cut short or past the deadline).
    """

    grace: float
    repeat_cuts_short: bool
    started: float | None = None
    cut_short: bool = False

    def __post_init__(self) -> None:
        DrainBudget(self.grace)  # the same check, one message

    def signal(self, now: float) -> SignalAction:
        if self.started is None:
            self.started = now
            return SignalAction.DRAIN
        if self.repeat_cuts_short and not self.cut_short:
            self.cut_short = True
            return SignalAction.CUT_SHORT
        return SignalAction.IGNORE

    def remaining(self, now: float) -> float | None:
        if self.started is None:
            return None
        if self.cut_short:
            return 0.0
        return max(0.0, self.started + self.grace - now)
