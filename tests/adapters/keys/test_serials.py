"""Serial numbers: positive, 127 bits, 80 of them random, ordered by issue time."""

from __future__ import annotations

import time

from meshca.adapters.keys.file_store import new_serial

RANDOM_BITS = 80


def test_serials_are_positive_fixed_width_and_unique() -> None:
    serials = [new_serial() for _ in range(5000)]
    assert len(set(serials)) == len(serials)
    assert all(s > 0 and s.bit_length() == 127 for s in serials)
    # Fixed width: hex text sorts as the numbers do.
    assert {len(f"{s:x}") for s in serials} == {32}


def test_serials_sort_by_issue_time() -> None:
    first = new_serial()
    time.sleep(0.002)
    second = new_serial()
    assert first < second
    assert f"{first:x}" < f"{second:x}"
    now_ms = time.time_ns() // 1_000_000
    assert 0 <= now_ms - ((second >> RANDOM_BITS) & ((1 << 46) - 1)) < 5000


def test_low_80_bits_are_random() -> None:
    # Within one millisecond the low bits are all that differ, and they differ widely.
    low = [new_serial() & ((1 << RANDOM_BITS) - 1) for _ in range(2000)]
    assert len(set(low)) == len(low)
    ones = sum(bin(v).count("1") for v in low) / (len(low) * RANDOM_BITS)
    assert 0.45 < ones < 0.55
