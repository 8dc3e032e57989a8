"""What a log line costs: the formatter alone, and issuance with a line per certificate.

    python bench/log_bench.py [--runs 5] [--lines 50000] [--load] [--requests 15000]

Lines: each case logs ``--lines`` records through a ``StreamHandler`` onto /dev/null
(flushed per line, as stderr is) and reports CPU microseconds per line (process time, so
that a busy machine inflates it less), median of ``--runs``.
Cases: a free-text line in text and JSON, the per-certificate event (``OutcomeLog``) in
text and JSON, and that event with INFO off (``--log-level warning``).

``--load`` also drives meshca (plaintext, SQLite, two workers, stderr to a file) with
h2load at 64 connections, ``--requests`` after a warm-up, in three set-ups taken in
turn each run: ``--log-level warning`` (no line per certificate; what bench/run.py
measures), ``info`` with text, ``info`` with JSON. Reports median certificates/s and
server CPU ms per certificate. Take the bench lock on a shared machine:
``flock /tmp/meshca-bench.lock .venv/bin/python bench/log_bench.py --load``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from meshca.adapters.event_log import OutcomeLog
from meshca.adapters.log_format import JsonFormatter, TextFormatter
from meshca.core.audit import AuditRecord, Outcome

ISSUED = AuditRecord(
    time=datetime.now(UTC),
    outcome=Outcome.ISSUED,
    api="istio.v1.auth.CreateCertificate",
    reason="ok",
    spiffe_id="spiffe://cluster.local/ns/default/sa/bench",
    serial="41a21f1b508aecee2b267cb63c5a22a6",
    fingerprint_sha256="ab" * 32,
    peer="ipv4:127.0.0.1:34832",
    csr_sha256="cd" * 32,
)
TOOK = timedelta(microseconds=2345)
SETUPS = {
    "warning (no line per certificate)": ("--log-level", "warning"),
    "info, text": ("--log-level", "info", "--log-format", "text"),
    "info, json": ("--log-level", "info", "--log-format", "json"),
}


def _logger(formatter: logging.Formatter | None, level: int) -> logging.Logger:
    logger = logging.getLogger(f"bench.{id(formatter)}.{level}")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(level)
    if formatter is not None:
        handler = logging.StreamHandler(open("/dev/null", "w"))
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def _cases() -> dict[str, Callable[[], None]]:
    text = _logger(TextFormatter(), logging.INFO)
    json_ = _logger(JsonFormatter(), logging.INFO)
    off = _logger(JsonFormatter(), logging.WARNING)
    record = logging.LogRecord(
        "meshca.events", logging.INFO, __file__, 1, "certificate issued", (), None
    )
    record.__dict__.update(
        event="certificate-issued",
        spiffe_id=ISSUED.spiffe_id,
        serial=ISSUED.serial,
        reason=ISSUED.reason,
        api=ISSUED.api,
        peer=ISSUED.peer,
        duration_ms=2.345,
    )
    text_format, json_format = TextFormatter().format, JsonFormatter().format
    return {
        "certificate-issued record, text formatter only": lambda: text_format(record) and None,
        "certificate-issued record, json formatter only": lambda: json_format(record) and None,
        "free text, text": lambda: text.info("signed tree head: size %d", 12345),
        "free text, json": lambda: json_.info("signed tree head: size %d", 12345),
        "certificate-issued, text": lambda: OutcomeLog(text)(ISSUED, TOOK),
        "certificate-issued, json": lambda: OutcomeLog(json_)(ISSUED, TOOK),
        "certificate-issued, level warning": lambda: OutcomeLog(off)(ISSUED, TOOK),
    }


def per_line(runs: int, lines: int) -> dict[str, float]:
    """Median microseconds per line of each case."""
    results: dict[str, list[float]] = {}
    for _ in range(runs):
        for name, call in _cases().items():
            started = time.process_time()
            for _ in range(lines):
                call()
            results.setdefault(name, []).append((time.process_time() - started) / lines * 1e6)
    return {name: statistics.median(values) for name, values in results.items()}


def under_load(runs: int, requests: int) -> dict[str, dict[str, float]]:
    """Median certificates/s and server CPU ms per certificate of each set-up."""
    from run import Level, measure

    from loadgen import ensure_h2load
    from meshca_ca import meshca_ca
    from workload import make_csr

    h2load = ensure_h2load()
    level = Level(64, 2000, requests, ("meshca",))
    figures: dict[str, dict[str, list[float]]] = {}
    for run in range(runs):
        for name, flags in SETUPS.items():
            with tempfile.TemporaryDirectory(prefix="meshca-logbench-") as tmp:
                workdir = Path(tmp)
                with meshca_ca(workdir, make_csr(), flags=flags) as target:
                    result = measure(h2load, target, level, workdir, [])
                lines = (workdir / "meshca.log").read_text().count("\n")
            if not result["valid"]:
                raise SystemExit(f"{name}: invalid run: {result['problems']}")
            print(
                f"run {run + 1} {name}: {result['req_per_s']:.0f} cert/s, "
                f"{result['server_cpu_ms_per_cert']:.3f} CPU ms/cert, {lines} log lines",
                flush=True,
            )
            entry = figures.setdefault(name, {"rate": [], "cpu": []})
            entry["rate"].append(result["req_per_s"])
            entry["cpu"].append(result["server_cpu_ms_per_cert"])
    return {
        name: {key: statistics.median(values) for key, values in entry.items()}
        for name, entry in figures.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--load", action="store_true", help="also measure issuance under h2load")
    parser.add_argument("--requests", type=int, default=15_000)
    args = parser.parse_args()
    print(f"| case | us per line (median of {args.runs}) |\n|---|---:|")
    for name, micros in per_line(args.runs, args.lines).items():
        print(f"| {name} | {micros:.2f} |")
    if args.load:
        results = under_load(args.runs, args.requests)
        print(f"\n| set-up | cert/s (median of {args.runs}) | server CPU ms per cert |")
        print("|---|---:|---:|")
        for name, values in results.items():
            print(f"| {name} | {values['rate']:.0f} | {values['cpu']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
