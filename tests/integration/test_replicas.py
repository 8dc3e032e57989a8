"""Three ``meshca serve`` replicas, three data directories, one PostgreSQL.

Real processes throughout: the replicas share only ``--database-url`` and the
key-encryption key, and a fleet of proxies spread over them checks every peer's chain
(against its own bundle and against the bundle of every live replica) every quarter
second while the CA rotates with lifetimes of seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from meshca.adapters.storage import make_engine
from meshca.adapters.storage.journal import SqlAuthorityJournal
from meshca.core.rotation import AuthorityKind, AuthoritySet, AuthorityState
from tests.integration.log_checks import assert_log_complete, audit_verify
from tests.integration.replicas import (
    Fleet,
    FleetReport,
    Replica,
    leaf_serials_received,
    start_replica,
    write_kek,
)
from tests.integration.server_harness import TRUST_DOMAIN, TokenMinter

pytestmark = pytest.mark.integration

PROXIES = 9


@pytest.fixture
def database(postgres_database_url: str) -> Iterator[tuple[str, Engine]]:
    engine = make_engine(postgres_database_url)
    yield postgres_database_url, engine
    engine.dispose()


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    """Every replica a test starts; killed at the end whatever happened."""
    started: list[Replica] = []
    yield started
    with contextlib.ExitStack() as stack:  # each one, even if another's kill fails
        for replica in started:
            stack.callback(replica.kill)


def _journal(engine: Engine) -> AuthoritySet:
    return SqlAuthorityJournal(engine).load()


def _activated(authorities: AuthoritySet, kind: AuthorityKind) -> int:
    return sum(1 for e in authorities.entries if e.kind == kind and e.activated_at is not None)


async def _run_until(
    fleet: Fleet, engine: Engine, roots: int, intermediates: int, limit: float
) -> tuple[FleetReport, AuthoritySet]:
    """Run the fleet until ``roots`` roots and ``intermediates`` intermediates have been
    active, then two more seconds of checks."""
    stop = asyncio.Event()
    running = asyncio.create_task(fleet.run(stop))
    deadline = time.monotonic() + limit
    try:
        while True:
            authorities = await asyncio.to_thread(_journal, engine)
            if (
                _activated(authorities, AuthorityKind.ROOT) >= roots
                and _activated(authorities, AuthorityKind.INTERMEDIATE) >= intermediates
            ):
                break
            assert time.monotonic() < deadline, f"rotations did not happen: {authorities}"
            assert not running.done(), running.exception()
            await asyncio.sleep(0.25)
        await asyncio.sleep(2)
    finally:
        stop.set()
        report = await running
        await fleet.close()
    return report, await asyncio.to_thread(_journal, engine)


def _audit_verify(replica: Replica) -> tuple[int, str]:
    token_file = replica.data_dir.parent / "audit-token"
    return audit_verify("--server", replica.target, "--plaintext", "--token-file", str(token_file))


def _assert_fleet_held(report: FleetReport) -> None:
    assert not report.failures, "\n".join(report.failures[:10])
    assert not report.sequence_conflicts, report.sequence_conflicts[:5]
    assert report.rounds > 10 and report.verifications > 100


async def test_three_replicas_through_two_root_rotations(
    tmp_path: Path, database: tuple[str, Engine], replicas: list[Replica]
) -> None:
    url, engine = database
    minter, jwks = TokenMinter.create(tmp_path)
    kek = write_kek(tmp_path / "kek")
    for name in ("a", "b", "c"):
        replicas.append(start_replica(name, tmp_path, jwks, url, kek))
    fleet = Fleet(replicas, minter, PROXIES)

    report, authorities = await _run_until(fleet, engine, roots=3, intermediates=5, limit=60)

    _assert_fleet_held(report)
    roots = _activated(authorities, AuthorityKind.ROOT)
    intermediates = _activated(authorities, AuthorityKind.INTERMEDIATE)
    assert roots >= 3 and intermediates >= 5
    assert all(p.serials for p in fleet.proxies)
    # Every replica issued: the proxies were spread over them and none moved.
    assert report.failovers == 0
    # One log key for all: each replica's signed heads verify with the key it serves.
    for replica in replicas:
        code, output = await asyncio.to_thread(_audit_verify, replica)
        assert code == 0, output
    for replica in replicas:
        assert replica.stop() == 0, replica.log()
    records = assert_log_complete(engine, dict.fromkeys(leaf_serials_received(fleet.proxies)))
    print(
        f"\nthree replicas: {roots - 1} root rotations, {intermediates - 1} intermediate "
        f"renewals, {report.certificates} certificates to {PROXIES} proxies, "
        f"{report.verifications} path validations in {report.rounds} rounds, "
        f"{len(report.failures)} failures; {records} records, gapless; bundle sequences "
        f"{min(report.sequences)}..{max(report.sequences)} identical on every replica"
    )


@pytest.mark.parametrize("point", ["prepare-root:key-stored", "activate-root:before-record"])
async def test_killing_the_leader_mid_step_hands_the_step_to_another_replica(
    tmp_path: Path, database: tuple[str, Engine], replicas: list[Replica], point: str
) -> None:
    """The leader dies (SIGKILL, whole process tree) in the middle of a root rotation:
    after sealing the new root's key but before its journal entry, or after preparing the
    new root's first intermediate but before recording the activation. Another replica
    does the step; the dead replica's orphan key is deleted; the dead replica comes back
    with an empty data directory, as a rescheduled pod."""
    url, engine = database
    minter, jwks = TokenMinter.create(tmp_path)
    kek = write_kek(tmp_path / "kek")
    mark = tmp_path / "crashed"
    crash = {
        "REPLICA_CRASH_AT": point,
        "REPLICA_CRASH_MARK": str(mark),
        "REPLICA_CRASH_AFTER": str(time.time() + 4),  # not the first root, at start
    }
    for name in ("a", "b", "c"):
        replicas.append(start_replica(name, tmp_path, jwks, url, kek, env=crash))
    fleet = Fleet(replicas, minter, PROXIES)

    report, authorities = await _run_until(fleet, engine, roots=2, intermediates=3, limit=60)

    _assert_fleet_held(report)
    assert mark.exists(), "no leader reached the crash point"
    dead = [r for r in replicas if not r.alive]
    assert len(dead) == 1, [r.name for r in replicas]
    killed_at = mark.stat().st_mtime
    if point.startswith("prepare-root"):
        # The step was redone: the first root prepared after the kill.
        done_at = min(
            e.prepared_at.timestamp()
            for e in authorities.select(AuthorityKind.ROOT)
            if e.prepared_at.timestamp() > killed_at
        )
    else:
        (second_root,) = (
            e
            for e in authorities.select(AuthorityKind.ROOT)
            if e.activated_at is not None
            and e.prepared_at.timestamp() < killed_at < e.activated_at.timestamp()
        )
        assert second_root.activated_at is not None
        done_at = second_root.activated_at.timestamp()
    failover = done_at - killed_at
    # The next leader's poll (0.25 s) plus the step, with headroom for a busy machine.
    assert 0 < failover < 1.0, failover
    active = sorted(e.kind.value for e in authorities.entries if e.state == AuthorityState.ACTIVE)
    assert active == ["intermediate", "jwt-key", "root"]
    with engine.connect() as connection:
        sealed = {r for (r,) in connection.execute(text("SELECT ref FROM sealed_key"))}
    # The journal after the keys: a key is stored just before the entry that names it.
    named = {e.key_ref for e in _journal(engine).entries if e.state != AuthorityState.REMOVED}
    assert sealed - named == {"log:signing"}, "the dead leader's orphan key is deleted"

    # The dead replica's pod is rescheduled: same name, empty data directory.
    reborn = start_replica(dead[0].name + "-again", tmp_path, jwks, url, kek)
    replicas.append(reborn)
    fleet = Fleet([reborn], minter, 3)
    stop = asyncio.Event()
    running = asyncio.create_task(fleet.run(stop))
    await asyncio.sleep(3)
    stop.set()
    rejoined = await running
    await fleet.close()
    assert rejoined.certificates >= 3 and not rejoined.failures
    print(
        f"\nleader killed at {point}; the step finished on another "
        f"replica {failover * 1000:.0f} ms later; {report.certificates} certificates, "
        f"{report.failovers} proxy failovers, {report.verifications} path validations, "
        f"{len(report.failures)} failures; a replica with an empty data dir rejoined and "
        f"issued {rejoined.certificates}"
    )


def _rotate_command(data_dir: Path, url: str, kek: Path) -> list[str]:
    """``meshca ca rotate --root`` as an operator on that replica's host would run it."""
    return [
        sys.executable,
        "-m",
        "meshca",
        "ca",
        "rotate",
        "--root",
        "--data-dir",
        str(data_dir),
        "--database-url",
        url,
        "--key-encryption-key-file",
        str(kek),
        "--trust-domain",
        TRUST_DOMAIN,
        "--max-svid-ttl",
        "4s",
        "--propagation-delay",
        "3s",
    ]


