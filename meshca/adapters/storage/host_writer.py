"""One issuance-record writer per host: the worker processes hand it their records.

``meshca serve`` runs ``HostRecordWriter`` in its supervisor process and gives each worker
one end of a socket pair; a worker appends through ``RecordWriterClient``. The writer
takes whatever every worker has sent, commits it in one transaction (one fsync for the
whole host, and no lock for the workers to queue on), then answers each worker. The
database work, leaf hashing included, runs on the supervisor's core time, not under a
worker's interpreter lock.

Wire format, both ways: frames of a 4-byte big-endian length and a ``marshal`` payload.
A worker sends ``(batch, [record, ...], busy)``, each record ``encode_record``'s tuple
of the ``AuditRecord`` fields and ``busy`` whether that worker has been using most of a
core lately (it has other requests in hand, whose records follow soon); the writer
answers ``(batch, None)`` when all were committed, else ``(batch, [None or why-not,
...])``. Both ends are this program, over a socket pair no one else holds; a frame
that does not decode drops that worker's connection (its pending appends then fail).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import marshal
import selectors
import socket
import struct
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from meshca.adapters.storage.group_commit import BatchCommitter
from meshca.adapters.storage.record_rows import stored_record
from meshca.core.audit import AuditRecord, Outcome
from meshca.core.errors import BackendUnavailable, InternalError

__all__ = ["HostRecordWriter", "RecordWriterClient"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
#: A frame larger than this is a bug, not a batch: the connection is dropped.
MAX_FRAME = 64 * 1024 * 1024
#: A worker that used at least this share of a core over the last ``BUSY_WINDOW``
#: seconds is busy: it has other requests in hand, whose records follow soon.
BUSY_CPU = 0.7
BUSY_WINDOW = 0.05
# Read at most this much per call: a larger request makes Python map a buffer that big
# for every read, whatever arrives.
_RECEIVE_BYTES = 256 * 1024
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def encode_record(record: AuditRecord) -> tuple[Any, ...]:
    """``record`` as plain values ``marshal`` can carry, times as UTC epoch microseconds.

    Raises ``InternalError`` for a naive time, before anything is sent. Text goes as it
    is; the writer makes it storable.
    """
    r = record
    return (
        _micros("time", r.time),
        Outcome(r.outcome).value,
        r.api,
        r.reason,
        r.detail,
        r.spiffe_id,
        r.serial,
        r.fingerprint_sha256,
        _micros("not_before", r.not_before),
        _micros("not_after", r.not_after),
        r.namespace,
        r.service_account,
        r.pod_name,
        r.pod_uid,
        r.node_name,
        r.peer,
        r.csr_sha256,
    )


def decode_record(values: Sequence[Any]) -> AuditRecord:
    """The record ``encode_record`` made ``values`` of (times in UTC)."""
    (
        time_us,
        outcome,
        api,
        reason,
        detail,
        spiffe_id,
        serial,
        fingerprint,
        not_before_us,
        not_after_us,
        namespace,
        service_account,
        pod_name,
        pod_uid,
        node_name,
        peer,
        csr_sha256,
    ) = values
    return AuditRecord(
        time=_time(time_us),
        outcome=Outcome(outcome),
        api=api,
        reason=reason,
        detail=detail,
        spiffe_id=spiffe_id,
        serial=serial,
        fingerprint_sha256=fingerprint,
        not_before=None if not_before_us is None else _time(not_before_us),
        not_after=None if not_after_us is None else _time(not_after_us),
        namespace=namespace,
        service_account=service_account,
        pod_name=pod_name,
        pod_uid=pod_uid,
        node_name=node_name,
        peer=peer,
        csr_sha256=csr_sha256,
    )


def _micros(name: str, value: datetime | None) -> int | None:
    if value is None:
        return None
    if value.utcoffset() is None:
        raise InternalError(f"audit record field {name} is a naive datetime: {value.isoformat()}")
    return (value - _EPOCH) // _MICROSECOND


def _time(micros: int) -> datetime:
    return _EPOCH + micros * _MICROSECOND


def _frame(message: Any) -> bytes:
    payload = marshal.dumps(message)
    return _HEADER.pack(len(payload)) + payload


# -- the writer, in the supervisor ------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Peer:
    """One worker's connection: bytes not yet parsed, and answers not yet sent."""

    sock: socket.socket
    inbox: bytearray = dataclasses.field(default_factory=bytearray)
    outbox: bytearray = dataclasses.field(default_factory=bytearray)
    open: bool = True
    busy: bool = False


