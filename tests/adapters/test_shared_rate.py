"""The host-wide ``--issuance-rate`` table: the same decisions as the in-process limiter,
one count across processes, bounded, and refusing a file that is not its own."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshca.adapters.shared_rate import PROBES, SharedRateLimiter, create_rate_table
from meshca.core.rate_limit import IssuanceRate, RateLimiter

T0 = datetime(2026, 1, 1, tzinfo=UTC)
RATE = IssuanceRate(5, timedelta(minutes=1))


@pytest.fixture
def table(tmp_path: Path) -> Iterator[SharedRateLimiter]:
    limiter = SharedRateLimiter(create_rate_table(tmp_path, RATE, slots=1024), RATE)
    yield limiter
    limiter.close()


def test_burst_wait_and_recovery(table: SharedRateLimiter) -> None:
    assert [table.admit("pod:a", T0) for _ in range(6)][:5] == [None] * 5
    assert table.admit("pod:a", T0) == timedelta(seconds=12)
    assert table.admit("pod:b", T0) is None  # another pod, its own count
    for second in range(12):  # refused all along: the wait does not grow
        assert table.admit("pod:a", T0 + timedelta(seconds=second)) is not None
    assert table.admit("pod:a", T0 + timedelta(seconds=12)) is None
    later = T0 + timedelta(minutes=2)
    assert [table.admit("pod:a", later) for _ in range(6)].count(None) == 5


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    count=st.integers(1, 20),
    period_s=st.integers(1, 600),
    steps=st.lists(st.tuples(st.integers(0, 1_200_000), st.sampled_from("abc")), max_size=80),
)
def test_decides_as_the_in_process_limiter(
    tmp_path: Path, count: int, period_s: int, steps: list[tuple[int, str]]
) -> None:
    rate = IssuanceRate(count, timedelta(seconds=period_s))
    shared = SharedRateLimiter(create_rate_table(tmp_path, rate, slots=64), rate)
    local = RateLimiter(rate)
    try:
        for ms, key in sorted(steps):
            now = T0 + timedelta(milliseconds=ms)
            assert shared.admit(key, now) == local.admit(key, now)
    finally:
        shared.close()


def _hammer(path: Path, key: str, times: int, results: Any) -> None:
    limiter = SharedRateLimiter(path, RATE)
    results.put(sum(limiter.admit(key, T0) is None for _ in range(times)))
    limiter.close()


def test_processes_share_one_count(tmp_path: Path) -> None:
    path = create_rate_table(tmp_path, RATE)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [
        context.Process(target=_hammer, args=(path, "pod:leaked", 300, results)) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    admitted = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    assert sum(admitted) == RATE.count


def test_a_full_table_forgives_the_key_closest_to_full(tmp_path: Path) -> None:
    """With every slot counting, a new key takes the slot of the one that was
    admitted least recently, which starts over: memory stays fixed."""
    rate = IssuanceRate(1, timedelta(minutes=1))
    limiter = SharedRateLimiter(create_rate_table(tmp_path, rate, slots=PROBES), rate)
    try:
        for i in range(PROBES):
            assert limiter.admit(f"pod:{i}", T0 + timedelta(seconds=i)) is None
        assert limiter.admit("pod:new", T0 + timedelta(seconds=30)) is None
        # pod:0 was closest to full: it lost its slot and is admitted again...
        assert limiter.admit("pod:0", T0 + timedelta(seconds=31)) is None
        # ...while the most recent keep theirs.
        assert limiter.admit(f"pod:{PROBES - 1}", T0 + timedelta(seconds=32)) is not None
        [table] = tmp_path.glob("issuance-rate-*.table")
        assert table.stat().st_size == 32 + PROBES * 24
    finally:
        limiter.close()


def test_refuses_a_file_that_is_not_its_table(tmp_path: Path) -> None:
    path = create_rate_table(tmp_path, RATE, slots=64)
    with pytest.raises(ValueError, match="not a rate table for 10/1m"):
        SharedRateLimiter(path, IssuanceRate(10, timedelta(minutes=1)))
    path.write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="not a rate table"):
        SharedRateLimiter(path, RATE)
    with pytest.raises(ValueError):
        create_rate_table(tmp_path, RATE, slots=PROBES - 1)


def test_odd_keys_are_hashed_not_refused(table: SharedRateLimiter) -> None:
    for key in ("", "\ud800", "x" * 100_000, "pod:\x00"):
        assert table.admit(key, T0) is None


def test_a_new_table_replaces_this_process_s_and_removes_dead_ones(tmp_path: Path) -> None:
    dead = tmp_path / "issuance-rate-999999999.table"
    dead.write_bytes(b"left by a killed supervisor")
    alive = tmp_path / "issuance-rate-1.table"  # pid 1 always runs
    alive.write_bytes(b"another server's")
    first = create_rate_table(tmp_path, RATE, slots=64)
    old = SharedRateLimiter(first, RATE)
    try:
        for _ in range(RATE.count):
            assert old.admit("pod:a", T0) is None
        second = create_rate_table(tmp_path, RATE, slots=64)
        assert second == first and not dead.exists() and alive.exists()
        # The old mapping keeps its own (renamed-over) file: it neither breaks nor resets.
        assert old.admit("pod:a", T0) is not None
        fresh = SharedRateLimiter(second, RATE)
        assert fresh.admit("pod:a", T0) is None
        fresh.close()
    finally:
        old.close()
