"""fold_levels: whole perfect subtrees hashed level by level, as CompactRange would."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshca.core.merkle import CompactRange, fold_levels


def compact_roots(hashes: list[bytes], levels: int) -> list[bytes]:
    width = 1 << levels
    roots = []
    for start in range(0, len(hashes), width):
        compact = CompactRange()
        for value in hashes[start : start + width]:
            compact.append(value)
        roots.append(compact.root())
    return roots


@given(
    levels=st.integers(min_value=0, max_value=5),
    blocks=st.integers(min_value=0, max_value=6),
    seed=st.binary(min_size=32, max_size=32),
)
def test_fold_levels_equals_compact_range(levels: int, blocks: int, seed: bytes) -> None:
    hashes = [bytes((i % 256,)) + seed[1:] for i in range(blocks << levels)]
    assert fold_levels(hashes, levels) == compact_roots(hashes, levels)


def test_partial_subtrees_are_refused() -> None:
    with pytest.raises(ValueError, match="whole subtrees"):
        fold_levels([b"\0" * 32] * 17, 4)