def test_concurrent_manual_rotations_make_one(
    tmp_path: Path, database: tuple[str, Engine], replicas: list[Replica]
) -> None:
    url, engine = database
    _minter, jwks = TokenMinter.create(tmp_path)
    kek = write_kek(tmp_path / "kek")
    for name in ("a", "b"):
        replicas.append(
            start_replica(
                name, tmp_path, jwks, url, kek, extra=["--root-rotation", "1h", "--root-ttl", "4h"]
            )
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")}
    rotations = [
        subprocess.Popen(
            _rotate_command(r.data_dir, url, kek),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for r in replicas
    ]
    results = [(p.wait(timeout=60), p.communicate()[0]) for p in rotations]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    refused = next(output for code, output in results if code != 0)
    assert "a root rotation is already under way" in refused
    authorities = _journal(engine)
    assert len(authorities.select(AuthorityKind.ROOT, AuthorityState.PREPARED)) == 1
    assert len(authorities.select(AuthorityKind.ROOT)) == 2


def test_a_replica_without_the_keys_refuses_and_names_the_step(
    tmp_path: Path, database: tuple[str, Engine], replicas: list[Replica]
) -> None:
    url, _engine = database
    _minter, jwks = TokenMinter.create(tmp_path)
    kek = write_kek(tmp_path / "kek")
    replicas.append(start_replica("a", tmp_path, jwks, url, kek))

    # Another host, no key-encryption key: the journal names sealed keys it cannot open.
    lost = start_replica("b", tmp_path, jwks, url, None, wait=False)
    replicas.append(lost)
    assert lost.process.wait(timeout=60) == 2
    lost.kill()  # reaps it and reads its output to the end
    assert "--key-encryption-key-file" in lost.log(), lost.log()

    # Another key-encryption key: named as such, not a decryption failure.
    wrong = start_replica("c", tmp_path, jwks, url, write_kek(tmp_path / "other"), wait=False)
    replicas.append(wrong)
    assert wrong.process.wait(timeout=60) == 2
    wrong.kill()
    assert "give every replica the same --key-encryption-key-file" in wrong.log(), wrong.log()
