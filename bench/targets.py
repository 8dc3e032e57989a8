"""Issue 8's five targets in one table: run.py (1, 2, 4), soak.py (3) and storm.py (5).

    python bench/targets.py            # what `make bench` runs: about 25 minutes
    python bench/targets.py --quick    # every script on a tiny load, to check the harness

Each script runs in turn as its own process (so one never loads the machine while
another measures) and writes its results file; this one reads the three files and
prints every target's row in one table, then writes bench/results/targets-<ts>.json.
The exit status is non-zero when a script failed or a measurement was invalid.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from report import TargetCheck, targets_markdown

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
STORM_SECONDS = 5.0

FULL = {
    "run.py": [],
    "soak.py": [],
    "storm.py": [],
}
QUICK = {
    "run.py": ["--quick"],
    "soak.py": ["--issuances", "20000", "--chunk", "5000"],
    "storm.py": ["--proxies", "1000", "--runs", "1"],
}


def run_script(script: str, args: list[str], pattern: str) -> tuple[int, Path | None]:
    """Run ``script`` and return its exit status and the results file it wrote."""
    before = set(RESULTS.glob(pattern)) if RESULTS.exists() else set()
    print(f"== {script} {' '.join(args)}", flush=True)
    status = subprocess.run([sys.executable, str(BENCH / script), *args], check=False).returncode
    written = sorted(set(RESULTS.glob(pattern)) - before)
    return status, written[-1] if written else None


def checks_from(document: dict[str, Any]) -> list[TargetCheck]:
    rows = []
    for row in document.get("targets", []):
        fields = {k: v for k, v in row.items() if k != "met"}
        fields["per_run"] = tuple(fields.get("per_run", ()))
        rows.append(TargetCheck(**fields))
    return rows


def storm_checks(document: dict[str, Any]) -> list[TargetCheck]:
    runs = document.get("runs", [])
    valid = [r for r in runs if r.get("valid")]
    medians = document.get("medians", {})
    seconds = medians.get("time_to_last_s") if valid and len(valid) == len(runs) else None
    proxies = document.get("proxies", 0)
    return [
        TargetCheck(
            "5",
            f"cold-start storm: time to the last of {proxies:,} certificates (TLS)",
            seconds,
            "<",
            STORM_SECONDS,
            unit="s",
            per_run=tuple(round(r["time_to_last_s"], 2) for r in runs if r.get("time_to_last_s")),
            detail=f"failures per run: {[r.get('failures') for r in runs]}",
        ),
        TargetCheck(
            "5",
            "cold-start storm: proxies not served (all runs)",
            None if not runs else float(sum(r.get("failures", 0) for r in runs)),
            "<",
            1,
            unit="",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny loads, to check the harness")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    started = datetime.now(UTC)
    failures = []
    rows: list[TargetCheck] = []
    files: dict[str, str | None] = {}
    for script, pattern in (
        ("run.py", "2*.json"),
        ("soak.py", "soak-*.json"),
        ("storm.py", "storm-*Z.json"),
    ):
        status, path = run_script(script, plan[script], pattern)
        files[script] = None if path is None else str(path.relative_to(BENCH.parent))
        if status != 0 or path is None:
            failures.append(f"{script} exited with {status}")
        if path is None:
            continue
        document = json.loads(path.read_text())
        rows += storm_checks(document) if script == "storm.py" else checks_from(document)
    lines = targets_markdown(sorted(rows, key=lambda row: row.target))
    print()
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"targets-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(
        json.dumps(
            {
                "started": started.isoformat(timespec="seconds"),
                "quick": args.quick,
                "files": files,
                "targets": [row.as_dict() for row in rows],
                "failures": failures,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nresults: {out.relative_to(BENCH.parent)}")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
