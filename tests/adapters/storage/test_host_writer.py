"""The host's record writer and its worker clients, over real socket pairs and databases."""

from __future__ import annotations

import asyncio
import contextlib
import marshal
import socket
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, event, select, text

from meshca.adapters.storage import SqlAuditLog, create_schema
from meshca.adapters.storage.group_commit import BatchCommitter
from meshca.adapters.storage.host_writer import (
    HostRecordWriter,
    RecordWriterClient,
    decode_record,
    encode_record,
)
from meshca.adapters.storage.record_rows import insert_records, stored_record
from meshca.adapters.storage.tables import IssuanceRecordRow
from meshca.core.audit import AuditRecord, Outcome
from meshca.core.errors import BackendUnavailable, InternalError
from tests.adapters.storage.log_fixtures import make_record

NO_HANG = 15.0


class Host:
    """A writer thread and ``clients`` connected clients on the running loop."""

    def __init__(self, engine: Engine, clients: int) -> None:
        pairs = [socket.socketpair() for _ in range(clients)]
        committer = BatchCommitter(engine, insert_records, what="issuance record")
        self.writer = HostRecordWriter(committer, [ours for ours, _ in pairs])
        self.thread = threading.Thread(target=self.writer.run, daemon=True)
        self.clients = [RecordWriterClient(theirs) for _, theirs in pairs]

    async def start(self) -> None:
        self.thread.start()
        for client in self.clients:
            await client.start()

    async def stop(self) -> None:
        for client in self.clients:
            await client.aclose()
        self.writer.stop()
        await asyncio.to_thread(self.thread.join, NO_HANG)
        assert not self.thread.is_alive(), "the writer did not finish"


@pytest.fixture
async def host(engine: Engine) -> AsyncIterator[Host]:
    host = Host(engine, clients=2)
    await host.start()
    yield host
    await host.stop()


def leaves(engine: Engine) -> list[tuple[int, str | None]]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(IssuanceRecordRow.leaf_index, IssuanceRecordRow.serial).order_by(
                IssuanceRecordRow.leaf_index
            )
        ).all()
    return [(int(r.leaf_index), r.serial) for r in rows]


async def test_records_from_every_worker_are_committed_as_one_gapless_log(
    host: Host, engine: Engine
) -> None:
    first, second = host.clients
    await asyncio.wait_for(
        asyncio.gather(
            *(first.append(make_record(n)) for n in range(0, 300, 2)),
            *(second.append(make_record(n)) for n in range(1, 300, 2)),
        ),
        NO_HANG,
    )
    stored = leaves(engine)
    assert [index for index, _ in stored] == list(range(300))
    expected = {make_record(n).serial for n in range(300)}
    assert {serial for _, serial in stored} == expected


async def test_what_is_read_back_is_what_was_appended(host: Host, engine: Engine) -> None:
    records = [make_record(n) for n in range(12)]
    await asyncio.gather(*(host.clients[n % 2].append(r) for n, r in enumerate(records)))
    reader = SqlAuditLog(engine)
    try:
        listed = await reader.list(limit=100)
    finally:
        await reader.aclose()
    assert sorted(listed, key=lambda r: r.time) == records


async def test_concurrent_appends_share_commits(engine: Engine) -> None:
    commits = 0

    def count_commit(_connection: Any) -> None:
        nonlocal commits
        commits += 1

    event.listen(engine, "commit", count_commit)
    host = Host(engine, clients=2)
    await host.start()
    try:
        await asyncio.wait_for(
            asyncio.gather(*(host.clients[n % 2].append(make_record(n)) for n in range(600))),
            NO_HANG,
        )
    finally:
        await host.stop()
        event.remove(engine, "commit", count_commit)
    assert commits <= 30, f"600 records took {commits} transactions"


