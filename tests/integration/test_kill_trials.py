"""kill -9 under 64-proxy load, 50 times: every certificate a proxy received has its record.

Each trial kills one worker, the whole ``meshca serve`` tree, or its supervisor alone at a
random moment, checks the data directory the crash left (records, leaf indexes,
``meshca audit verify``) and restarts on it (``tests/integration/kill_trials.py``). The
seed is printed; set ``KILL_TRIALS_SEED`` to replay the same kinds and moments.
``bench/kill_trials.py`` runs 1,000.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.kill_trials import KILL_KINDS, KillTrials, TrialResult
from tests.integration.serve_process import group_alive, launch
from tests.integration.server_harness import TokenMinter, serve_command

pytestmark = pytest.mark.integration

TRIALS = 50


async def test_kill_9_under_load_loses_no_record(tmp_path: Path) -> None:
    seed = int(os.environ.get("KILL_TRIALS_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"\nkill trials: seed {seed} (replay with KILL_TRIALS_SEED={seed})")
    trials = KillTrials(tmp_path, random.Random(seed))
    results: list[TrialResult] = []
    try:
        await trials.start()
        for _ in range(TRIALS):
            result = await trials.trial()
            results.append(result)
            server_log = trials.server.log() if trials.server else ""
            assert result.ok, f"seed {seed}: {result.describe()}\n{server_log}"
        final = await trials.finish()
    finally:
        await trials.abort()
    assert final.ok, f"seed {seed}: {final.describe()}"

    kinds = Counter(r.kind for r in results)
    # Every kind, and kills that landed while certificates were in flight: records of
    # certificates whose responses died with the server.
    assert all(kinds[kind] >= 5 for kind in KILL_KINDS), kinds
    assert final.checked >= 10 * TRIALS, final.checked
    assert final.records > final.checked, (final.records, final.checked)
    restarts = sorted(r.restart_seconds or 0.0 for r in results)
    errors = sum((Counter(r.errors) for r in results), Counter())
    print(
        f"{TRIALS} trials ({kinds['worker']} of a worker, {kinds['server']} of the whole "
        f"tree, {kinds['supervisor']} of the supervisor alone): {final.checked} certificates "
        f"received and checked, {final.records} records, 0 missing, leaf indexes "
        f"0..{final.records - 1}, audit verify passed {TRIALS + 1} times; restart median "
        f"{restarts[len(restarts) // 2]:.2f} s, max {restarts[-1]:.2f} s; "
        f"client errors {dict(errors)}"
    )


def test_workers_stop_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    """SIGKILL to ``meshca serve``'s supervisor alone: its workers, left without their
    record writer, stop by themselves instead of keeping the port (answering UNAVAILABLE
    to a share of the connections a restarted server should get) and the leader lock."""
    _minter, jwks = TokenMinter.create(tmp_path)
    data_dir = tmp_path / "data"
    command = serve_command(data_dir, jwks, workers=2, extra=["--plaintext"])
    server = launch("meshca", data_dir, command, workers=2)
    try:
        assert len(server.worker_pids()) == 2
        os.kill(server.process.pid, signal.SIGKILL)
        assert server.process.wait(10) == -signal.SIGKILL
        deadline = time.monotonic() + 20
        while group_alive(server.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not group_alive(server.process.pid), server.log()
    finally:
        server.kill()
    assert server.log().count("record writer is gone; this worker stops") == 2, server.log()
