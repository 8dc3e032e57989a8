"""The verifiable log over the issuance record: leaf indexes, subtree cache, heads, proofs.

Leaves are the ``issuance_record`` rows in ``leaf_index`` order.
``record_rows.insert_records`` runs inside every record-writing transaction: one
``UPDATE log_state ... RETURNING`` both reserves the batch's indexes and takes the log's
lock (PostgreSQL holds the row lock to commit; SQLite writers already queue on the
cross-process write gate and take SQLite's write lock), so indexes follow commit order
with no gaps, whatever the number of processes or replicas. The unique index on
``leaf_index`` turns any other writer's mistake into a failed transaction rather than a
forked log.

Hashes of complete subtrees at levels ``STRIDE``, ``2*STRIDE``, ... are cached in
``log_node`` when tree heads are signed; any subtree hash is then at most ``2**STRIDE``
stored hashes away, and a proof costs a few small indexed reads. Nodes past the cache are
computed from the level below, without writing.

Retention deletes whole ``2**STRIDE``-leaf blocks from the start of the log. Their level
``STRIDE`` hashes stay in ``log_node``, which is all that inclusion proofs of the
remaining leaves and consistency proofs between later heads need.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Connection, Engine, delete, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from meshca.adapters.storage.engine import error_summary, write_gate
from meshca.adapters.storage.record_rows import LOG_STATE_ID, row_to_record
from meshca.adapters.storage.tables import IssuanceRecordRow, LogNodeRow, LogStateRow, TreeHeadRow
from meshca.core.audit import LogEntry
from meshca.core.errors import BackendUnavailable, InvalidRequest
from meshca.core.log import (
    ConsistencyProof,
    InclusionProof,
    LogState,
    SignedTreeHead,
    TreeHead,
    sign_tree_head,
)
from meshca.core.log_audit import LogVerifier, VerificationReport
from meshca.core.merkle import (
    EMPTY_ROOT,
    Subtree,
    consistency_ranges,
    fold_levels,
    inclusion_ranges,
    range_hash,
    subtrees_of,
)

__all__ = ["BLOCK", "STRIDE", "LeafRow", "SqlTransparencyLog"]

log = logging.getLogger(__name__)

#: Cached levels are multiples of this; retention removes blocks of ``BLOCK`` leaves.
STRIDE = 4
BLOCK = 1 << STRIDE
# Nodes computed per step when the cache is extended: bounds memory on big logs.
_CHUNK_NODES = 4096


class LeafRow:
    """A stored leaf: its entry and the leaf hash stored beside it."""

    __slots__ = ("entry", "row_id", "stored_hash")

    def __init__(self, entry: LogEntry, stored_hash: bytes, row_id: int) -> None:
        self.entry = entry
        self.stored_hash = stored_hash
        self.row_id = row_id


class _Missing(InvalidRequest):
    """A leaf the log needs is not in the database (pruned, or deleted)."""

    reason = "leaf-missing"

    def __init__(self, leaf_index: int) -> None:
        super().__init__(f"leaf {leaf_index} is no longer in the issuance record")
        self.leaf_index = leaf_index


class SqlTransparencyLog:
    """Tree heads and proofs over the issuance record. Blocking: call from a thread.

    ``signer`` is the log key; without it, heads can be read and proofs made but not
    signed. Every method raises ``BackendUnavailable`` when the database cannot be used.
    """

    def __init__(self, engine: Engine, signer: ec.EllipticCurvePrivateKey | None = None) -> None:
        self._engine = engine
        self._signer = signer
        self._gate = write_gate(engine)

    # -- reading ---------------------------------------------------------------------------

    def state(self) -> LogState:
        """The log's size and retention mark, with the frontier of the pruned prefix."""
        with self._reading() as connection:
            state = self._state(connection)
            frontier = (
                tuple(self._subtree(connection, s) for s in subtrees_of(0, state.pruned_below))
                if state.pruned_below
                else ()
            )
        return LogState(state.tree_size, state.pruned_below, frontier)

    def latest_head(self) -> SignedTreeHead | None:
        """The newest signed head (largest size, then latest time), or None."""
        statement = (
            select(TreeHeadRow)
            .order_by(TreeHeadRow.tree_size.desc(), TreeHeadRow.timestamp_ms.desc())
            .limit(1)
        )
        with self._reading() as connection:
            row = connection.execute(statement).first()
        return None if row is None else _to_head(row)

    def heads(self) -> tuple[SignedTreeHead, ...]:
        """Every signed head, smallest first."""
        statement = select(TreeHeadRow).order_by(
            TreeHeadRow.tree_size, TreeHeadRow.timestamp_ms, TreeHeadRow.id
        )
        with self._reading() as connection:
            return tuple(_to_head(row) for row in connection.execute(statement))

    def root(self, size: int) -> bytes:
        """MTH of the first ``size`` leaves."""
        with self._reading() as connection:
            self._check_size(connection, size)
            return self._root(connection, size)

    def inclusion_proof(self, leaf_index: int, tree_size: int) -> InclusionProof:
        """The audit path of ``leaf_index`` in the tree of ``tree_size`` leaves.

        Raises ``InvalidRequest`` for an index or size outside the log, or a proof that
        would need pruned leaves.
        """
        if not 0 <= leaf_index < tree_size:
            raise InvalidRequest(f"leaf {leaf_index} is not in a tree of size {tree_size}")
        with self._reading() as connection:
            self._check_size(connection, tree_size)
            path = self._hash_ranges(connection, inclusion_ranges(leaf_index, tree_size))
        return InclusionProof(leaf_index=leaf_index, tree_size=tree_size, path=path)

    def consistency_proof(self, old_size: int, new_size: int) -> ConsistencyProof:
        """The proof that the tree of ``old_size`` leaves is a prefix of ``new_size``'s."""
        if not 0 <= old_size <= new_size:
            raise InvalidRequest(f"no consistency proof from size {old_size} to {new_size}")
        with self._reading() as connection:
            self._check_size(connection, new_size)
            path = self._hash_ranges(connection, consistency_ranges(old_size, new_size))
        return ConsistencyProof(old_size=old_size, new_size=new_size, path=path)

    def frontier(self, size: int) -> tuple[bytes, ...]:
        """The hashes of ``subtrees_of(0, size)``: what resumes a recomputation at ``size``."""
        if size == 0:
            return ()
        with self._reading() as connection:
            return tuple(self._subtree(connection, s) for s in subtrees_of(0, size))

    def block_hashes(self, start_block: int, end_block: int) -> dict[int, bytes]:
        """Cached level-``STRIDE`` hashes for blocks ``[start_block, end_block)``."""
        statement = select(LogNodeRow.idx, LogNodeRow.hash).where(
            LogNodeRow.level == STRIDE,
            LogNodeRow.idx >= start_block,
            LogNodeRow.idx < end_block,
        )
        with self._reading() as connection:
            return {int(i): bytes(h) for i, h in connection.execute(statement)}

    def leaves(self, start: int = 0, *, batch: int = 5000) -> Iterator[LeafRow]:
        """Every stored leaf from ``start`` on, in ``leaf_index`` order, read in batches."""
        position = start
        while True:
            statement = (
                select(IssuanceRecordRow)
                .where(IssuanceRecordRow.leaf_index >= position)
                .order_by(IssuanceRecordRow.leaf_index)
                .limit(batch)
            )
            with self._reading() as connection:
                rows = connection.execute(statement).all()
            for row in rows:
                record = row_to_record(row._mapping)
                yield LeafRow(LogEntry(int(row.leaf_index), record), bytes(row.leaf_hash), row.id)
            if len(rows) < batch:
                return
            position = int(rows[-1].leaf_index) + 1

    def verify(self, public_key: ec.EllipticCurvePublicKey | None) -> VerificationReport:
        """Recompute the whole log from the stored rows (``core.log_audit.LogVerifier``).

        Checks every stored leaf, every signed head (and its signature when
        ``public_key`` is given) and the cached block hashes.
        """
        state = self.state()
        cache: dict[int, bytes] = {}

        def block_hash(block: int) -> bytes | None:
            if block not in cache:
                cache.clear()
                cache.update(self.block_hashes(block, block + 4096))
            return cache.get(block)

        verifier = LogVerifier(
            start=state.pruned_below,
            frontier=state.frontier,
            heads=self.heads(),
            public_key=public_key,
            block_hash=block_hash,
            block_size=BLOCK,
        )
        for leaf in self.leaves(state.pruned_below):
            verifier.feed(leaf.entry, leaf.stored_hash)
        return verifier.finish(state.tree_size)

    # -- writing ---------------------------------------------------------------------------

    def sign_head(self, now: datetime) -> SignedTreeHead:
        """Extend the cache to the current size, then sign and store a head for it."""
        if self._signer is None:
            raise BackendUnavailable("no log key: this process cannot sign tree heads")
        size = self.state().tree_size
        self.extend_cache(size)
        root = self.root(size)
        stamp = TreeHead.time_from_ms(TreeHead(0, EMPTY_ROOT, now).timestamp_ms)
        signed = sign_tree_head(self._signer, TreeHead(size=size, root_hash=root, timestamp=stamp))
        try:
            with self._engine.begin() as connection:
                connection.execute(
                    insert(TreeHeadRow).values(
                        tree_size=size,
                        timestamp_ms=signed.head.timestamp_ms,
                        root_hash=root,
                        key_id=signed.key_id,
                        signature=signed.signature,
                    )
                )
        except SQLAlchemyError as error:
            raise self._unavailable("cannot store the tree head", error) from error
        return signed

    def extend_cache(self, size: int) -> int:
        """Store the cached levels' nodes for every complete subtree below ``size``.

        Idempotent, and safe to run from several processes at once. Returns the number
        of nodes written.
        """
        written = 0
        level = STRIDE
        try:
            while (1 << level) <= size:
                with self._engine.connect() as connection:
                    have = connection.execute(
                        select(func.coalesce(func.max(LogNodeRow.idx) + 1, 0)).where(
                            LogNodeRow.level == level
                        )
                    ).scalar_one()
                want = size >> level
                for lo in range(int(have), want, _CHUNK_NODES):
                    hi = min(lo + _CHUNK_NODES, want)
                    with self._engine.connect() as connection:
                        hashes = self._hashes_at(connection, level, lo, hi)
                    rows = [(level, lo + offset, value) for offset, value in enumerate(hashes)]
                    with self._engine.begin() as connection:
                        connection.exec_driver_sql(_insert_nodes_sql(connection), rows)
                    written += len(rows)
                level += STRIDE
        except _Missing as missing:
            raise BackendUnavailable(
                f"leaf {missing.leaf_index} is missing from the issuance record; "
                "run 'meshca audit verify' to see what was removed"
            ) from None
        except SQLAlchemyError as error:
            raise self._unavailable("cannot extend the log's hash cache", error) from error
        return written

    def prune(self, before: datetime) -> int:
        """Remove records older than ``before`` from the start of the log, in whole blocks.

        Stops at the first leaf at or after ``before`` (so a late-committed old record
        stays while anything newer precedes it), rounded down to a multiple of ``BLOCK``.
        The hashes that prove the rest are cached first. Returns the new ``pruned_below``.
        """
        state = self.state()
        with self._reading() as connection:
            first_kept = connection.execute(
                select(func.min(IssuanceRecordRow.leaf_index)).where(
                    IssuanceRecordRow.time >= before
                )
            ).scalar_one_or_none()
        limit = state.tree_size if first_kept is None else int(first_kept)
        target = limit - limit % BLOCK
        if target <= state.pruned_below:
            return state.pruned_below
        self.extend_cache(target)
        try:
            with self._gate, self._engine.begin() as connection:
                connection.execute(
                    update(LogStateRow)
                    .where(LogStateRow.id == LOG_STATE_ID)
                    .values(pruned_below=target)
                )
                connection.execute(
                    delete(IssuanceRecordRow).where(IssuanceRecordRow.leaf_index < target)
                )
        except SQLAlchemyError as error:
            raise self._unavailable("cannot prune the issuance record", error) from error
        log.info("pruned the issuance record below leaf %d (before %s)", target, before)
        return target

    # -- internals -------------------------------------------------------------------------

    def _reading(self) -> _Reading:
        return _Reading(self)

    def _unavailable(self, what: str, error: BaseException) -> BackendUnavailable:
        summary = error_summary(error, secret=self._engine.url.password)
        return BackendUnavailable(f"{what}: {summary}")

    def _state(self, connection: Connection) -> LogState:
        row = connection.execute(
            select(LogStateRow.tree_size, LogStateRow.pruned_below).where(
                LogStateRow.id == LOG_STATE_ID
            )
        ).first()
        if row is None:
            return LogState(0, 0)
        return LogState(int(row.tree_size), int(row.pruned_below))

    def _check_size(self, connection: Connection, size: int) -> None:
        current = self._state(connection).tree_size
        if size > current:
            raise InvalidRequest(f"the log has {current} leaves, not {size}")

    def _root(self, connection: Connection, size: int) -> bytes:
        if size == 0:
            return EMPTY_ROOT
        return range_hash([self._subtree(connection, s) for s in subtrees_of(0, size)])

    def _hash_ranges(
        self, connection: Connection, ranges: Sequence[tuple[int, int]]
    ) -> tuple[bytes, ...]:
        return tuple(
            range_hash([self._subtree(connection, s) for s in subtrees_of(a, b)]) for a, b in ranges
        )

    def _subtree(self, connection: Connection, subtree: Subtree) -> bytes:
        (value,) = self._hashes_at(connection, subtree.level, subtree.index, subtree.index + 1)
        return value

    def _hashes_at(
        self, connection: Connection, level: int, lo: int, hi: int
    ) -> builtins.list[bytes]:
        """Hashes of the subtrees ``(level, lo) .. (level, hi - 1)``, from the nearest
        cached level at or below ``level`` (leaves at level 0)."""
        if level == 0:
            return self._leaf_hashes(connection, lo, hi)
        base = level - level % STRIDE
        if base == 0:
            return fold_levels(self._leaf_hashes(connection, lo << level, hi << level), level)
        if base < level:
            return fold_levels(
                self._hashes_at(connection, base, lo << (level - base), hi << (level - base)),
                level - base,
            )
        stored = dict(
            connection.execute(
                select(LogNodeRow.idx, LogNodeRow.hash).where(
                    LogNodeRow.level == level, LogNodeRow.idx >= lo, LogNodeRow.idx < hi
                )
            ).all()
        )
        missing = [i for i in range(lo, hi) if i not in stored]
        if missing:
            first, last = missing[0], missing[-1] + 1
            computed = fold_levels(
                self._hashes_at(connection, level - STRIDE, first << STRIDE, last << STRIDE),
                STRIDE,
            )
            for offset, value in enumerate(computed):
                stored.setdefault(first + offset, value)
        return [bytes(stored[i]) for i in range(lo, hi)]

    def _leaf_hashes(self, connection: Connection, lo: int, hi: int) -> builtins.list[bytes]:
        # Plain SQL and plain tuples: a tree head reads every leaf hash since the last one.
        marker = "?" if connection.dialect.paramstyle == "qmark" else "%s"
        table = IssuanceRecordRow.__tablename__
        rows = connection.exec_driver_sql(
            f"SELECT leaf_hash FROM {table} "  # noqa: S608 - constants; values are bound
            f"WHERE leaf_index >= {marker} AND leaf_index < {marker} ORDER BY leaf_index",
            (lo, hi),
        ).fetchall()
        if len(rows) != hi - lo:
            found = set(
                connection.execute(
                    select(IssuanceRecordRow.leaf_index).where(
                        IssuanceRecordRow.leaf_index >= lo, IssuanceRecordRow.leaf_index < hi
                    )
                ).scalars()
            )
            raise _Missing(next(i for i in range(lo, hi) if i not in found))
        return [bytes(value) for (value,) in rows]


