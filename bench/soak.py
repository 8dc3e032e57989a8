"""Soak: does issuance cost grow with the log? Issue 8's target 3.

    python bench/soak.py [--issuances 1000000] [--chunk 10000] [--concurrency 64]

One meshca (plaintext, SQLite, 2 workers: the bench's ``meshca`` set-up) issues
``--issuances`` certificates to h2load, ``--chunk`` requests per h2load run with
``--concurrency`` connections of one stream each. After every chunk it notes the rate,
the latency percentiles, the resident memory of each meshca process and the size of the
database files. The target: every window of 100,000 issuances keeps at least 90% of the
first 10,000's rate, and memory stays flat (the end is within 10% of what it was after
the first 100,000, by which time caches are warm). The run is valid when the issuance
record grew by exactly the number of requests h2load completed.

Results go to bench/results/soak-<timestamp>.json and the table is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from loadgen import ensure_h2load, run_h2load
from meshca_ca import meshca_ca
from procs import cpu_seconds, machine_cpu
from report import TargetCheck, targets_markdown
from workload import make_csr

RESULTS = Path(__file__).resolve().parent / "results"
WINDOW = 100_000
HOLD = 0.90  # each window keeps at least this share of the first chunk's rate
FLAT = 1.10  # memory at the end at most this times memory after the first window


def rss_kib(pgid: int) -> dict[int, int]:
    """Resident memory of each process in ``pgid``'s group, KiB."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    found[int(entry.name)] = int(line.split()[1])
    return found


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_by_pid(pgid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each process in ``pgid``'s group."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / _TICKS
    return found


def soak(issuances: int, chunk: int, concurrency: int) -> dict[str, Any]:
    h2load = ensure_h2load()
    chunks: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="meshca-soak-") as tmp:
        workdir = Path(tmp)
        with meshca_ca(workdir, make_csr()) as target:
            (counter,) = target.counters
            issued_before = counter.read()
            data_dir = workdir / "meshca-data"
            for index in range(issuances // chunk):
                cpu_before, machine_before = cpu_seconds([target.pgid]), machine_cpu()
                by_pid_before = cpu_by_pid(target.pgid)
                result = run_h2load(
                    h2load,
                    target.url,
                    body=target.body,
                    headers=target.headers,
                    clients=concurrency,
                    streams=1,
                    requests=chunk,
                    http1=False,
                    log_file=workdir / "h2load.log",
                    timeout=120 + chunk / 20,
                )
                cpu = cpu_seconds([target.pgid]) - cpu_before
                by_pid = {
                    pid: seconds - by_pid_before.get(pid, 0.0)
                    for pid, seconds in cpu_by_pid(target.pgid).items()
                }
                machine = machine_cpu()
                busy = machine.busy_fraction_since(machine_before)
                memory = rss_kib(target.pgid)
                row = {
                    "chunk": index,
                    "issued_total": (index + 1) * chunk,
                    "req_per_s": result.req_per_s,
                    "p50_ms": result.p50_ms,
                    "p99_ms": result.p99_ms,
                    "clean": result.clean,
                    "done": result.done,
                    "server_cpu_ms_per_cert": 1000 * cpu / max(result.done, 1),
                    "other_cpu_cores": busy * (os.cpu_count() or 1)
                    - cpu / result.wall_seconds
                    - result.h2load_cpu_seconds / result.wall_seconds,
                    "machine_steal": machine.steal_fraction_since(machine_before),
                    # Per process, ms per certificate: the supervisor (lowest pid, the
                    # record writer) and the workers, to tell whose cost moves.
                    "cpu_ms_per_cert_by_pid": {
                        pid: 1000 * seconds / max(result.done, 1)
                        for pid, seconds in sorted(by_pid.items())
                        if seconds > 0.01
                    },
                    "rss_kib": sum(memory.values()),
                    "rss_kib_by_pid": memory,
                    "db_bytes": sum(
                        p.stat().st_size for p in data_dir.glob("meshca.db*") if p.is_file()
                    ),
                }
                chunks.append(row)
                print(
                    f"  {row['issued_total']:>9,} issued  {row['req_per_s']:7.0f} cert/s  "
                    f"p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  "
                    f"CPU {row['server_cpu_ms_per_cert']:.2f} ms/cert  "
                    f"RSS {row['rss_kib'] / 1024:6.1f} MiB  DB {row['db_bytes'] / 2**20:7.1f} MiB"
                    f"  other CPU {row['other_cpu_cores']:.2f}"
                    f"  steal {100 * row['machine_steal']:.0f}%  ms/cert by process "
                    + " ".join(f"{v:.2f}" for v in row["cpu_ms_per_cert_by_pid"].values()),
                    flush=True,
                )
            issued_after = counter.read()
    completed = sum(c["done"] for c in chunks)
    problems = []
    if not all(c["clean"] for c in chunks):
        problems.append("some h2load requests failed")
    if issued_after - issued_before != completed:
        problems.append(
            f"issuance record grew by {issued_after - issued_before}, h2load completed {completed}"
        )
    return {"chunks": chunks, "valid": not problems, "problems": problems}


def windows(chunks: list[dict[str, Any]], chunk: int) -> list[dict[str, Any]]:
    """Rates over each ``WINDOW`` issuances: requests over the summed h2load time."""
    per = max(1, WINDOW // chunk)
    out = []
    for start in range(0, len(chunks), per):
        part = chunks[start : start + per]
        seconds = sum(c["done"] / c["req_per_s"] for c in part if c["req_per_s"])
        out.append(
            {
                "issued_from": start * chunk,
                "issued_to": (start + len(part)) * chunk,
                "req_per_s": sum(c["done"] for c in part) / seconds if seconds else 0.0,
                "p99_ms": statistics.median(c["p99_ms"] for c in part),
                "rss_kib": part[-1]["rss_kib"],
            }
        )
    return out


def checks(result: dict[str, Any], chunk: int) -> list[TargetCheck]:
    chunks = result["chunks"]
    if not chunks or not result["valid"]:
        return [TargetCheck("3", "soak rate held (worst window / first chunk)", None, ">=", HOLD)]
    first = chunks[0]["req_per_s"]
    parts = windows(chunks, chunk)
    worst = min(w["req_per_s"] for w in parts) / first
    memory_base = parts[0]["rss_kib"]
    growth = chunks[-1]["rss_kib"] / memory_base if memory_base else None
    total = chunks[-1]["issued_total"]
    return [
        TargetCheck(
            "3",
            f"soak of {total:,}: worst {WINDOW:,}-window rate / first {chunk:,}",
            worst,
            ">=",
            HOLD,
            per_run=tuple(round(w["req_per_s"] / first, 3) for w in parts),
            detail=f"first {chunk:,}: {first:,.0f} cert/s",
        ),
        TargetCheck(
            "3",
            f"soak of {total:,}: memory at the end / after the first {WINDOW:,}",
            growth,
            "<",
            FLAT,
            detail=f"{memory_base / 1024:.0f} MiB -> {chunks[-1]['rss_kib'] / 1024:.0f} MiB",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--issuances", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    if args.issuances < args.chunk or args.chunk < 1:
        parser.error("--issuances must be at least one --chunk")
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    os.environ["no_grpc_proxy"] = "127.0.0.1,localhost"
    started = datetime.now(UTC)
    print(f"soak: {args.issuances:,} issuances, chunks of {args.chunk:,}", flush=True)
    began = time.monotonic()
    result = soak(args.issuances, args.chunk, args.concurrency)
    result.update(
        started=started.isoformat(timespec="seconds"),
        seconds=time.monotonic() - began,
        command=["python", "bench/soak.py", *(argv if argv is not None else sys.argv[1:])],
        windows=windows(result["chunks"], args.chunk),
    )
    targets = checks(result, args.chunk)
    result["targets"] = [t.as_dict() for t in targets]
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"soak-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print("| issued | cert/s | p99 ms (median of chunks) | RSS MiB |")
    print("|---|---:|---:|---:|")
    for w in result["windows"]:
        print(
            f"| {w['issued_from']:,}-{w['issued_to']:,} | {w['req_per_s']:,.0f} "
            f"| {w['p99_ms']:.1f} | {w['rss_kib'] / 1024:.0f} |"
        )
    print()
    print("\n".join(targets_markdown(targets)))
    print(f"\nresults: {out.relative_to(RESULTS.parent.parent)}")
    if not result["valid"]:
        print("INVALID: " + "; ".join(result["problems"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
