"""One issuance-record writer per host: the worker processes hand it their records.

``meshca serve`` runs ``HostRecordWriter`` in its supervisor process and gives each worker
one end of a socket pair; a worker appends through ``RecordWriterClient``. The writer
takes whatever every worker has sent, commits it in one transaction (one fsync for the
whole host, and no lock for the workers to queue on), then answers each worker. The
database work, leaf hashing included, runs on the supervisor's core time, not under a
worker's interpreter lock.

Wire format, both ways: frames of a 4-byte big-endian length and a ``marshal`` payload.
A worker sends ``(batch, [record, ...])``, each record the ``AuditRecord`` fields in
order with times as UTC epoch microseconds; the writer answers ``(batch, None)`` when
all were committed, else ``(batch, [None or why-not, ...])``. Both ends are this
program, over a socket pair no one else holds.
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
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from meshca.adapters.storage.group_commit import BatchCommitter
from meshca.adapters.storage.record_rows import stored_record
from meshca.core.audit import AuditRecord, Outcome
from meshca.core.errors import BackendUnavailable

__all__ = ["HostRecordWriter", "RecordWriterClient"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
#: A frame larger than this is a bug, not a batch: the connection is dropped.
MAX_FRAME = 64 * 1024 * 1024
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_FIELDS = tuple(f.name for f in dataclasses.fields(AuditRecord))
_TIMES = frozenset({"time", "not_before", "not_after"})


def encode_record(record: AuditRecord) -> tuple[Any, ...]:
    """``record`` (already ``stored_record``) as plain values ``marshal`` can carry."""
    values: list[Any] = []
    for name in _FIELDS:
        value = getattr(record, name)
        if name in _TIMES and value is not None:
            value = (value - _EPOCH) // _MICROSECOND
        elif name == "outcome":
            value = value.value
        values.append(value)
    return tuple(values)


def decode_record(values: Sequence[Any]) -> AuditRecord:
    fields: dict[str, Any] = dict(zip(_FIELDS, values, strict=True))
    for name in _TIMES:
        if fields[name] is not None:
            fields[name] = _EPOCH + fields[name] * _MICROSECOND
    fields["outcome"] = Outcome(fields["outcome"])
    return AuditRecord(**fields)


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


@dataclasses.dataclass
class _Batch:
    peer: _Peer
    batch_id: int
    records: list[AuditRecord]


class HostRecordWriter:
    """Commits the records of every connected worker, as many per transaction as are waiting.

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
    ) -> None:
        self._committer = committer
        self._max_batch = max_batch
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
                # Block only when nothing waits to be written: then a commit's worth
                # of records gathers in the sockets while the previous one runs.
                for key, events in self._selector.select(None if not self._pending else 0):
                    if key.data is None:
                        with contextlib.suppress(BlockingIOError):
                            self._wake_read.recv(64)
                        continue
                    if events & selectors.EVENT_READ:
                        self._receive(key.data)
                    if events & selectors.EVENT_WRITE:
                        self._send(key.data)
                if self._pending:
                    self._commit_pending()
        finally:
            for peer in self._peers:
                self._close(peer)
            self._selector.close()
            self._wake_read.close()
            self._wake_write.close()

    def _serving(self) -> bool:
        live = any(peer.open for peer in self._peers)
        return live or bool(self._pending) or not self._stopping.is_set()

    def _receive(self, peer: _Peer) -> None:
        try:
            data = peer.sock.recv(1 << 20)
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
            batch_id, rows = marshal.loads(payload)  # noqa: S302 - from our own worker
            self._pending.append(_Batch(peer, batch_id, [decode_record(r) for r in rows]))

    def _commit_pending(self) -> None:
        taken: list[_Batch] = []
        count = 0
        while self._pending and (not taken or count < self._max_batch):
            batch = self._pending.pop(0)
            taken.append(batch)
            count += len(batch.records)
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
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._queued: list[tuple[tuple[Any, ...], asyncio.Future[None]]] = []
        self._in_flight: dict[int, list[asyncio.Future[None]]] = {}
        self._next_batch = 0
        self._problem: str | None = None
        self._drained: asyncio.Event | None = None
        self._closing = False

    async def start(self) -> None:
        """Connect the socket to this event loop; call once before ``append``."""
        reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)
        self._reader_task = asyncio.create_task(self._read_answers(reader))

    async def append(self, record: AuditRecord) -> None:
        values = encode_record(stored_record(record))
        if self._problem is not None or self._writer is None:
            raise BackendUnavailable(self._problem or "the record writer is not connected")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._queued:
            asyncio.get_running_loop().call_soon(self._flush)
        self._queued.append((values, future))
        await future

    async def aclose(self) -> None:
        """Wait for the answers to everything sent, then hang up."""
        if self._writer is None:
            return
        self._flush()
        self._closing = True
        if self._in_flight and self._problem is None:
            self._drained = asyncio.Event()
            await self._drained.wait()
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
        if self._reader_task is not None:
            await asyncio.gather(self._reader_task, return_exceptions=True)
        self._problem = self._problem or "the record writer connection is closed"

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        if not queued:
            return
        if self._problem is not None or self._writer is None:
            self._fail([future for _, future in queued], self._problem or "not connected")
            return
        self._next_batch += 1
        self._in_flight[self._next_batch] = [future for _, future in queued]
        self._writer.write(_frame((self._next_batch, [values for values, _ in queued])))

    async def _read_answers(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (length,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                batch_id, outcomes = marshal.loads(await reader.readexactly(length))  # noqa: S302
                futures = self._in_flight.pop(batch_id, [])
                for index, future in enumerate(futures):
                    if future.done():  # its caller was cancelled
                        continue
                    if outcomes is None or outcomes[index] is None:
                        future.set_result(None)
                    else:
                        future.set_exception(BackendUnavailable(outcomes[index]))
                if self._drained is not None and not self._in_flight:
                    self._drained.set()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        self._problem = self._problem or "the host's record writer is gone"
        if self._in_flight or not self._closing:
            log.error("%s; records in flight are not confirmed", self._problem)
        for futures in self._in_flight.values():
            self._fail(futures, self._problem)
        self._in_flight.clear()
        if self._drained is not None:
            self._drained.set()

    @staticmethod
    def _fail(futures: Sequence[asyncio.Future[None]], problem: str) -> None:
        for future in futures:
            if not future.done():
                future.set_exception(BackendUnavailable(problem))
