"""Audit benchmark: queries and proofs over 1,000,000 records, and what the log costs.

    python bench/audit_bench.py [--records 1000000] [--runs 3] [--databases sqlite,postgres]
                                [--skip-h2load]

For each database (SQLite in a temp dir; PostgreSQL 15 started like the tests do):

1. Load ``--records`` records through the log's own write path (``insert_records`` inside
   each transaction, 10,000 records per transaction) and time it; then sign a tree head,
   which fills the subtree cache for every leaf (timed).
2. Per run: 200 queries each for one SPIFFE ID (newest 50 of ~1,000), a random one-hour
   window (newest 50) and one serial; 200 inclusion proofs for random leaves in the head,
   and 200 consistency proofs from random old sizes. p50 and p99 per run, median of runs.
3. Write path, in process: 20,000 concurrent ``SqlAuditLog.append`` calls with the log
   (leaf index reserved under the log's lock, leaf hash) against the same writer inserting
   the same rows without it (index from a local counter, no lock, no hash).

Then issuance end to end, as bench/run.py measures it (h2load, c=16, plaintext, 2
workers): this working tree against ``git archive HEAD`` (the code before the log),
alternating, ``--runs`` times each.

Results go to bench/results/audit-<timestamp>.json; a Markdown summary is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(1, str(REPO))

from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from sqlalchemy import Engine, insert  # noqa: E402

from meshca.adapters.storage import SqlAuditLog, make_engine, sqlite_url_for  # noqa: E402
from meshca.adapters.storage.audit_query import SqlAuditReader  # noqa: E402
from meshca.adapters.storage.group_commit import GroupCommitWriter  # noqa: E402
from meshca.adapters.storage.migrate import prepare_schema  # noqa: E402
from meshca.adapters.storage.record_rows import insert_records, stored_record  # noqa: E402
from meshca.adapters.storage.tables import IssuanceRecordRow  # noqa: E402
from meshca.adapters.storage.transparency import SqlTransparencyLog  # noqa: E402
from meshca.core.audit import AuditQuery, AuditRecord, Outcome  # noqa: E402

RESULTS = BENCH / "results"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
SPAN = timedelta(days=30)
IDENTITIES = 1000
QUERIES = 200


def record(n: int, total: int) -> AuditRecord:
    """Record ``n`` of ``total``: 1,000 identities, times spread evenly over 30 days."""
    ident = n % IDENTITIES
    namespace, sa = f"ns-{ident // 10}", f"sa-{ident % 10}"
    refused = n % 20 == 19
    when = T0 + SPAN * (n / total)
    return AuditRecord(
        time=when,
        outcome=Outcome.REFUSED if refused else Outcome.ISSUED,
        api="istio.v1.auth.CreateCertificate",
        reason="not-authorized" if refused else "ok",
        spiffe_id=f"spiffe://cluster.local/ns/{namespace}/sa/{sa}",
        serial=None if refused else f"{(n * 2654435761) % (1 << 64):016x}{n:08x}",
        fingerprint_sha256=None if refused else f"{n:064x}",
        not_before=when - timedelta(minutes=1),
        not_after=when + timedelta(hours=24),
        namespace=namespace,
        service_account=sa,
        pod_name=f"{sa}-{n % 7}",
        pod_uid=f"00000000-0000-0000-0000-{n % 7:012d}",
        node_name="node-1",
        peer="ipv4:10.0.0.1:40000",
        csr_sha256=f"{n:064x}",
    )


def _row(rec: AuditRecord) -> dict[str, Any]:
    """The record as a plain row for the "log off" writer: no leaf index of the log."""
    row = dataclasses.asdict(rec)
    row["outcome"] = rec.outcome.value
    return row


def load(engine: Engine, total: int, batch: int = 10_000) -> float:
    """Insert ``total`` records through ``insert_records``; returns records per second."""
    started = time.perf_counter()
    for start in range(0, total, batch):
        rows = [stored_record(record(n, total)) for n in range(start, min(start + batch, total))]
        with engine.begin() as connection:
            insert_records(connection, rows)
        if start % 100_000 == 0:
            print(f"    loaded {start:,}", flush=True)
    return total / (time.perf_counter() - started)


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return p50 * 1000, p99 * 1000


def timed(fn: Callable[[], Any], count: int) -> tuple[float, float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return percentiles(samples)


def query_run(
    reader: SqlAuditReader, log: SqlTransparencyLog, total: int, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    size = log.state().tree_size

    def by_spiffe() -> None:
        ident = rng.randrange(IDENTITIES)
        spiffe = f"spiffe://cluster.local/ns/ns-{ident // 10}/sa/sa-{ident % 10}"
        page = reader.query(AuditQuery(spiffe_id=spiffe, limit=50))
        assert page.entries

    def by_window() -> None:
        start = T0 + (SPAN - timedelta(hours=1)) * rng.random()
        page = reader.query(AuditQuery(since=start, until=start + timedelta(hours=1), limit=50))
        assert page.entries

    def by_serial() -> None:
        n = rng.randrange(total)
        while n % 20 == 19:
            n = rng.randrange(total)
        serial = record(n, total).serial
        assert reader.get(serial=serial) is not None

    def inclusion() -> None:
        log.inclusion_proof(rng.randrange(size), size)

    def consistency() -> None:
        log.consistency_proof(rng.randrange(1, size), size)

    return {
        "spiffe_id_ms": timed(by_spiffe, QUERIES),
        "time_range_ms": timed(by_window, QUERIES),
        "serial_ms": timed(by_serial, QUERIES),
        "inclusion_proof_ms": timed(inclusion, QUERIES),
        "consistency_proof_ms": timed(consistency, QUERIES),
    }


# Leaf indexes for the "log off" rows: far above the real log's, never reused.
_OFF_COUNTER = iter(range(10**12, 10**13))


async def _appends(engine: Engine, count: int, with_log: bool) -> float:
    """Records per second through one group-commit writer, ``count`` appends in flight."""
    if with_log:
        store = SqlAuditLog(engine)
        append = store.append
        close = store.aclose
    else:
        counter = _OFF_COUNTER
        writer = GroupCommitWriter(
            engine, lambda c, rows: c.execute(insert(IssuanceRecordRow), rows), what="record"
        )

        async def append(rec: AuditRecord) -> None:
            row = _row(rec)
            row["leaf_index"] = next(counter)
            row["leaf_hash"] = b"\0" * 32
            await writer.write(row)

        close = writer.aclose
    records = [record(n, count) for n in range(count)]
    started = time.perf_counter()
    for start in range(0, count, 64):
        await asyncio.gather(*(append(r) for r in records[start : start + 64]))
    elapsed = time.perf_counter() - started
    await close()
    return count / elapsed


def write_path(url: str, runs: int) -> dict[str, Any]:
    engine = make_engine(url)
    try:
        on, off = [], []
        for run in range(runs):
            for with_log in (run % 2 == 0, run % 2 == 1):
                rate = asyncio.run(_appends(engine, 20_000, with_log))
                (on if with_log else off).append(rate)
        return {
            "append_per_s_log_on": statistics.median(on),
            "append_per_s_log_off": statistics.median(off),
        }
    finally:
        engine.dispose()


@contextlib.contextmanager
def database(kind: str) -> Iterator[str]:
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="meshca-audit-bench-") as tmp:
            yield sqlite_url_for(Path(tmp))
        return
    from tests.fixtures_pg import PostgresServer

    server = PostgresServer.create()
    try:
        server.start()
        yield server.url()
    finally:
        server.destroy()


def bench_database(kind: str, total: int, runs: int) -> dict[str, Any]:
    print(f"== {kind}: loading {total:,} records", flush=True)
    with database(kind) as url:
        engine = make_engine(url)
        prepare_schema(engine, "meshca db upgrade")
        rate = load(engine, total)
        log = SqlTransparencyLog(engine, ec.generate_private_key(ec.SECP256R1()))
        started = time.perf_counter()
        log.sign_head(datetime.now(UTC))
        first_head = time.perf_counter() - started
        started = time.perf_counter()
        load_more = [stored_record(record(n, total)) for n in range(total, total + 1000)]
        with engine.begin() as connection:
            insert_records(connection, load_more)
        log.sign_head(datetime.now(UTC))
        next_head = time.perf_counter() - started
        reader = SqlAuditReader(engine)
        per_run = [query_run(reader, log, total, seed) for seed in range(runs)]
        started = time.perf_counter()
        report = log.verify(None)
        verify_s = time.perf_counter() - started
        assert report.ok, report.findings[:3]
        engine.dispose()
        writes = write_path(url, runs)
    summary = {
        key: [statistics.median(r[key][i] for r in per_run) for i in (0, 1)] for key in per_run[0]
    }
    return {
        "database": kind,
        "records": total,
        "load_per_s": rate,
        "first_head_s": first_head,
        "head_after_1000_more_s": next_head,
        "verify_all_s": verify_s,
        "runs": per_run,
        "median": summary,
        **writes,
    }


def h2load_issuance(runs: int) -> dict[str, Any]:
    """cert/s at c=16 for this tree (log on) and HEAD (log off), alternating."""
    import meshca_ca
    from loadgen import ensure_h2load, run_h2load
    from workload import make_csr

    h2load = ensure_h2load()
    rates: dict[str, list[float]] = {"log_on": [], "log_off": []}
    with tempfile.TemporaryDirectory(prefix="meshca-head-") as head_dir:
        archive = subprocess.run(
            ["git", "archive", "HEAD"], cwd=REPO, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", head_dir], input=archive, check=True)
        for run in range(runs):
            order = ("log_on", "log_off") if run % 2 == 0 else ("log_off", "log_on")
            for name in order:
                original = meshca_ca._meshca_argv
                if name == "log_off":
                    meshca_ca._meshca_argv = lambda: (
                        [sys.executable, "-m", "meshca"],
                        Path(head_dir),
                    )
                try:
                    with tempfile.TemporaryDirectory(prefix="meshca-bench-") as tmp:
                        workdir = Path(tmp)
                        with meshca_ca.meshca_ca(workdir, make_csr()) as target:
                            common = {
                                "body": target.body,
                                "headers": target.headers,
                                "clients": 16,
                                "streams": 1,
                                "http1": False,
                                "log_file": workdir / "h2load.log",
                            }
                            run_h2load(h2load, target.url, requests=300, timeout=120, **common)
                            before = target.issued_count()
                            result = run_h2load(
                                h2load, target.url, requests=6000, timeout=300, **common
                            )
                            assert target.issued_count() - before == result.done, "invalid run"
                            rates[name].append(result.req_per_s)
                            print(f"    h2load {name}: {result.req_per_s:.0f} cert/s", flush=True)
                finally:
                    meshca_ca._meshca_argv = original
    return {
        key: {"runs": value, "median": statistics.median(value)} for key, value in rates.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--skip-h2load", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(BENCH))
    results: dict[str, Any] = {"started": datetime.now(UTC).isoformat(), "args": vars(args)}
    results["databases"] = [
        bench_database(kind, args.records, args.runs) for kind in args.databases.split(",")
    ]
    if not args.skip_h2load:
        results["h2load_c16"] = h2load_issuance(args.runs)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"audit-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}\n")
    print("| database | query | p50 ms | p99 ms |\n|---|---|---:|---:|")
    for db in results["databases"]:
        for key, (p50, p99) in db["median"].items():
            print(f"| {db['database']} | {key.removesuffix('_ms')} | {p50:.2f} | {p99:.2f} |")
    for db in results["databases"]:
        print(
            f"{db['database']}: load {db['load_per_s']:.0f} rec/s; first head "
            f"{db['first_head_s']:.1f} s; head after 1,000 more "
            f"{db['head_after_1000_more_s']:.3f} s; "
            f"verify all {db['verify_all_s']:.1f} s; appends/s log on "
            f"{db['append_per_s_log_on']:.0f}, off {db['append_per_s_log_off']:.0f}"
        )
    if "h2load_c16" in results:
        h = results["h2load_c16"]
        print(
            f"h2load c=16: log on {h['log_on']['median']:.0f} cert/s, "
            f"off {h['log_off']['median']:.0f}"
        )


if __name__ == "__main__":
    main()
