"""The issuance record over SQLAlchemy, with group commit.

``append`` hands its record to one writer thread per store. The writer takes whatever is
queued (up to ``max_batch`` records, waiting at most ``max_wait`` seconds for more once
it has one), writes it in one transaction and only then wakes each waiting caller on its
own event loop. Many concurrent appends therefore share one commit, and so one fsync,
while each caller still returns only after its own record is durable.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias

from sqlalchemy import Engine, Select, insert, select
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session

from meshca.adapters.storage.engine import error_summary, write_gate
from meshca.adapters.storage.tables import IssuanceRecordRow
from meshca.core.audit import AuditRecord, Outcome
from meshca.core.errors import BackendUnavailable, InternalError

__all__ = ["SqlAuditLog"]

log = logging.getLogger(__name__)

# A waiting caller's future and what to give it: None for success, else the error.
_Outcome: TypeAlias = tuple[asyncio.Future[None], BaseException | None]


@dataclass(frozen=True, slots=True)
class _Pending:
    """One queued record and the caller waiting for it."""

    row: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]


class SqlAuditLog:
    """``AuditLog`` over a SQLAlchemy engine (SQLite or PostgreSQL), with group commit.

    ``append`` returns only after the transaction holding its record has committed, and
    raises ``BackendUnavailable`` if that transaction failed. A failed batch fails every
    record in it, except that on an error other than a lost or locked database the
    records are retried one per transaction, so one unstorable record cannot fail its
    neighbours. The writer keeps running after failures and serves later appends once the
    database is back.

    Appends may come from any number of event loops and threads. Several stores, in one
    process or many, may write the same database. Create a store per process after any
    fork: the writer thread does not survive one. The engine stays the caller's to dispose
    of, after ``close``.

    Text is stored as given, except that NUL characters and unpaired surrogates, which
    PostgreSQL (or UTF-8) cannot hold, are written as backslash escapes; the same is done
    to filter values so that they still match.
    """

    def __init__(self, engine: Engine, *, max_batch: int = 256, max_wait: float = 0.002) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must not be negative, not {max_wait}")
        self._engine = engine
        self._gate = write_gate(engine)
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._last_batch_size = 0
        # None is the stop signal; close() queues it after the last accepted record.
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        """Start the writer thread now rather than on the first ``append``.

        Raises ``BackendUnavailable`` after ``close``.
        """
        with self._lock:
            self._check_open()
            self._start_writer()

    async def append(self, record: AuditRecord) -> None:
        """Return only once ``record`` is durably committed.

        Raises ``BackendUnavailable`` if it was not (or the store is closed) and
        ``InternalError`` for a naive datetime in ``record``. Cancelling the caller does
        not withdraw a record that is already queued.
        """
        row = _to_row(record)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        # The lock orders this put before close()'s stop signal, so no record is stranded.
        with self._lock:
            self._check_open()
            self._start_writer()
            self._queue.put(_Pending(row, loop, future))
        await future

    async def list(
        self,
        *,
        limit: int = 50,
        spiffe_id: str | None = None,
        serial: str | None = None,
    ) -> Sequence[AuditRecord]:
        """Up to ``limit`` records, newest first, filtered by exact SPIFFE ID and serial.

        Filter values are bound parameters compared for equality, never patterns. A
        ``limit`` below 1 returns nothing. Works after ``close`` while the engine is open.
        Raises ``BackendUnavailable`` if the database cannot be read.
        """
        if limit < 1:
            return ()
        statement = (
            select(IssuanceRecordRow)
            .order_by(IssuanceRecordRow.time.desc(), IssuanceRecordRow.id.desc())
            .limit(limit)
        )
        if spiffe_id is not None:
            statement = statement.where(IssuanceRecordRow.spiffe_id == _storable(spiffe_id))
        if serial is not None:
            statement = statement.where(IssuanceRecordRow.serial == _storable(serial))
        return await asyncio.to_thread(self._select, statement)

    def close(self) -> None:
        """Write every record already accepted, then stop the writer. Idempotent.

        Blocks until the queue is drained; from a coroutine, prefer ``aclose``. Appends
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
            raise BackendUnavailable("the issuance record is closed; nothing more is written")

    def _start_writer(self) -> None:
        if self._writer is None:
            # A daemon, so a store that was never closed cannot hang interpreter exit;
            # its unfinished appends were never confirmed, so nothing was released.
            self._writer = threading.Thread(
                target=self._run, name="meshca-audit-writer", daemon=True
            )
            self._writer.start()

    def _select(self, statement: Select[IssuanceRecordRow]) -> Sequence[AuditRecord]:
        try:
            with Session(self._engine) as session:
                return tuple(_to_record(row) for row in session.scalars(statement))
        except SQLAlchemyError as error:
            raise BackendUnavailable(
                f"cannot read the issuance record: {_summary(error, self._engine)}"
            ) from error

    # -- writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch, stop = self._next_batch()
            if batch:
                self._write(batch)
            if stop:
                return

    def _next_batch(self) -> tuple[builtins.list[_Pending], bool]:
        """Block for one record, then gather more until full or ``max_wait`` has passed.

        The wait is only spent under load, judged by the last batch: a lone request
        commits at once, while concurrent ones keep sharing commits. Returns the batch
        and whether the stop signal was seen.
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
        try:
            self._insert(batch)
        except Exception as error:
            if len(batch) > 1 and not _is_outage(error):
                self._write_one_by_one(batch)
            else:
                self._fail(batch, error)
        else:
            _settle(batch, None)

    def _write_one_by_one(self, batch: builtins.list[_Pending]) -> None:
        for index, pending in enumerate(batch):
            try:
                self._insert([pending])
            except Exception as error:
                if _is_outage(error):
                    # The database went away meanwhile: fail the rest without waiting on
                    # it once per record.
                    self._fail(batch[index:], error)
                    return
                self._fail([pending], error)
            else:
                _settle([pending], None)

    def _insert(self, batch: builtins.list[_Pending]) -> None:
        # One transaction per batch: the commit (and its fsync) is what is shared.
        with self._gate, self._engine.begin() as connection:
            connection.execute(insert(IssuanceRecordRow), [pending.row for pending in batch])

    def _fail(self, batch: builtins.list[_Pending], error: Exception) -> None:
        summary = _summary(error, self._engine)
        log.error("%d issuance record(s) not committed: %s", len(batch), summary)
        _settle(batch, lambda: BackendUnavailable(f"issuance record not committed: {summary}"))


def _settle(batch: Iterable[_Pending], make_error: Callable[[], BaseException] | None) -> None:
    """Resolve each waiting future on its own loop, with one wake-up per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, builtins.list[_Outcome]] = {}
    for pending in batch:
        # A fresh exception per caller: a shared one would collect everyone's traceback.
        error = None if make_error is None else make_error()
        by_loop.setdefault(pending.loop, []).append((pending.future, error))
    for loop, outcomes in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, outcomes)
        except RuntimeError:
            # That loop is closed, so no one is waiting for these any more.
            log.debug("event loop closed before %d append(s) were answered", len(outcomes))


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


