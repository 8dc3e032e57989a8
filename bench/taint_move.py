"""Time to full move after ``meshca ca taint`` of the active intermediate.

    python bench/taint_move.py [--agents 200] [--runs 3] [--poll 1.0]

Starts the real server in this process (TLS, jwks attestation, SQLite) and a fleet of
real agent loops (``meshca.service.agent.AgentRunner`` over gRPC: ``Sign`` and
``WatchTrustBundle``, as ``meshca agent`` runs them, without the Workload API socket).
Once every agent holds an SVID, it runs ``meshca ca taint`` (in process) on the active
intermediate and measures, from the command's start, the time until every agent holds
an SVID issued by the successor. Meanwhile every agent's chain is verified against
every distinct bundle the agents hold, every 0.25 s; any failure is reported.

Each run is a fresh server and data directory. Results go to
bench/results/taint-<timestamp>.json; a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import logging
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from tests.integration.server_harness import TRUST_DOMAIN, running_server
from tests.integration.taint_fleet import Fleet

from meshca.adapters.storage.engine import make_engine
from meshca.adapters.storage.journal import SqlAuthorityJournal
from meshca.cli import main as meshca_main

RESULTS = Path(__file__).resolve().parent / "results"


def _taint(data_dir: Path, entry_id: str) -> int:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        return meshca_main(
            [
                "ca", "taint", entry_id, "--reason", "bench", "--by", "bench",
                "--data-dir", str(data_dir), "--trust-domain", TRUST_DOMAIN,
            ]
        )  # fmt: skip


async def _taint_and_wait(fleet: Fleet, data_dir: Path, result: dict[str, float]) -> None:
    engine = make_engine(fleet.server.settings.effective_database_url)
    try:
        journal = SqlAuthorityJournal(engine)
        tainted = journal.load().active_intermediate
        assert tainted is not None
        started = time.monotonic()
        code = await asyncio.to_thread(_taint, data_dir, tainted.id)
        assert code == 0, "meshca ca taint failed"
        result["command_s"] = time.monotonic() - started
        successor = journal.load().active_intermediate
        assert successor is not None and successor.id != tainted.id
        fingerprint = successor.fingerprint
        await fleet.wait(lambda: set(fleet.issuers()) == {fingerprint}, 120)
        result["full_move_s"] = time.monotonic() - started
    finally:
        engine.dispose()


async def one_run(agents: int, poll: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="meshca-taint-") as tmp:
        async for server in running_server(
            Path(tmp), journal_poll=timedelta(seconds=poll), log_level="error"
        ):
            fleet = Fleet(server, agents)
            result: dict[str, float] = {}
            await fleet.start()
            try:
                ready = await fleet.wait(fleet.ready, 300)
                before = len(fleet.issued)
                data_dir = server.settings.data_dir
                await fleet.checking(
                    0.25, functools.partial(_taint_and_wait, fleet, data_dir, result)
                )
            finally:
                await fleet.stop()
            result.update(
                agents=agents,
                poll_s=poll,
                startup_s=ready,
                verifications=fleet.verifications,
                failures=len(fleet.failures),
                svids_after=len(fleet.issued) - before,
            )
            return result
    raise AssertionError("the server did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--poll", type=float, default=1.0, help="--journal-poll, seconds")
    args = parser.parse_args()
    logging.getLogger("meshca").setLevel(logging.ERROR)  # one line per agent otherwise
    runs = []
    for index in range(args.runs):
        result = asyncio.run(one_run(args.agents, args.poll))
        print(f"run {index + 1}: {json.dumps(result)}", file=sys.stderr)
        runs.append(result)
    moves = [r["full_move_s"] for r in runs]
    failures = sum(int(r["failures"]) for r in runs)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"taint-{stamp}.json").write_text(json.dumps(runs, indent=2))
    print("| agents | journal poll | runs | time to full move (median, max) | failures |")
    print("|---|---|---|---|---|")
    print(
        f"| {args.agents} | {args.poll:g}s | {len(runs)} | "
        f"{statistics.median(moves):.2f}s, {max(moves):.2f}s | {failures} |"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