async def test_one_unstorable_record_fails_alone(engine: Engine) -> None:
    def refuse_poison(_conn: Any, _cursor: Any, _statement: str, parameters: Any, *_: Any) -> None:
        if "poison" in repr(parameters):
            raise RuntimeError("the database refuses this record")

    event.listen(engine, "before_cursor_execute", refuse_poison)
    host = Host(engine, clients=1)
    await host.start()
    (client,) = host.clients
    try:
        results = await asyncio.wait_for(
            asyncio.gather(
                *(client.append(make_record(n)) for n in range(10)),
                client.append(make_record(10, detail="poison")),
                *(client.append(make_record(n)) for n in range(11, 21)),
                return_exceptions=True,
            ),
            NO_HANG,
        )
    finally:
        await host.stop()
        event.remove(engine, "before_cursor_execute", refuse_poison)
    assert isinstance(results[10], BackendUnavailable)
    assert "refuses this record" in str(results[10])
    assert results[:10] + results[11:] == [None] * 20
    assert [index for index, _ in leaves(engine)] == list(range(20))


async def test_lost_table_fails_appends_then_recovers(host: Host, engine: Engine) -> None:
    client = host.clients[0]
    await client.append(make_record(0))
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE issuance_record"))
    appends = (client.append(make_record(n)) for n in range(1, 6))
    results = await asyncio.wait_for(asyncio.gather(*appends, return_exceptions=True), NO_HANG)
    assert all(isinstance(r, BackendUnavailable) for r in results), results
    # Refused records are counted (readiness reads this); the connection is still fine.
    assert (client.write_failures, client.writer_problem) == (5, None)
    assert host.clients[1].write_failures == 0
    create_schema(engine)
    await asyncio.wait_for(client.append(make_record(99)), NO_HANG)
    assert [serial for _, serial in leaves(engine)] == [make_record(99).serial]
    assert client.write_failures == 5


async def test_writer_gone_fails_pending_and_later_appends(engine: Engine) -> None:
    ours, theirs = socket.socketpair()
    client = RecordWriterClient(theirs)
    assert client.writer_problem == "the record writer is not connected"
    await client.start()
    assert client.writer_problem is None
    pending = asyncio.ensure_future(client.append(make_record(0)))
    gone = asyncio.ensure_future(client.writer_gone())
    await asyncio.sleep(0.05)
    assert not pending.done()  # nobody answers yet
    assert not gone.done()
    ours.close()
    with pytest.raises(BackendUnavailable, match="record writer is gone"):
        await asyncio.wait_for(pending, NO_HANG)
    # What a worker waits on, to stop when its supervisor was killed.
    assert await asyncio.wait_for(gone, NO_HANG) == "the host's record writer is gone"
    with pytest.raises(BackendUnavailable, match="record writer is gone"):
        await client.append(make_record(1))
    assert client.writer_problem == "the host's record writer is gone"
    assert client.write_failures == 2
    await client.aclose()


async def test_closing_is_not_the_writer_gone(host: Host) -> None:
    client = host.clients[0]
    gone = asyncio.ensure_future(client.writer_gone())
    await client.aclose()
    await asyncio.sleep(0.05)
    assert not gone.done()
    gone.cancel()


async def test_cancelled_append_is_still_committed(host: Host, engine: Engine) -> None:
    client = host.clients[0]
    task = asyncio.ensure_future(client.append(make_record(0)))
    await asyncio.sleep(0)  # sent with this turn of the loop
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await asyncio.wait_for(client.append(make_record(1)), NO_HANG)
    assert len(leaves(engine)) == 2


async def test_close_waits_for_answers(engine: Engine) -> None:
    host = Host(engine, clients=1)
    await host.start()
    appends = [asyncio.ensure_future(host.clients[0].append(make_record(n))) for n in range(50)]
    await asyncio.sleep(0)
    await host.stop()
    assert all(a.done() and a.exception() is None for a in appends)
    assert len(leaves(engine)) == 50


async def test_naive_time_is_refused_before_it_is_sent(host: Host, engine: Engine) -> None:
    with pytest.raises(InternalError, match="naive"):
        await host.clients[0].append(make_record(0, time=datetime(2030, 1, 1)))
    await host.clients[0].append(make_record(1))
    assert len(leaves(engine)) == 1


def test_writer_stops_with_no_workers(engine: Engine) -> None:
    committer = BatchCommitter(engine, insert_records, what="issuance record")
    writer = HostRecordWriter(committer, [])
    thread = threading.Thread(target=writer.run, daemon=True)
    thread.start()
    writer.stop()
    thread.join(NO_HANG)
    assert not thread.is_alive()


