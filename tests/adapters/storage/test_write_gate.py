"""Writers to one SQLite file queue on a file lock instead of SQLite's polling busy wait."""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from pathlib import Path

import pytest

from meshca.adapters.storage.audit_log import SqlAuditLog
from meshca.adapters.storage.engine import make_engine
from meshca.adapters.storage.tables import create_schema
from tests.adapters.storage.test_audit_log import count_rows, record


async def test_a_held_gate_holds_the_commit_and_its_release_lets_it_through(
    tmp_path: Path,
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'meshca.db'}")
    create_schema(engine)
    store = SqlAuditLog(engine)
    gate = os.open(tmp_path / "meshca.db.write-lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(gate, fcntl.LOCK_EX)  # as another process's writer would
        pending = asyncio.create_task(store.append(record(1)))
        await asyncio.sleep(0.3)
        assert not pending.done()
        assert count_rows(engine) == 0
        released = time.monotonic()
        fcntl.flock(gate, fcntl.LOCK_UN)
        await asyncio.wait_for(pending, 5)
        # Woken by the release itself, not by a polling sleep.
        assert time.monotonic() - released < 0.2
        assert count_rows(engine) == 1
    finally:
        os.close(gate)
        await store.aclose()
        engine.dispose()


@pytest.mark.integration
def test_postgres_needs_no_gate(postgres_url: str) -> None:
    from contextlib import nullcontext

    from meshca.adapters.storage.engine import write_gate

    engine = make_engine(postgres_url)
    try:
        assert isinstance(write_gate(engine), nullcontext)
    finally:
        engine.dispose()
