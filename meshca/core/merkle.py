"""RFC 9162 Merkle tree hashing, proofs and their verification. Pure: no I/O.

The tree over leaves ``d[0..n)`` is RFC 9162's (section 2.1.1, unchanged from RFC 6962):

    MTH({})      = SHA-256()
    MTH({d0})    = SHA-256(0x00 || d0)                         the leaf hash
    MTH(D[n])    = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))  k: largest power of 2 < n

Every node of that tree is the hash of a range ``[start, end)`` of leaves, and every
range that appears in a proof is a run of complete, aligned subtrees (``Subtree``) folded
from the right. Proof *shapes* (which ranges) are computed here without any hashes, so a
store can fetch exactly the subtree hashes it needs; ``inclusion_proof`` and
``consistency_proof`` build whole proofs from a list of leaf hashes (small trees, tests).

Verification follows RFC 9162 sections 2.1.3.2 and 2.1.4.2 literally and returns a
bool: a proof that does not verify is a value, not an error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CompactRange",
    "Subtree",
    "consistency_proof",
    "consistency_ranges",
    "fold_levels",
    "inclusion_proof",
    "inclusion_ranges",
    "leaf_hash",
    "node_hash",
    "range_hash",
    "root_from_leaves",
    "subtrees_of",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
_LEAF = b"\x00"
_NODE = b"\x01"


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data)."""
    return hashlib.sha256(_LEAF + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return hashlib.sha256(_NODE + left + right).digest()


def fold_levels(hashes: Sequence[bytes], levels: int) -> list[bytes]:
    """The roots of consecutive perfect subtrees of ``2**levels`` hashes each.

    ``len(hashes)`` must be a multiple of ``2**levels``. One level at a time over the
    whole run: this is how tree heads cache a minute's new leaves, so each hash is one
    list step rather than a method call.
    """
    if len(hashes) % (1 << levels):
        raise ValueError(f"{len(hashes)} hashes are not whole subtrees of {1 << levels}")
    layer = list(hashes)
    for _ in range(levels):
        layer = [
            hashlib.sha256(_NODE + layer[i] + layer[i + 1]).digest()
            for i in range(0, len(layer), 2)
        ]
    return layer


@dataclass(frozen=True, slots=True, order=True)
class Subtree:
    """The complete subtree of ``2**level`` leaves starting at leaf ``index * 2**level``."""

    level: int
    index: int

    @property
    def start(self) -> int:
        return self.index << self.level

    @property
    def end(self) -> int:
        return (self.index + 1) << self.level

    @property
    def children(self) -> tuple[Subtree, Subtree]:
        if self.level == 0:
            raise ValueError("a leaf has no children")
        return Subtree(self.level - 1, 2 * self.index), Subtree(self.level - 1, 2 * self.index + 1)


def _largest_power_of_two_below(n: int) -> int:
    """k with k < n <= 2k, for n >= 2."""
    return 1 << ((n - 1).bit_length() - 1)


def subtrees_of(start: int, end: int) -> tuple[Subtree, ...]:
    """``[start, end)`` as the fewest complete, aligned subtrees, left to right.

    Raises ``ValueError`` for an empty or negative range.
    """
    if not 0 <= start < end:
        raise ValueError(f"not a range of leaves: [{start}, {end})")
    parts = []
    position = start
    while position < end:
        # The largest aligned block that starts here and does not pass the end.
        level = (position & -position).bit_length() - 1 if position else (end - 1).bit_length()
        while position + (1 << level) > end:
            level -= 1
        parts.append(Subtree(level, position >> level))
        position += 1 << level
    return tuple(parts)


def range_hash(parts: Sequence[bytes]) -> bytes:
    """The hash of a proof range from its subtrees' hashes (``subtrees_of`` order).

    Valid for ranges that are nodes of the RFC tree, which is every range this module
    asks for: the subtrees then fold from the right.
    """
    if not parts:
        raise ValueError("a range has at least one subtree")
    result = parts[-1]
    for part in reversed(parts[:-1]):
        result = node_hash(part, result)
    return result


def inclusion_ranges(index: int, size: int) -> tuple[tuple[int, int], ...]:
    """The ranges whose hashes make the inclusion proof of leaf ``index``, leaf upwards.

    Raises ``ValueError`` unless ``0 <= index < size``.
    """
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of size {size}")
    path: list[tuple[int, int]] = []
    start, end = 0, size
    while end - start > 1:
        k = _largest_power_of_two_below(end - start)
        if index - start < k:
            path.append((start + k, end))
            end = start + k
        else:
            path.append((start, start + k))
            start += k
    return tuple(reversed(path))


def consistency_ranges(old_size: int, new_size: int) -> tuple[tuple[int, int], ...]:
    """The ranges whose hashes make the consistency proof from ``old_size`` to ``new_size``.

    Empty when ``old_size`` is 0 or equals ``new_size``. Raises ``ValueError`` unless
    ``0 <= old_size <= new_size``.
    """
    if not 0 <= old_size <= new_size:
        raise ValueError(f"no consistency proof from size {old_size} to size {new_size}")
    if old_size in (0, new_size):
        return ()
    path: list[tuple[int, int]] = []
    m, start, end, complete = old_size, 0, new_size, True
    # SUBPROOF(m, D[start:end], complete), unrolled; RFC 9162 section 2.1.4.1.
    while m != end - start:
        k = _largest_power_of_two_below(end - start)
        if m <= k:
            path.append((start + k, end))
            end = start + k
        else:
            path.append((start, start + k))
            m -= k
            start += k
            complete = False
    if not complete:
        path.append((start, end))
    return tuple(reversed(path))


def _hash_ranges(
    ranges: Iterable[tuple[int, int]], subtree_hash: Callable[[Subtree], bytes]
) -> tuple[bytes, ...]:
    return tuple(range_hash([subtree_hash(s) for s in subtrees_of(a, b)]) for a, b in ranges)


def _subtree_hasher(leaves: Sequence[bytes]) -> Callable[[Subtree], bytes]:
    cache: dict[Subtree, bytes] = {}

    def subtree_hash(subtree: Subtree) -> bytes:
        if subtree.level == 0:
            return leaves[subtree.index]
        if subtree not in cache:
            left, right = subtree.children
            cache[subtree] = node_hash(subtree_hash(left), subtree_hash(right))
        return cache[subtree]

    return subtree_hash


def root_from_leaves(leaves: Sequence[bytes]) -> bytes:
    """MTH over the given leaf hashes (``EMPTY_ROOT`` for none)."""
    compact = CompactRange()
    for leaf in leaves:
        compact.append(leaf)
    return compact.root()


def inclusion_proof(leaves: Sequence[bytes], index: int) -> tuple[bytes, ...]:
    """The inclusion proof of leaf ``index`` in the tree of all ``leaves`` (leaf hashes)."""
    return _hash_ranges(inclusion_ranges(index, len(leaves)), _subtree_hasher(leaves))


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> tuple[bytes, ...]:
    """The consistency proof from the first ``old_size`` leaves to all of ``leaves``."""
    return _hash_ranges(consistency_ranges(old_size, len(leaves)), _subtree_hasher(leaves))


class CompactRange:
    """The root of a growing tree from O(log n) state: the hashes of its perfect subtrees.

    ``append`` takes leaf hashes in order; ``root`` is MTH of everything appended so far.
    ``from_subtrees`` resumes from the subtrees that make ``[0, size)`` (``subtrees_of``),
    which is all that pruned leaves need to leave behind.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._hashes: list[bytes] = []

    @classmethod
    def from_subtrees(cls, size: int, hashes: Sequence[bytes]) -> CompactRange:
        expected = len(subtrees_of(0, size)) if size else 0
        if len(hashes) != expected:
            raise ValueError(f"a tree of size {size} has {expected} perfect subtrees")
        compact = cls()
        compact._size = size
        compact._hashes = list(hashes)
        return compact

    @property
    def size(self) -> int:
        return self._size

    @property
    def hashes(self) -> tuple[bytes, ...]:
        return tuple(self._hashes)

    def append(self, leaf: bytes) -> None:
        self._hashes.append(leaf)
        size = self._size
        # Merge while the new leaf completes a subtree: one merge per trailing 1 bit.
        while size & 1:
            right = self._hashes.pop()
            left = self._hashes.pop()
            self._hashes.append(node_hash(left, right))
            size >>= 1
        self._size += 1

    def root(self) -> bytes:
        if not self._hashes:
            return EMPTY_ROOT
        return range_hash(self._hashes)


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """True if ``proof`` shows leaf hash ``leaf`` at ``index`` in the tree ``(size, root)``."""
    if not (_is_hash(leaf) and _is_hash(root) and all(_is_hash(p) for p in proof)):
        return False
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """True if ``proof`` shows the tree ``(old_size, old_root)`` is a prefix of the new one."""
    if not (_is_hash(old_root) and _is_hash(new_root) and all(_is_hash(p) for p in proof)):
        return False
    if not 0 <= old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0
