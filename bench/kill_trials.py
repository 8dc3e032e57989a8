"""kill -9 under 64-proxy load, many times: the long run of tests/integration/test_kill_trials.py.

    flock /tmp/meshca-bench.lock .venv/bin/python bench/kill_trials.py --trials 1000 [--seed S]

Each trial (``tests/integration/kill_trials.py``) kills one worker or the whole
``meshca serve`` tree at a random moment under 64 proxies, checks what the crash left
(every certificate received has its record, ``meshca audit verify --data-dir`` passes,
leaf indexes 0..n-1) and restarts on the same data directory. Every ``--per-dir`` trials
the server stops with SIGTERM, gets a final check, and the next trials start on a new
data directory, so that ``verify``'s full recomputation stays a fraction of a trial.
A failed trial ends its data directory's series (it is kept, and named). Prints a
summary table and writes every trial to ``bench/results/kill-trials-<UTC time>.json``.
Exits 1 if any trial failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from tests.integration.kill_trials import KillTrials, TrialResult

RESULTS = Path(__file__).with_name("results")


def _percentile(values: list[float], share: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(share * len(ordered) + 0.5) - 1))]


async def _series(
    base: Path, rng: random.Random, count: int, proxies: int, deadline: float
) -> tuple[list[TrialResult], TrialResult | None]:
    """``count`` trials on one new data directory; stops at the first failed one, or
    after ``deadline`` (monotonic)."""
    trials = KillTrials(base, rng, proxies)
    results: list[TrialResult] = []
    final = None
    try:
        await trials.start()
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            result = await trials.trial()
            results.append(result)
            print(("ok   " if result.ok else "FAIL ") + result.describe(), flush=True)
            if not result.ok:
                if trials.server is not None:
                    print(trials.server.log(), flush=True)
                return results, None
        final = await trials.finish()
        print(("ok   " if final.ok else "FAIL ") + final.describe(), flush=True)
    finally:
        await trials.abort()
    return results, final


async def _run(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    print(f"seed {seed}: {args.trials} trials, {args.per_dir} per data directory", flush=True)
    root = Path(tempfile.mkdtemp(prefix="meshca-kill-trials-"))
    started = time.monotonic()
    deadline = started + args.max_minutes * 60
    results: list[TrialResult] = []
    finals: list[TrialResult] = []
    failed_dirs: list[str] = []
    series = 0
    while len(results) < args.trials and time.monotonic() < deadline:
        series += 1
        base = root / f"series-{series}"
        base.mkdir()
        count = min(args.per_dir, args.trials - len(results))
        done, final = await _series(base, rng, count, args.proxies, deadline)
        results += done
        if final is not None:
            finals.append(final)
        if final is None or not final.ok:
            failed_dirs.append(str(base))
        else:
            _remove(base)
    wall = time.monotonic() - started
    summary = _summary(seed, results, finals, failed_dirs, wall)
    summary["trials_asked"] = args.trials
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"kill-trials-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(
        json.dumps(
            {
                "summary": summary,
                "trials": [asdict(r) for r in results],
                "finals": [asdict(f) for f in finals],
            },
            indent=1,
        )
    )
    _print(summary)
    print(f"\nevery trial: {out}")
    if not failed_dirs:
        _remove(root)
    return 0 if summary["trials_failed"] == 0 and not failed_dirs else 1


def _summary(
    seed: int,
    results: list[TrialResult],
    finals: list[TrialResult],
    failed_dirs: list[str],
    wall: float,
) -> dict[str, object]:
    kinds = Counter(r.kind for r in results)
    restarts = [r.restart_seconds for r in results if r.restart_seconds is not None]
    errors: Counter[str] = sum((Counter(r.errors) for r in results), Counter())
    # A series' last check counts every certificate its proxies received, late ones too.
    checked = sum(f.checked for f in finals)
    records = sum(f.records for f in finals)
    return {
        "seed": seed,
        "trials": len(results),
        "trials_failed": sum(not r.ok for r in results) + sum(not f.ok for f in finals),
        "worker_kills": kinds["worker"],
        "server_kills": kinds["server"],
        "supervisor_kills": kinds["supervisor"],
        "data_directories": len(finals) + (len(failed_dirs) - sum(not f.ok for f in finals)),
        "certificates_received_and_checked": checked,
        "records": records,
        "records_without_a_received_certificate": records - checked,
        "refusal_records": sum(f.refused for f in finals),
        "checks": len(results) + len(finals),
        "records_missing": sum(len(r.missing) for r in [*results, *finals]),
        "verify_failures": sum(r.verify_code != 0 for r in [*results, *finals]),
        "index_problems": sum(len(r.index_problems) for r in [*results, *finals]),
        "restarts_failed": sum(r.restart_seconds is None for r in results),
        "restart_median_s": statistics.median(restarts) if restarts else None,
        "restart_p99_s": _percentile(restarts, 0.99) if restarts else None,
        "death_median_s": statistics.median(r.death_seconds for r in results),
        "check_median_s": statistics.median(r.check_seconds for r in results),
        "client_errors": dict(errors),
        "failed_data_directories": failed_dirs,
        "wall_s": round(wall, 1),
    }


def _print(summary: dict[str, object]) -> None:
    print("\n| figure | value |\n|---|---:|")
    for key, value in summary.items():
        shown = f"{value:.2f}" if isinstance(value, float) else value
        print(f"| {key.replace('_', ' ')} | {shown} |")


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--seed", type=int, help="replays the same kinds and kill moments")
    parser.add_argument("--per-dir", type=int, default=50, help="trials per data directory")
    parser.add_argument("--proxies", type=int, default=64)
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=24 * 60,
        help="start no trial after this long; the summary says how many ran",
    )
    return asyncio.run(_run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