def test_oversized_frame_drops_that_worker(engine: Engine) -> None:
    ours, theirs = socket.socketpair()
    committer = BatchCommitter(engine, insert_records, what="issuance record")
    writer = HostRecordWriter(committer, [ours])
    thread = threading.Thread(target=writer.run, daemon=True)
    thread.start()
    theirs.sendall((2**31).to_bytes(4, "big"))
    theirs.settimeout(NO_HANG)
    assert theirs.recv(1) == b""  # the writer hung up on it
    writer.stop()
    thread.join(NO_HANG)
    assert not thread.is_alive()
    theirs.close()


texts = st.text(max_size=40)
aware = st.datetimes(
    min_value=datetime(1971, 1, 1),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=-7, minutes=-30))]),
)


@given(
    time=aware,
    api=texts,
    detail=texts,
    spiffe_id=st.none() | texts,
    not_after=st.none() | aware,
    outcome=st.sampled_from(Outcome),
)
def test_wire_round_trip(
    time: datetime,
    api: str,
    detail: str,
    spiffe_id: str | None,
    not_after: datetime | None,
    outcome: Outcome,
) -> None:
    record = stored_record(
        AuditRecord(
            time=time,
            outcome=outcome,
            api=api,
            reason="r",
            detail=detail,
            spiffe_id=spiffe_id,
            not_after=not_after,
        )
    )
    decoded = decode_record(encode_record(record))
    assert decoded == record
    assert decoded.time.tzinfo is UTC


def _frame_of(message: Any) -> bytes:
    payload = marshal.dumps(message)
    return len(payload).to_bytes(4, "big") + payload


def _answer(sock: socket.socket) -> Any:
    header = b""
    while len(header) < 4:
        header += sock.recv(4 - len(header))
    length = int.from_bytes(header, "big")
    payload = b""
    while len(payload) < length:
        payload += sock.recv(length - len(payload))
    return marshal.loads(payload)


def test_busy_workers_share_commits_and_still_get_answers(engine: Engine) -> None:
    """Frames from a worker that says it is busy wait (at most max_wait) for company."""
    commits = 0

    def count_commit(_connection: Any) -> None:
        nonlocal commits
        commits += 1

    event.listen(engine, "commit", count_commit)
    ours, theirs = socket.socketpair()
    committer = BatchCommitter(engine, insert_records, what="issuance record")
    writer = HostRecordWriter(committer, [ours], max_wait=0.5, max_gap=0.5)
    thread = threading.Thread(target=writer.run, daemon=True)
    thread.start()
    theirs.settimeout(NO_HANG)
    try:
        # Two records in one frame make the last batch more than one record...
        first = [encode_record(stored_record(make_record(n))) for n in range(2)]
        theirs.sendall(_frame_of((1, first, True)))
        assert _answer(theirs) == (1, None)
        # ...so busy frames now gather: three frames, sent apart, share one commit.
        before = commits
        for batch in range(2, 5):
            theirs.sendall(_frame_of((batch, [encode_record(make_record(batch + 10))], True)))
            time.sleep(0.02)
        assert sorted(_answer(theirs) for _ in range(3)) == [(2, None), (3, None), (4, None)]
        assert commits - before == 1
    finally:
        theirs.close()
        writer.stop()
        thread.join(NO_HANG)
        event.remove(engine, "commit", count_commit)
    assert not thread.is_alive()
    assert len(leaves(engine)) == 5


def test_unreadable_frame_drops_that_worker_only(engine: Engine) -> None:
    bad, bad_theirs = socket.socketpair()
    good, good_theirs = socket.socketpair()
    committer = BatchCommitter(engine, insert_records, what="issuance record")
    writer = HostRecordWriter(committer, [bad, good])
    thread = threading.Thread(target=writer.run, daemon=True)
    thread.start()
    for sock in (bad_theirs, good_theirs):
        sock.settimeout(NO_HANG)
    try:
        bad_theirs.sendall(_frame_of(("not", "a batch")))
        assert bad_theirs.recv(1) == b""  # the writer hung up on it
        good_theirs.sendall(_frame_of((1, [encode_record(make_record(0))], False)))
        assert _answer(good_theirs) == (1, None)
    finally:
        bad_theirs.close()
        good_theirs.close()
        writer.stop()
        thread.join(NO_HANG)
    assert not thread.is_alive()
    assert len(leaves(engine)) == 1
