"""The keyed GCRA limiter: N at once, then one per period/N; refusals change nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshca.core.rate_limit import IssuanceRate, RateLimiter

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PER_MINUTE = IssuanceRate(3, timedelta(minutes=1))


def _admitted(limiter: RateLimiter, key: str, at: datetime, times: int) -> int:
    return sum(limiter.admit(key, at) is None for _ in range(times))


def test_burst_of_count_then_refused_with_the_wait() -> None:
    limiter = RateLimiter(PER_MINUTE)
    assert _admitted(limiter, "pod:a", T0, 3) == 3
    wait = limiter.admit("pod:a", T0)
    assert wait == timedelta(seconds=20)  # one comes back every period / count
    assert limiter.admit("pod:a", T0 + timedelta(seconds=19.999999)) is not None
    assert limiter.admit("pod:a", T0 + timedelta(seconds=20)) is None


def test_keys_are_independent() -> None:
    limiter = RateLimiter(PER_MINUTE)
    assert _admitted(limiter, "pod:a", T0, 10) == 3
    assert _admitted(limiter, "pod:b", T0, 10) == 3


def test_refusals_do_not_extend_the_wait() -> None:
    limiter = RateLimiter(PER_MINUTE)
    assert _admitted(limiter, "pod:a", T0, 3) == 3
    # Hammering for 19 s: all refused, and the 20th second still brings one back.
    for second in range(20):
        assert limiter.admit("pod:a", T0 + timedelta(seconds=second)) is not None
    assert limiter.admit("pod:a", T0 + timedelta(seconds=20)) is None
    assert limiter.admit("pod:a", T0 + timedelta(seconds=20)) is not None


def test_full_budget_back_after_one_period() -> None:
    limiter = RateLimiter(PER_MINUTE)
    assert _admitted(limiter, "pod:a", T0, 50) == 3
    assert _admitted(limiter, "pod:a", T0 + timedelta(minutes=1), 50) == 3


def test_idle_keys_are_forgotten() -> None:
    limiter = RateLimiter(PER_MINUTE)
    for i in range(100):
        limiter.admit(f"pod:{i}", T0)
    assert len(limiter) == 100
    limiter.admit("pod:late", T0 + timedelta(minutes=2))
    assert len(limiter) == 1


def test_memory_is_capped_and_the_oldest_key_goes_first() -> None:
    limiter = RateLimiter(PER_MINUTE, max_keys=10)
    assert _admitted(limiter, "pod:first", T0, 3) == 3
    for i in range(20):
        limiter.admit(f"pod:{i}", T0)
        assert len(limiter) <= 10
    # Forgotten early: the oldest key starts again with a full bucket.
    assert _admitted(limiter, "pod:first", T0, 5) == 3


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        IssuanceRate(0, timedelta(minutes=1))
    with pytest.raises(ValueError):
        IssuanceRate(1, timedelta(0))
    with pytest.raises(ValueError):
        RateLimiter(PER_MINUTE, max_keys=0)


@settings(max_examples=300, deadline=None)
@given(
    count=st.integers(1, 50),
    period_s=st.integers(1, 3600),
    steps=st.lists(st.tuples(st.integers(0, 7200_000), st.sampled_from("abc")), max_size=200),
    windows=st.integers(1, 4),
)
def test_never_more_than_the_burst_plus_the_refill(
    count: int, period_s: int, steps: list[tuple[int, str]], windows: int
) -> None:
    """Within any ``windows`` periods a key gets at most ``count`` (the burst) plus
    what refilled meanwhile, ``windows * count - 1``: one period holds at most 2N-1."""
    limiter = RateLimiter(IssuanceRate(count, timedelta(seconds=period_s)), max_keys=8)
    admitted: dict[str, list[int]] = {}
    for ms, key in sorted(steps):
        if limiter.admit(key, T0 + timedelta(milliseconds=ms)) is None:
            admitted.setdefault(key, []).append(ms)
    for times in admitted.values():
        for i, start in enumerate(times):
            within = [t for t in times[i:] if t - start < windows * period_s * 1000]
            assert len(within) <= count + windows * count - 1


@given(count=st.integers(1, 100), period_s=st.integers(1, 86400))
def test_a_steady_caller_gets_exactly_the_rate(count: int, period_s: int) -> None:
    limiter = RateLimiter(IssuanceRate(count, timedelta(seconds=period_s)))
    # period / count, rounded up to the clock's microsecond.
    interval = timedelta(microseconds=-(-period_s * 1_000_000 // count))
    # After the burst, one every interval is admitted and asking in between is refused.
    assert _admitted(limiter, "k", T0, count + 1) == count
    later = T0 + interval
    assert limiter.admit("k", later - timedelta(microseconds=1)) is not None
    assert limiter.admit("k", later) is None
    assert limiter.admit("k", later) is not None