@dataclasses.dataclass
class _Batch:
    peer: _Peer
    batch_id: int
    records: list[AuditRecord]


class HostRecordWriter:
    """Commits the records of every connected worker, many per transaction.

    A transaction costs about as much CPU as a dozen records' inserts (every index's last
    page, the log's state, the WAL's frames and its fsync), so while a worker says it is
    busy (it has been using most of a core, so more records follow soon), the writer
    lets records gather for up to ``max_wait`` seconds (or ``max_batch`` records) before
    committing, or until none arrived for ``max_gap``: under load a worker always has
    other requests to work on, so the wait costs latency, not throughput, and saves the
    writer CPU the workers need. When no worker is busy, or the last transaction held a
    single record, it commits at once.

    ``run`` serves until ``stop`` was called and every worker has hung up (their records
    all committed and answered). A failed transaction fails its records, as
    ``BatchCommitter`` decides; the writer then goes on with the next ones.
    """

    def __init__(
        self,
        committer: BatchCommitter,
        connections: Sequence[socket.socket],
        *,
        max_batch: int = 1024,
        max_wait: float = 0.005,
        max_gap: float = 0.002,
    ) -> None:
        self._committer = committer
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._max_gap = max_gap
        self._last_arrival = 0.0
        self._last_batch = 0
        self._first_pending = 0.0
        self._pending_records = 0
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._peers: list[_Peer] = []
        for connection in connections:
            connection.setblocking(False)
            peer = _Peer(connection)
            self._peers.append(peer)
            self._selector.register(connection, selectors.EVENT_READ, peer)
        self._pending: list[_Batch] = []
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Finish once every worker has hung up; call after the workers have exited."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_write.send(b"\0")

    def run(self) -> None:
        try:
            while self._serving():
                for key, events in self._selector.select(self._wait_left()):
                    if key.data is None:
                        with contextlib.suppress(BlockingIOError):
                            self._wake_read.recv(64)
                        continue
                    if events & selectors.EVENT_READ:
                        self._receive(key.data)
                    if events & selectors.EVENT_WRITE:
                        self._send(key.data)
                if self._pending and self._wait_left() == 0:
                    self._commit_pending()
        finally:
            self._committer.close()
            for peer in self._peers:
                self._close(peer)
            self._selector.close()
            self._wake_read.close()
            self._wake_write.close()

    def _wait_left(self) -> float | None:
        """Seconds the pending records may still wait for company; None when none wait."""
        if not self._pending:
            return None
        if self._pending_records >= self._max_batch or self._stopping.is_set():
            return 0
        if self._last_batch <= 1 or not any(peer.busy for peer in self._peers if peer.open):
            return 0
        # Until max_wait, unless the records stopped coming for max_gap: then the few
        # requests in flight are all here, and waiting longer would gain nothing.
        now = time.monotonic()
        return max(
            0.0,
            min(self._first_pending + self._max_wait, self._last_arrival + self._max_gap) - now,
        )

    def _serving(self) -> bool:
        live = any(peer.open for peer in self._peers)
        return live or bool(self._pending) or not self._stopping.is_set()

    def _receive(self, peer: _Peer) -> None:
        try:
            data = peer.sock.recv(_RECEIVE_BYTES)
        except BlockingIOError:
            return
        except OSError as error:
            log.error("record writer: a worker's connection failed: %s", error)
            data = b""
        if not data:
            self._close(peer)
            return
        peer.inbox += data
        while len(peer.inbox) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(peer.inbox)
            if length > MAX_FRAME:
                log.error("record writer: %d-byte frame from a worker; dropping it", length)
                self._close(peer)
                return
            if len(peer.inbox) < _HEADER.size + length:
                return
            payload = bytes(peer.inbox[_HEADER.size : _HEADER.size + length])
            del peer.inbox[: _HEADER.size + length]
            try:
                batch_id, rows, peer.busy = marshal.loads(payload)  # noqa: S302 - our worker
                records = [stored_record(decode_record(r)) for r in rows]
            except (ValueError, TypeError, EOFError, InternalError) as error:
                log.error("record writer: a worker sent a frame it cannot read: %s", error)
                self._close(peer)
                return
            self._last_arrival = time.monotonic()
            if not self._pending:
                self._first_pending = self._last_arrival
            self._pending.append(_Batch(peer, batch_id, records))
            self._pending_records += len(rows)

    def _commit_pending(self) -> None:
        taken: list[_Batch] = []
        count = 0
        while self._pending and (not taken or count < self._max_batch):
            batch = self._pending.pop(0)
            taken.append(batch)
            count += len(batch.records)
        self._pending_records -= count
        self._last_batch = count
        self._first_pending = time.monotonic()
        outcomes = self._committer.commit([r for batch in taken for r in batch.records])
        offset = 0
        for batch in taken:
            mine = outcomes[offset : offset + len(batch.records)]
            offset += len(batch.records)
            answer = None if all(o is None for o in mine) else mine
            if batch.peer.open:
                batch.peer.outbox += _frame((batch.batch_id, answer))
                self._send(batch.peer)

    def _send(self, peer: _Peer) -> None:
        try:
            sent = peer.sock.send(peer.outbox)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(peer)
            return
        del peer.outbox[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.outbox else 0)
        self._selector.modify(peer.sock, events, peer)

    def _close(self, peer: _Peer) -> None:
        if peer.open:
            peer.open = False
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(peer.sock)
            peer.sock.close()