def _summary(error: BaseException, engine: Engine) -> str:
    return error_summary(error, secret=engine.url.password)


# -- rows <-> records ----------------------------------------------------------------------


def _storable(text: str) -> str:
    """``text`` with what PostgreSQL or UTF-8 cannot store written as backslash escapes."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _optional(text: str | None) -> str | None:
    return None if text is None else _storable(text)


def _aware(name: str, value: datetime | None) -> datetime | None:
    if value is not None and value.utcoffset() is None:
        raise InternalError(f"audit record field {name} is a naive datetime: {value.isoformat()}")
    return value


def _to_row(record: AuditRecord) -> dict[str, Any]:
    return {
        "time": _aware("time", record.time),
        "outcome": Outcome(record.outcome).value,
        "api": _storable(record.api),
        "reason": _storable(record.reason),
        "detail": _storable(record.detail),
        "spiffe_id": _optional(record.spiffe_id),
        "serial": _optional(record.serial),
        "fingerprint_sha256": _optional(record.fingerprint_sha256),
        "not_before": _aware("not_before", record.not_before),
        "not_after": _aware("not_after", record.not_after),
        "namespace": _optional(record.namespace),
        "service_account": _optional(record.service_account),
        "pod_name": _optional(record.pod_name),
        "pod_uid": _optional(record.pod_uid),
        "node_name": _optional(record.node_name),
        "peer": _optional(record.peer),
        "csr_sha256": _optional(record.csr_sha256),
    }


def _to_record(row: IssuanceRecordRow) -> AuditRecord:
    return AuditRecord(
        time=row.time,
        outcome=Outcome(row.outcome),
        api=row.api,
        reason=row.reason,
        detail=row.detail,
        spiffe_id=row.spiffe_id,
        serial=row.serial,
        fingerprint_sha256=row.fingerprint_sha256,
        not_before=row.not_before,
        not_after=row.not_after,
        namespace=row.namespace,
        service_account=row.service_account,
        pod_name=row.pod_name,
        pod_uid=row.pod_uid,
        node_name=row.node_name,
        peer=row.peer,
        csr_sha256=row.csr_sha256,
    )
