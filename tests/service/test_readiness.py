"""The readiness loop over real keys, a fake record log and a database ping we control."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from meshca.core.authority import Authority
from meshca.core.errors import AuthorityNotReady, BackendUnavailable
from meshca.core.readiness import Readiness
from meshca.service.readiness import ReadinessChecker
from tests.core.builders import build_pki
from tests.fakes import MemoryAuditLog

AUTHORITY = build_pki().authority


class Database:
    """A ping that fails while ``down`` is set, or hangs while ``hang`` is clear."""

    def __init__(self) -> None:
        self.down: str | None = None
        self.hang = threading.Event()
        self.hang.set()
        self.pings = 0

    def ping(self) -> None:
        self.pings += 1
        if not self.hang.wait(10):
            raise AssertionError("the test never released the ping")
        if self.down is not None:
            raise BackendUnavailable(self.down)


class Reported:
    """Each status ``on_change`` was given, in order."""

    def __init__(self) -> None:
        self.changes: list[str | None] = []
        self.changed = asyncio.Event()

    async def __call__(self, readiness: Readiness) -> None:
        self.changes.append(readiness.problem)
        self.changed.set()


def checker(
    database: Database,
    writer: MemoryAuditLog,
    reported: Reported,
    authority: Callable[[], Authority] = lambda: AUTHORITY,
    **options: Any,
) -> ReadinessChecker:
    return ReadinessChecker(
        authority=authority,
        ping_database=database.ping,
        writer=writer,
        on_change=reported,
        interval=options.pop("interval", 60.0),
        **options,
    )


async def test_database_outage_and_recovery_are_each_reported_once() -> None:
    database, reported = Database(), Reported()
    readiness = checker(database, MemoryAuditLog(), reported)
    assert not readiness.status.ready  # until the first round
    assert (await readiness.check()).ready
    database.down = "connection refused"
    for _ in range(3):
        assert (await readiness.check()).problem == "database: connection refused"
    database.down = None
    assert (await readiness.check()).ready
    assert reported.changes == [None, "database: connection refused", None]


async def test_no_issuer_means_not_ready() -> None:
    state: dict[str, Authority | None] = {"issuer": None}

    def current() -> Authority:
        issuer = state["issuer"]
        if issuer is None:
            raise AuthorityNotReady("no active intermediate CA")
        return issuer

    readiness = checker(Database(), MemoryAuditLog(), Reported(), authority=current)
    assert (await readiness.check()).problem == "cannot sign: no active intermediate CA"
    state["issuer"] = AUTHORITY
    assert (await readiness.check()).ready


async def test_a_remote_key_signs_through_offload() -> None:
    signed_on: list[str] = []
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sign") as executor:

        def offload(fn: Callable[[], Any]) -> Any:
            def where() -> Any:
                signed_on.append(threading.current_thread().name)
                return fn()

            return loop.run_in_executor(executor, where)

        readiness = checker(Database(), MemoryAuditLog(), Reported(), offload=offload)
        assert (await readiness.check()).ready
    assert signed_on == ["sign_0"]


async def test_failed_writes_count_for_one_round_and_a_lost_writer_until_it_is_back() -> None:
    writer, reported = MemoryAuditLog(), Reported()
    readiness = checker(Database(), writer, reported)
    assert (await readiness.check()).ready
    writer.failures += 1  # an append was refused
    assert "not committed since the last check" in str((await readiness.check()).problem)
    assert (await readiness.check()).ready
    writer.problem = "the host's record writer is gone"
    assert (await readiness.check()).problem == "record writer: the host's record writer is gone"
    assert not (await readiness.check()).ready
    writer.problem = None
    assert (await readiness.check()).ready
    assert len(reported.changes) == 5


async def test_a_hung_probe_fails_the_round_and_is_not_started_again() -> None:
    database = Database()
    readiness = checker(database, MemoryAuditLog(), Reported(), timeout=0.1)
    database.hang.clear()
    try:
        assert (await readiness.check()).problem == "database: no answer within 0.1s"
        assert (await readiness.check()).problem == "database: no answer within 0.1s"
        assert database.pings == 1
    finally:
        database.hang.set()
    await asyncio.sleep(0.05)  # the hung ping finishes in its thread
    assert (await readiness.check()).ready
    assert database.pings == 2


async def test_run_checks_every_interval_until_stopped() -> None:
    database, reported = Database(), Reported()
    readiness = checker(database, MemoryAuditLog(), reported, interval=0.01)
    stop = asyncio.Event()
    task = asyncio.create_task(readiness.run(stop))
    database.down = "down"
    await asyncio.wait_for(reported.changed.wait(), 5)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert reported.changes == ["database: down", "stopping"]
    assert database.pings >= 1