# -- the client, in each worker ---------------------------------------------------------


class RecordWriterClient:
    """``AuditLog`` for a worker process: its records are committed by the host's writer.

    ``append`` returns once the writer has committed the record, and raises
    ``BackendUnavailable`` if it was not committed or the writer is gone; then the
    certificate it describes must not leave. Appends made in one turn of the event loop
    travel in one frame. Cancelling the caller does not withdraw a record already sent.

    The socket is served by event-loop callbacks, without a task or stream objects:
    every certificate passes through here, so each hop of the loop counts.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._window_at = 0.0
        self._window_cpu = 0.0
        self._busy = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox = bytearray()
        self._outbox = bytearray()
        self._queued: list[tuple[tuple[Any, ...], asyncio.Future[None]]] = []
        self._in_flight: dict[int, list[asyncio.Future[None]]] = {}
        self._next_batch = 0
        self._problem: str | None = None
        self._failures = 0
        self._drained: asyncio.Event | None = None
        self._closing = False
        self._gone: asyncio.Event | None = None

    async def start(self) -> None:
        """Serve the socket from this event loop; call once before ``append``."""
        self._loop = asyncio.get_running_loop()
        self._gone = asyncio.Event()
        self._sock.setblocking(False)
        self._loop.add_reader(self._sock.fileno(), self._on_readable)

    @property
    def write_failures(self) -> int:
        """Records the writer refused or never confirmed, since this client was made."""
        return self._failures

    @property
    def writer_problem(self) -> str | None:
        """Why nothing can be appended now (not started, writer gone, closed); else None."""
        if self._loop is None:
            return "the record writer is not connected"
        return self._problem

    async def writer_gone(self) -> str:
        """Wait until the writer hung up or the connection broke (not ``aclose``); why."""
        assert self._gone is not None, "start() first"
        await self._gone.wait()
        return self._problem or "the host's record writer is gone"

    async def append(self, record: AuditRecord) -> None:
        values = encode_record(record)
        if self._problem is not None or self._loop is None:
            self._failures += 1
            raise BackendUnavailable(self._problem or "the record writer is not connected")
        future: asyncio.Future[None] = self._loop.create_future()
        if not self._queued:
            self._loop.call_soon(self._flush)
        self._queued.append((values, future))
        await future

    async def aclose(self) -> None:
        """Wait for the answers to everything sent, then hang up."""
        if self._loop is None:
            return
        self._flush()
        self._closing = True
        if self._in_flight and self._problem is None:
            self._drained = asyncio.Event()
            await self._drained.wait()
        self._disconnect()
        self._problem = self._problem or "the record writer connection is closed"

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        if not queued:
            return
        if self._problem is not None:
            self._fail([future for _, future in queued], self._problem)
            return
        self._next_batch += 1
        self._in_flight[self._next_batch] = [future for _, future in queued]
        busy = self._busy_lately()
        self._send(_frame((self._next_batch, [values for values, _ in queued], busy)))

    def _busy_lately(self) -> bool:
        """Whether this process used at least ``BUSY_CPU`` of a core in its last window."""
        now = time.monotonic()
        if now - self._window_at >= BUSY_WINDOW:
            cpu = time.process_time()
            self._busy = (cpu - self._window_cpu) >= BUSY_CPU * (now - self._window_at)
            self._window_at, self._window_cpu = now, cpu
        return self._busy

    def _send(self, data: bytes) -> None:
        if self._outbox:  # earlier bytes still wait for room in the socket
            self._outbox += data
            return
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self._lost(f"the host's record writer is gone ({error.strerror or error})")
            return
        if sent < len(data):
            assert self._loop is not None
            self._outbox += data[sent:]
            self._loop.add_writer(self._sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        try:
            sent = self._sock.send(self._outbox)
        except BlockingIOError:
            return
        except OSError as error:
            self._lost(f"the host's record writer is gone ({error.strerror or error})")
            return
        del self._outbox[:sent]
        if not self._outbox and self._loop is not None:
            self._loop.remove_writer(self._sock.fileno())

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(_RECEIVE_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost("the host's record writer is gone")
            return
        self._inbox += data
        while len(self._inbox) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._inbox)
            if len(self._inbox) < _HEADER.size + length:
                return
            payload = bytes(self._inbox[_HEADER.size : _HEADER.size + length])
            del self._inbox[: _HEADER.size + length]
            batch_id, outcomes = marshal.loads(payload)  # noqa: S302 - from our supervisor
            self._settle(self._in_flight.pop(batch_id, []), outcomes)
        if self._drained is not None and not self._in_flight:
            self._drained.set()

    def _settle(self, futures: Sequence[asyncio.Future[None]], outcomes: Any) -> None:
        for index, future in enumerate(futures):
            failed = outcomes is not None and outcomes[index] is not None
            self._failures += failed
            if future.done():  # its caller was cancelled
                continue
            if failed:
                future.set_exception(BackendUnavailable(outcomes[index]))
            else:
                future.set_result(None)

    def _lost(self, problem: str) -> None:
        self._problem = self._problem or problem
        if self._in_flight or not self._closing:
            log.error("%s; records in flight are not confirmed", self._problem)
        for futures in self._in_flight.values():
            self._fail(futures, self._problem)
        self._in_flight.clear()
        self._disconnect()
        if self._drained is not None:
            self._drained.set()
        if self._gone is not None:
            self._gone.set()

    def _disconnect(self) -> None:
        if self._loop is not None and self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
            if self._outbox:
                self._loop.remove_writer(self._sock.fileno())
        self._sock.close()

    def _fail(self, futures: Sequence[asyncio.Future[None]], problem: str) -> None:
        self._failures += len(futures)
        for future in futures:
            if not future.done():
                future.set_exception(BackendUnavailable(problem))
