"""Group commit: one writer thread puts whatever rows are queued into one transaction.

``write`` hands its row to the writer thread of a ``GroupCommitWriter``. The writer takes
whatever is queued (up to ``max_batch`` rows, waiting at most ``max_wait`` seconds for more
once it has one), inserts it in one transaction and only then wakes each waiting caller on
its own event loop. Many concurrent writes therefore share one commit, and so one fsync,
while each caller still returns only after its own row is durable.

``submit`` queues a row without waiting for it (the decision log uses it: a proxy's answer
must not wait for a disk). Such rows are bounded: past ``max_unawaited`` queued, further
ones are dropped and counted rather than held in memory without limit.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from meshca.adapters.storage.engine import error_summary, write_gate
from meshca.core.errors import BackendUnavailable

__all__ = ["BatchCommitter", "GroupCommitWriter", "WriterCounters"]

log = logging.getLogger(__name__)

# A waiting caller's future and what to give it: None for success, else the error.
_Outcome: TypeAlias = tuple[asyncio.Future[None], BaseException | None]


@dataclass(frozen=True, slots=True)
class _Pending:
    """One queued row and the caller waiting for it (none for ``submit``)."""

    row: Any
    loop: asyncio.AbstractEventLoop | None
    future: asyncio.Future[None] | None


@dataclass(frozen=True, slots=True)
class WriterCounters:
    """What happened to rows queued with ``submit`` or ``write``, since the writer was made.

    ``failed`` also counts ``write`` calls refused because the writer was closed.
    """

    written: int
    failed: int
    dropped: int


class BatchCommitter:
    """Commits batches of rows, one transaction per batch, and says what became of each.

    ``write`` puts the rows into the database inside the open transaction (under the
    write gate). If the batch fails for another reason than a lost or locked database,
    its rows are retried one per transaction, so one unstorable row cannot fail its
    neighbours. Blocking; used from one thread at a time.

    It keeps one connection: checking one out of the pool for every batch cost more than
    the inserts of a small batch. A connection that failed with an outage is replaced,
    and a batch that met a dead kept connection (a restarted server) is tried once more
    on a new one before it is given up.
    """

    def __init__(
        self,
        engine: Engine,
        write: Callable[[Connection, list[Any]], None],
        *,
        what: str,
        on_commit: Callable[[int, int], None] | None = None,
    ) -> None:
        self._engine = engine
        self._write = write
        self._what = what
        self._on_commit = on_commit
        self._gate = write_gate(engine)
        self._connection: Connection | None = None

    def close(self) -> None:
        """Give the kept connection back; a later batch opens a new one."""
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None

    def commit(self, rows: builtins.list[Any]) -> builtins.list[str | None]:
        """For each row, None once it is committed or why it was not.

        ``on_commit`` then hears the batch's size and how many of its rows failed.
        """
        outcomes = self._commit(rows)
        if self._on_commit is not None:
            try:
                self._on_commit(len(rows), sum(o is not None for o in outcomes))
            except Exception:
                log.exception("a commit observer failed")
        return outcomes

    def _commit(self, rows: builtins.list[Any]) -> builtins.list[str | None]:
        try:
            self._insert(rows)
        except Exception as error:
            if len(rows) > 1 and not _is_outage(error):
                return self._one_by_one(rows)
            return [self._failed(len(rows), error)] * len(rows)
        return [None] * len(rows)

    def _one_by_one(self, rows: builtins.list[Any]) -> builtins.list[str | None]:
        outcomes: builtins.list[str | None] = []
        for index, row in enumerate(rows):
            try:
                self._insert([row])
            except Exception as error:
                if _is_outage(error):
                    # The database went away meanwhile: fail the rest without waiting on
                    # it once per row.
                    left = len(rows) - index
                    return outcomes + [self._failed(left, error)] * left
                outcomes.append(self._failed(1, error))
            else:
                outcomes.append(None)
        return outcomes

    def _insert(self, rows: builtins.list[Any]) -> None:
        # One transaction per batch: the commit (and its fsync) is what is shared.
        with self._gate:
            # A kept connection may have died with its server: then once more, anew.
            attempts = 2 if self._connection is not None else 1
            for attempt in range(attempts):
                try:
                    self._transaction(rows)
                    return
                except Exception as error:
                    if not _is_outage(error):
                        raise
                    self.close()
                    if attempt == attempts - 1:
                        raise

    def _transaction(self, rows: builtins.list[Any]) -> None:
        if self._connection is None:
            self._connection = self._engine.connect()
        with self._connection.begin():
            self._write(self._connection, rows)

    def _failed(self, count: int, error: Exception) -> str:
        summary = error_summary(error, secret=self._engine.url.password)
        log.error("%d %s(s) not committed: %s", count, self._what, summary)
        return f"{self._what} not committed: {summary}"


class GroupCommitWriter:
    """Commits rows from one thread, many rows per transaction (a ``BatchCommitter``).

    ``write`` returns only after the transaction holding its row has committed, and raises
    ``BackendUnavailable`` if that transaction failed (see ``BatchCommitter`` for how a
    failed batch is retried). The writer keeps running after failures and serves later
    rows once the database is back.

    Writes may come from any number of event loops and threads. Several writers, in one
    process or many, may write the same database (SQLite writers queue on a file lock).
    Create a writer per process after any fork: the thread does not survive one.
    ``what`` names the record in messages ("issuance record").
    """

    def __init__(
        self,
        engine: Engine,
        write: Callable[[Connection, list[Any]], None],
        *,
        what: str,
        max_batch: int = 256,
        max_wait: float = 0.002,
        max_unawaited: int = 100_000,
        thread_name: str = "meshca-record-writer",
        on_commit: Callable[[int, int], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must not be negative, not {max_wait}")
        self._committer = BatchCommitter(engine, write, what=what, on_commit=on_commit)
        self._what = what
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._max_unawaited = max_unawaited
        self._thread_name = thread_name
        self._last_batch_size = 0
        # None is the stop signal; close() queues it after the last accepted row.
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._closed = False
        self._unawaited = 0
        self._written = 0
        self._failed = 0
        self._dropped = 0

    @property
    def counters(self) -> WriterCounters:
        """Counts for rows queued with ``submit`` (``write`` callers learn their own fate)."""
        with self._lock:
            return WriterCounters(self._written, self._failed, self._dropped)

    @property
    def problem(self) -> str | None:
        """Why no row can be written now (closed, or the writer thread died); else None."""
        if self._closed:
            return f"the {self._what} is closed"
        writer = self._writer
        if writer is not None and not writer.is_alive():
            return f"the {self._what} writer thread stopped"
        return None

    def start(self) -> None:
        """Start the writer thread now rather than on the first row.

        Raises ``BackendUnavailable`` after ``close``.
        """
        with self._lock:
            self._check_open()
            self._start_writer()

    async def write(self, row: Any) -> None:
        """Return only once ``row`` is durably committed; else raise ``BackendUnavailable``.

        Cancelling the caller does not withdraw a row that is already queued.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        # The lock orders this put before close()'s stop signal, so no row is stranded.
        with self._lock:
            if self._closed:
                self._failed += 1
            self._check_open()
            self._start_writer()
            self._queue.put(_Pending(row, loop, future))
        await future

    def submit(self, row: Any) -> bool:
        """Queue ``row`` without waiting for it; False if it was dropped (full or closed).

        Failures are logged and counted in ``counters``, never raised.
        """
        with self._lock:
            if self._closed or self._unawaited >= self._max_unawaited:
                self._dropped += 1
                return False
            self._unawaited += 1
            self._start_writer()
            self._queue.put(_Pending(row, None, None))
        return True

    def close(self) -> None:
        """Write every row already accepted, then stop the writer. Idempotent.

        Blocks until the queue is drained; from a coroutine, prefer ``aclose``. Writes
        after this raise ``BackendUnavailable``.
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._writer is not None:
                    self._queue.put(None)
            writer = self._writer
        if writer is not None and writer is not threading.current_thread():
            writer.join()

    async def aclose(self) -> None:
        """``close`` without blocking the event loop."""
        await asyncio.to_thread(self.close)

    # -- caller side ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailable(f"the {self._what} is closed; nothing more is written")

    def _start_writer(self) -> None:
        if self._writer is None:
            # A daemon, so a writer that was never closed cannot hang interpreter exit;
            # its unfinished writes were never confirmed, so nothing was released.
            self._writer = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
            self._writer.start()

    # -- writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                batch, stop = self._next_batch()
                if batch:
                    self._write(batch)
                if stop:
                    return
        finally:
            self._committer.close()

    def _next_batch(self) -> tuple[builtins.list[_Pending], bool]:
        """Block for one row, then gather more until full or ``max_wait`` has passed.

        The wait is only spent under load, judged by the last batch: a lone row commits
        at once, while concurrent ones keep sharing commits. Returns the batch and whether
        the stop signal was seen.
        """
        first = self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        wait = self._max_wait if self._last_batch_size > 1 else 0.0
        deadline = time.monotonic() + wait
        while len(batch) < self._max_batch:
            remaining = deadline - time.monotonic()
            try:
                # Past the deadline, still take whatever is already queued.
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        self._last_batch_size = len(batch)
        return batch, False

    def _write(self, batch: builtins.list[_Pending]) -> None:
        outcomes = self._committer.commit([pending.row for pending in batch])
        if all(outcome is None for outcome in outcomes):
            self._settle(batch, None)
            return
        for pending, outcome in zip(batch, outcomes, strict=True):
            self._settle([pending], None if outcome is None else _unavailable(outcome))

    def _settle(
        self, batch: Iterable[_Pending], make_error: Callable[[], BaseException] | None
    ) -> None:
        """Resolve each waiting future on its own loop, with one wake-up per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, builtins.list[_Outcome]] = {}
        rows = unawaited = 0
        for pending in batch:
            rows += 1
            if pending.loop is None or pending.future is None:
                unawaited += 1
                continue
            # A fresh exception per caller: a shared one would collect everyone's traceback.
            error = None if make_error is None else make_error()
            by_loop.setdefault(pending.loop, []).append((pending.future, error))
        with self._lock:
            self._unawaited -= unawaited
            if make_error is None:
                self._written += rows
            else:
                self._failed += rows
        for loop, outcomes in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, outcomes)
            except RuntimeError:
                # That loop is closed, so no one is waiting for these any more.
                log.debug("event loop closed before %d write(s) were answered", len(outcomes))


def _unavailable(message: str) -> Callable[[], BaseException]:
    return lambda: BackendUnavailable(message)


def _resolve(outcomes: Iterable[_Outcome]) -> None:
    for future, error in outcomes:
        if future.done():  # the caller was cancelled
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


def _is_outage(error: BaseException) -> bool:
    """True if the database itself is unreachable or locked, not just this data refused."""
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, OperationalError | InterfaceError | PoolTimeoutError)
