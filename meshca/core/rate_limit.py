"""How many certificates one caller may get per period: a rate and a keyed limiter.

The limiter is GCRA (the generic cell rate algorithm), which is a token bucket of
``count`` tokens refilled at ``count`` per ``period``, kept as one number per key: the
time at which that key's bucket is full again. A key may take ``count`` at once and then
one every ``period / count``.

A refused request takes nothing and changes nothing: a caller that keeps asking while
refused waits exactly as long as one that stops, and gets the rate back by itself
within ``period`` of its last admitted request. Hammering never extends the wait.

Pure: the caller passes ``now``; nothing here reads a clock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

__all__ = ["DEFAULT_MAX_KEYS", "Gcra", "IssuanceRate", "RateLimiter"]

#: Keys remembered at once. A key is one pod (or one pod-less token) that got a
#: certificate within the last period: 100,000 is more pods than one CA replica serves,
#: at ~150 bytes each (~15 MiB). Past it, the least recently admitted key is forgotten,
#: which forgives it its count (see ``RateLimiter``).
DEFAULT_MAX_KEYS = 100_000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


@dataclass(frozen=True, slots=True)
class IssuanceRate:
    """``count`` issuances per ``period`` for one caller; ``str()`` is e.g. ``30/1m``."""

    count: int
    period: timedelta

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("the count must be at least 1")
        if self.period <= timedelta(0):
            raise ValueError("the period must be positive")

    def __str__(self) -> str:
        micros = self.period // timedelta(microseconds=1)
        for unit, size in _UNITS:
            if micros >= size * 1_000_000 and micros % (size * 1_000_000) == 0:
                return f"{self.count}/{micros // (size * 1_000_000)}{unit}"
        if micros % 1000 == 0:
            return f"{self.count}/{micros // 1000}ms"
        return f"{self.count}/{micros / 1_000_000:.6f}s"


@dataclass(frozen=True, slots=True)
class Gcra:
    """The arithmetic of ``rate`` over one key's state, for whichever store holds it.

    Times are whole microseconds times ``count``: then the interval (period / count)
    is a whole number and no rounding can admit one more or one fewer. A key's state
    is the (scaled) time at which its bucket is full again; None or a time already
    past means full.
    """

    rate: IssuanceRate

    @property
    def interval(self) -> int:
        return self.rate.period // _MICROSECOND

    def at(self, now: datetime) -> int:
        """``now`` (timezone-aware) on this scale."""
        return (now - _EPOCH) // _MICROSECOND * self.rate.count

    def take(self, full_at: int | None, at: int) -> tuple[int, timedelta | None]:
        """Take one at ``at``: (the new state, None), or (the state unchanged, the wait)."""
        interval = self.interval
        start = at if full_at is None or full_at < at else full_at
        # How far ahead of now the state may be and still admit one more: count - 1
        # intervals, so that a full bucket holds ``count``.
        over = start - at - interval * (self.rate.count - 1)
        if over > 0:
            return start, _MICROSECOND * -(-over // self.rate.count)
        return start + interval, None


class RateLimiter:
    """Admits up to ``rate`` per key, in this process; remembers at most ``max_keys``.

    A key is forgotten once its bucket is full again (it then carries no information),
    so memory follows the callers active within the last period. If more than
    ``max_keys`` keys are active at once, the least recently admitted is forgotten
    early, and starts again with a full bucket: a caller can gain from that only by
    holding ``max_keys`` other attested identities, which is a cluster compromise, not a
    leaked token.
    """

    __slots__ = ("_full_at", "_gcra", "_max_keys", "rate")

    def __init__(self, rate: IssuanceRate, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.rate = rate
        self._gcra = Gcra(rate)
        self._max_keys = max_keys
        # key -> when its bucket is full again (scaled); least recently admitted first.
        self._full_at: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._full_at)

    def admit(self, key: str, now: datetime) -> timedelta | None:
        """Take one for ``key`` at ``now`` (timezone-aware): None if admitted, else how
        long until one is free. A refusal leaves the key's state as it was."""
        at = self._gcra.at(now)
        full_at, wait = self._gcra.take(self._full_at.get(key), at)
        if wait is not None:
            return wait
        self._full_at[key] = full_at
        self._full_at.move_to_end(key)
        self._forget(at)
        return None

    def _forget(self, at: int) -> None:
        entries = self._full_at
        # Full buckets at the front go; the first one still counting stops the sweep
        # (amortized: each key is swept once per admission).
        while entries:
            key, full_at = next(iter(entries.items()))
            if full_at > at and len(entries) <= self._max_keys:
                return
            del entries[key]