def _insert_nodes_sql(connection: Connection) -> str:
    # Plain SQL, as thousands of nodes go in at once; both databases skip existing nodes.
    marker = "?" if connection.dialect.paramstyle == "qmark" else "%s"
    return (
        f"INSERT INTO {LogNodeRow.__tablename__} (level, idx, hash) "  # noqa: S608
        f"VALUES ({marker}, {marker}, {marker}) ON CONFLICT DO NOTHING"
    )


class _Reading:
    """A read connection whose errors become ``BackendUnavailable``."""

    def __init__(self, log: SqlTransparencyLog) -> None:
        self._log = log
        self._connection: Connection | None = None

    def __enter__(self) -> Connection:
        try:
            self._connection = self._log._engine.connect()
        except SQLAlchemyError as error:
            raise self._log._unavailable("cannot read the log", error) from error
        return self._connection

    def __exit__(self, kind: object, error: object, _tb: object) -> None:
        assert self._connection is not None
        self._connection.close()
        if isinstance(error, SQLAlchemyError):
            raise self._log._unavailable("cannot read the log", error) from error


def _to_head(row: Any) -> SignedTreeHead:
    return SignedTreeHead(
        head=TreeHead(
            size=int(row.tree_size),
            root_hash=bytes(row.root_hash),
            timestamp=TreeHead.time_from_ms(int(row.timestamp_ms)),
        ),
        key_id=bytes(row.key_id),
        signature=bytes(row.signature),
    )
