"""Recompute the log from its records and say where it stops matching. Pure.

``LogVerifier`` is fed every stored entry in leaf order (from the first unpruned leaf)
and checks, as it goes:

- the leaf indexes run without gaps or repeats (a gap is a deleted row);
- each record hashes to the leaf hash stored beside it (an edited or moved row);
- each run of ``block_size`` leaves hashes to the subtree hash cached when tree heads
  were signed (a row rewritten together with its leaf hash);
- the recomputed root at every signed head's size equals that head's root, and every
  head carries a valid signature by the log key.

Findings are values; the first one names the first leaf that is wrong.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from meshca.core.audit import LogEntry, entry_leaf_data
from meshca.core.log import SignedTreeHead, verify_tree_head
from meshca.core.merkle import CompactRange, leaf_hash, root_from_leaves

__all__ = ["Finding", "FindingKind", "LogVerifier", "VerificationReport"]


class FindingKind(enum.StrEnum):
    EDITED = "edited"
    MISSING = "missing"
    OUT_OF_ORDER = "out-of-order"
    REWRITTEN = "rewritten"
    HEAD_MISMATCH = "head-mismatch"
    BAD_SIGNATURE = "bad-signature"
    HEAD_BEYOND_LOG = "head-beyond-log"


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing that does not hold; ``leaf_index`` is the first leaf it concerns."""

    kind: FindingKind
    leaf_index: int | None
    message: str


@dataclass(frozen=True, slots=True)
class VerificationReport:
    """What was checked and what was found; ``ok`` only when nothing was."""

    leaves_checked: int
    heads_checked: int
    heads_skipped: int
    tree_size: int
    root_hash: bytes
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return not self.findings


def _describe(entry: LogEntry) -> str:
    record = entry.record
    what = f"serial {record.serial}" if record.serial else f"{record.outcome} {record.reason}"
    return f"leaf {entry.leaf_index} ({what}, {record.time.isoformat()})"


class LogVerifier:
    """Feed entries in leaf order with ``feed``; ``finish`` returns the report.

    ``start`` is the first leaf present (earlier ones were pruned) and ``frontier`` the
    hashes of ``merkle.subtrees_of(0, start)``. Heads below ``start`` cannot be checked
    and are counted as skipped. ``public_key`` checks head signatures (None: not checked).
    ``block_hash(i)`` returns the cached hash of leaves ``[i*block_size, (i+1)*block_size)``
    or None.
    """

    def __init__(
        self,
        *,
        start: int = 0,
        frontier: Sequence[bytes] = (),
        heads: Sequence[SignedTreeHead] = (),
        public_key: ec.EllipticCurvePublicKey | None = None,
        block_hash: Callable[[int], bytes | None] | None = None,
        block_size: int = 16,
        max_findings: int = 20,
    ) -> None:
        self._compact = CompactRange.from_subtrees(start, frontier) if start else CompactRange()
        self._next = start
        self._checked = 0
        self._broken = False
        self._findings: list[Finding] = []
        self._max = max_findings
        self._block_hash = block_hash
        self._block_size = block_size
        self._block: list[bytes] = []
        self._block_edited = False
        ordered = sorted(heads, key=lambda h: h.head.size)
        self._skipped = sum(1 for h in ordered if h.head.size < start)
        self._heads = [h for h in ordered if h.head.size >= start]
        self._heads_checked = 0
        if public_key is not None:
            for signed in self._heads:
                if not verify_tree_head(public_key, signed):
                    self._add(
                        FindingKind.BAD_SIGNATURE,
                        None,
                        f"the tree head of size {signed.head.size} at "
                        f"{signed.head.timestamp.isoformat()} is not signed by the log key",
                    )
        self._check_heads()

    def feed(self, entry: LogEntry, stored_hash: bytes | None = None) -> None:
        index = entry.leaf_index
        if index < self._next:
            self._add(
                FindingKind.OUT_OF_ORDER,
                index,
                f"{_describe(entry)} comes after leaf {self._next - 1}: "
                "leaf indexes were rewritten",
            )
            return
        if index > self._next:
            self._add(
                FindingKind.MISSING,
                self._next,
                f"leaves {self._next}..{index - 1} are missing: their rows were deleted "
                f"(the next row present is {_describe(entry)})",
            )
            self._broken = True
            self._next = index
        computed = leaf_hash(entry_leaf_data(entry))
        if stored_hash is not None and stored_hash != computed:
            self._block_edited = True
            self._add(
                FindingKind.EDITED,
                index,
                f"{_describe(entry)}: its row does not hash to the leaf hash recorded when "
                "it was written: the row was edited, or moved from another position",
            )
        self._checked += 1
        self._next += 1
        if self._broken:
            return
        self._compact.append(computed)
        self._check_block(computed)
        self._check_heads()

    def finish(self, tree_size: int) -> VerificationReport:
        """``tree_size`` is the size the log claims; leaves short of it are missing."""
        if self._next < tree_size:
            self._add(
                FindingKind.MISSING,
                self._next,
                f"leaves {self._next}..{tree_size - 1} are missing: the log has "
                f"{tree_size} leaves but the rows stop at {self._next - 1}",
            )
        for signed in self._heads:
            if signed.head.size > self._next:
                self._add(
                    FindingKind.HEAD_BEYOND_LOG,
                    None,
                    f"the signed tree head of size {signed.head.size} is larger than the "
                    f"{self._next} leaves present",
                )
        return VerificationReport(
            leaves_checked=self._checked,
            heads_checked=self._heads_checked,
            heads_skipped=self._skipped,
            tree_size=self._next,
            root_hash=self._compact.root(),
            findings=tuple(self._findings),
        )

    def _check_block(self, computed: bytes) -> None:
        if self._block_hash is None:
            return
        self._block.append(computed)
        if self._compact.size % self._block_size:
            return
        block = self._compact.size // self._block_size - 1
        leaves, edited = self._block, self._block_edited
        self._block, self._block_edited = [], False
        if len(leaves) != self._block_size or edited:
            return  # a partial first block, or already reported leaf by leaf
        cached = self._block_hash(block)
        if cached is not None and cached != root_from_leaves(leaves):
            first = block * self._block_size
            self._add(
                FindingKind.REWRITTEN,
                first,
                f"leaves {first}..{first + self._block_size - 1} no longer match the hashes "
                "cached when tree heads were signed: a row there was rewritten together "
                "with its leaf hash",
            )

    def _check_heads(self) -> None:
        while self._heads and self._heads[0].head.size == self._compact.size:
            signed = self._heads.pop(0)
            self._heads_checked += 1
            if signed.head.root_hash != self._compact.root():
                self._add(
                    FindingKind.HEAD_MISMATCH,
                    None,
                    f"the first {signed.head.size} leaves do not hash to the root of the "
                    f"tree head signed at {signed.head.timestamp.isoformat()}",
                )

    def _add(self, kind: FindingKind, leaf_index: int | None, message: str) -> None:
        if len(self._findings) < self._max:
            self._findings.append(Finding(kind, leaf_index, message))
