"""The verifiable log on SQLite and PostgreSQL: one sequence of leaves from many writers,
signed heads, proofs that verify, tampering found, and pruning that keeps proofs valid."""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, select, text, update

from meshca.adapters.storage import SqlAuditLog, make_engine
from meshca.adapters.storage.tables import IssuanceRecordRow
from meshca.adapters.storage.transparency import BLOCK, SqlTransparencyLog
from meshca.core.audit import entry_leaf_data
from meshca.core.errors import InvalidRequest
from meshca.core.log_audit import FindingKind
from meshca.core.merkle import leaf_hash, verify_consistency, verify_inclusion
from tests.adapters.storage.log_fixtures import T0, make_record
from tests.adapters.storage.test_audit_query import append_all

REPO_ROOT = Path(__file__).resolve().parents[3]
KEY = ec.generate_private_key(ec.SECP256R1())


def leaf_indexes(engine: Engine) -> list[int]:
    with engine.connect() as connection:
        rows = connection.execute(select(IssuanceRecordRow.leaf_index))
        return sorted(int(i) for (i,) in rows)


_CHILD = """
import asyncio, sys
from datetime import UTC, datetime
from meshca.adapters.storage import SqlAuditLog, make_engine
from meshca.core.audit import AuditRecord, Outcome

async def main(url, name, count):
    engine = make_engine(url)
    store = SqlAuditLog(engine)
    now = datetime.now(UTC)
    records = [AuditRecord(time=now, outcome=Outcome.ISSUED, api=name, reason="ok",
                           serial=f"{name}-{n}") for n in range(count)]
    await asyncio.gather(*(store.append(r) for r in records))
    await store.aclose()
    engine.dispose()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_many_processes_write_one_gapless_log(database_url: str, engine: Engine) -> None:
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CHILD, database_url, f"proc{i}", "120", cwd=REPO_ROOT
        )
        for i in range(3)
    ]
    codes = await asyncio.wait_for(asyncio.gather(*(c.wait() for c in children)), 60)
    assert codes == [0, 0, 0]

    assert leaf_indexes(engine) == list(range(360))
    log = SqlTransparencyLog(engine, KEY)
    assert log.state().tree_size == 360
    log.sign_head(T0)
    report = log.verify(KEY.public_key())
    assert report.ok, report.findings
    assert (report.leaves_checked, report.heads_checked) == (360, 1)


def test_heads_and_proofs_verify(engine: Engine) -> None:
    append_all(engine, [make_record(n) for n in range(37)])
    log = SqlTransparencyLog(engine, KEY)
    first = log.sign_head(T0)
    append_all(engine, [make_record(n) for n in range(37, 100)])
    second = log.sign_head(T0 + timedelta(seconds=1))

    assert (first.head.size, second.head.size) == (37, 100)
    assert log.latest_head() == second
    for index in (0, 1, 15, 16, 36):
        for signed in (first, second):
            proof = log.inclusion_proof(index, signed.head.size)
            leaf = log.leaves(index).__next__()
            assert verify_inclusion(
                leaf_hash(entry_leaf_data(leaf.entry)),
                index,
                signed.head.size,
                proof.path,
                signed.head.root_hash,
            )
    for old in (first, second):
        proof = log.consistency_proof(old.head.size, second.head.size)
        assert verify_consistency(
            old.head.size, 100, old.head.root_hash, second.head.root_hash, proof.path
        )
    # Proofs past the cache (leaves after the last head) are computed, not read.
    append_all(engine, [make_record(n) for n in range(100, 110)])
    root = log.root(110)
    proof = log.consistency_proof(100, 110)
    assert verify_consistency(100, 110, second.head.root_hash, root, proof.path)
    with pytest.raises(InvalidRequest):
        log.inclusion_proof(5, 1000)
    with pytest.raises(InvalidRequest):
        log.consistency_proof(10, 5)


def _tamper(engine: Engine, statement: str) -> None:
    with engine.begin() as connection:
        connection.execute(text(statement))


@pytest.mark.parametrize(
    ("tampering", "kind", "leaf"),
    [
        pytest.param(
            "UPDATE issuance_record SET spiffe_id = 'spiffe://mesh.test/ns/evil/sa/x' "
            "WHERE leaf_index = 23",
            FindingKind.EDITED,
            23,
            id="edited-row",
        ),
        pytest.param(
            "UPDATE issuance_record SET time = time WHERE leaf_index = 5; ",
            None,
            None,
            id="no-op-update",
        ),
        pytest.param(
            "DELETE FROM issuance_record WHERE leaf_index = 40",
            FindingKind.MISSING,
            40,
            id="deleted",
        ),
        pytest.param(
            "DELETE FROM issuance_record WHERE leaf_index >= 60", FindingKind.MISSING, 60, id="tail"
        ),
        pytest.param(
            "UPDATE issuance_record SET leaf_index = CASE leaf_index WHEN 31 THEN 32 "
            "ELSE 31 END WHERE leaf_index IN (31, 32)",
            FindingKind.EDITED,
            31,
            id="reordered",
        ),
    ],
)
def test_verify_names_the_first_tampered_leaf(
    engine: Engine, tampering: str, kind: FindingKind | None, leaf: int | None
) -> None:
    append_all(engine, [make_record(n) for n in range(70)])
    log = SqlTransparencyLog(engine, KEY)
    log.sign_head(T0)
    assert log.verify(KEY.public_key()).ok
    if "leaf_index = CASE" in tampering:
        # Swap through a free index: the unique constraint holds at every step.
        _tamper(engine, "UPDATE issuance_record SET leaf_index = -1 WHERE leaf_index = 31")
        _tamper(engine, "UPDATE issuance_record SET leaf_index = 31 WHERE leaf_index = 32")
        _tamper(engine, "UPDATE issuance_record SET leaf_index = 32 WHERE leaf_index = -1")
    else:
        _tamper(engine, tampering)

    report = log.verify(KEY.public_key())
    if kind is None:
        assert report.ok, report.findings
        return
    assert not report.ok
    first = report.findings[0]
    assert (first.kind, first.leaf_index) == (kind, leaf), report.findings
    assert f"leaf {leaf}" in first.message or f"leaves {leaf}" in first.message


def test_a_row_rewritten_with_its_leaf_hash_is_found_by_block_and_head(engine: Engine) -> None:
    append_all(engine, [make_record(n) for n in range(50)])
    log = SqlTransparencyLog(engine, KEY)
    log.sign_head(T0)
    forged = make_record(20, spiffe_id="spiffe://mesh.test/ns/evil/sa/x")
    from meshca.core.audit import LogEntry

    forged_hash = leaf_hash(entry_leaf_data(LogEntry(20, forged)))
    with engine.begin() as connection:
        connection.execute(
            update(IssuanceRecordRow)
            .where(IssuanceRecordRow.leaf_index == 20)
            .values(spiffe_id=forged.spiffe_id, leaf_hash=forged_hash)
        )

    report = log.verify(KEY.public_key())
    kinds = [(f.kind, f.leaf_index) for f in report.findings]
    assert kinds[0] == (FindingKind.REWRITTEN, 16)
    assert (FindingKind.HEAD_MISMATCH, None) in kinds


def test_a_forged_head_signature_is_found(engine: Engine) -> None:
    append_all(engine, [make_record(n) for n in range(5)])
    log = SqlTransparencyLog(engine, KEY)
    log.sign_head(T0)
    other = ec.generate_private_key(ec.SECP256R1())
    SqlTransparencyLog(engine, other).sign_head(T0 + timedelta(seconds=1))

    report = log.verify(KEY.public_key())
    assert [f.kind for f in report.findings] == [FindingKind.BAD_SIGNATURE]


def test_pruning_keeps_the_rest_provable(engine: Engine) -> None:
    records = [make_record(n) for n in range(100)]
    append_all(engine, records)
    log = SqlTransparencyLog(engine, KEY)
    early = log.sign_head(T0)

    cutoff = records[42].time  # leaves 0..41 are old enough; whole blocks go
    assert log.prune(cutoff) == 32 == 2 * BLOCK
    assert leaf_indexes(engine) == list(range(32, 100))
    assert log.prune(cutoff) == 32  # idempotent
    append_all(engine, [make_record(n) for n in range(100, 120)])
    later = log.sign_head(T0 + timedelta(seconds=5))

    state = log.state()
    assert (state.tree_size, state.pruned_below, len(state.frontier)) == (120, 32, 1)
    for index in (32, 33, 64, 99, 119):
        leaf = next(log.leaves(index))
        for signed in (early, later) if index < 100 else (later,):
            proof = log.inclusion_proof(index, signed.head.size)
            assert verify_inclusion(
                leaf_hash(entry_leaf_data(leaf.entry)),
                index,
                signed.head.size,
                proof.path,
                signed.head.root_hash,
            )
    proof = log.consistency_proof(100, 120)
    assert verify_consistency(100, 120, early.head.root_hash, later.head.root_hash, proof.path)
    with pytest.raises(InvalidRequest, match="no longer in the issuance record"):
        log.inclusion_proof(3, 120)
    report = log.verify(KEY.public_key())
    assert report.ok, report.findings
    assert report.leaves_checked == 88


def test_head_needs_a_key(engine: Engine, tmp_path: Path) -> None:
    from meshca.core.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="no log key"):
        SqlTransparencyLog(engine).sign_head(T0)


def test_appends_keep_working_without_migrations(tmp_path: Path) -> None:
    # A schema made by create_schema has no state row: the first write makes it.
    from meshca.adapters.storage import create_schema, sqlite_url_for

    engine = make_engine(sqlite_url_for(tmp_path))
    create_schema(engine)

    async def run() -> None:
        store = SqlAuditLog(engine)
        await asyncio.gather(*(store.append(make_record(n)) for n in range(20)))
        await store.aclose()

    asyncio.run(run())
    assert leaf_indexes(engine) == list(range(20))
    engine.dispose()
