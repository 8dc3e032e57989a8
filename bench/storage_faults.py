"""Storage fault trials, repeated: PostgreSQL stopped or crashed mid-load, SQLite's disk full.

    python bench/storage_faults.py [--runs 5] [--clients 32] [--kinds pg-stop,pg-crash,disk-full]

Each run is one trial of ``tests/integration/storage_trials.py`` against a real ``meshca
serve --workers 2 --plaintext`` with ``--clients`` proxies signing in a loop on 127.0.0.1:

``pg-stop``
    ``pg_ctl stop -m fast`` under load, 1.5 s down, ``pg_ctl start`` (a new cluster per run).
``pg-crash``
    the same with ``-m immediate``: no checkpoint, WAL replay at start.
``disk-full``
    the SQLite data dir on a 16 MB tmpfs (needs root), filled under load, 1.5 s full
    after the first refusal, then the filler deleted.

A run passes when ``Trial.problems`` finds nothing: every call got a certificate or
UNAVAILABLE with a clear reason, readiness went off and came back on both workers,
issuance resumed without a restart, and every certificate received has its record (and
``meshca audit verify`` passes). Prints a Markdown table of totals and medians, writes
every figure to ``bench/results/storage-faults-<timestamp>.json`` and exits 1 if any run
failed. On a shared machine: ``flock /tmp/meshca-bench.lock python bench/storage_faults.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(1, str(REPO))

from tests.fixtures_pg import PostgresServer  # noqa: E402
from tests.integration.storage_trials import Trial, disk_full_trial, postgres_trial  # noqa: E402

RESULTS = BENCH / "results"
KINDS = ("pg-stop", "pg-crash", "disk-full")
REASONS = {
    "pg-stop": "issuance record not committed",
    "pg-crash": "issuance record not committed",
    "disk-full": "database or disk is full",
}
#: Medians of these figures (seconds), in this order.
TIMES = ("first_refusal", "ready_off", "first_certificate_after", "ready_on")


async def one_run(kind: str, clients: int) -> Trial:
    with tempfile.TemporaryDirectory(prefix="meshca-storage-faults-") as base:
        if kind == "disk-full":
            return await disk_full_trial(Path(base), clients=clients)
        server = PostgresServer.create()
        try:
            server.start()
            return await postgres_trial(
                server, Path(base), crash=kind == "pg-crash", clients=clients
            )
        finally:
            server.destroy()


def _median(values: list[Any]) -> str:
    present = [v for v in values if v is not None]
    return f"{statistics.median(present):.2f}" if present else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each kind (default 5)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent proxies (default 32)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"of {', '.join(KINDS)}")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}")
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    failed = 0
    for kind in kinds:
        for run in range(args.runs):
            trial = asyncio.run(one_run(kind, args.clients))
            figures = trial.figures()
            problems = trial.problems(reason=REASONS[kind], clients=args.clients)
            failed += bool(problems)
            results[kind].append({**figures, "problems": problems})
            print(
                f"{kind} run {run + 1}: {figures}" + (f" PROBLEMS {problems}" if problems else ""),
                flush=True,
            )
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"storage-faults-{stamp}.json"
    out.write_text(json.dumps({"clients": args.clients, "runs": results}, indent=2))
    print(
        f"\n{args.clients} proxies, `meshca serve --workers 2`; medians of {args.runs} runs "
        "(seconds: first refusal and readiness off after the fault began, first certificate "
        "and readiness on after the repair; readiness rounds every 0.2 s)\n"
    )
    print(
        "| trial | runs | failed | certificates checked | records missing | calls refused "
        "| calls while down (certificates) | refused after the repair | " + " | ".join(TIMES) + " |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(TIMES))
    for kind, runs in results.items():
        total = {k: sum(r[k] or 0 for r in runs) for k in ("certificates", "refused")}
        down = sum(r["calls_while_down"] for r in runs)
        down_ok = sum(r["certificates_while_down"] for r in runs)
        missing = sum(r["records_missing"] or 0 for r in runs)
        late = sum(r["refused_after_repair"] for r in runs)
        medians = " | ".join(_median([r[t] for r in runs]) for t in TIMES)
        print(
            f"| {kind} | {len(runs)} | {sum(bool(r['problems']) for r in runs)} "
            f"| {total['certificates']:,} | {missing} | {total['refused']:,} "
            f"| {down:,} ({down_ok}) | {late:,} | {medians} |"
        )
    print(f"\nall figures: {out.relative_to(REPO)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
