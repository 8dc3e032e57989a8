"""Graceful-shutdown trials: SIGTERM under load, then count what every call got.

    flock /tmp/meshca-bench.lock python bench/shutdown_trials.py [--runs 10] [--clients 48]
                                   [--grace 10] [--warmup 1.0] [--modes serve,dev]

Each run starts a fresh server (``meshca serve --workers 2`` or ``meshca dev serve``,
plaintext, jwks mode, ``--shutdown-grace``), drives ``--clients`` concurrent clients
(each on its own channel, calling CreateCertificate in a loop) for ``--warmup`` seconds,
sends SIGTERM, and records: calls in flight at SIGTERM (see below), how many calls
succeeded, failed UNAVAILABLE or failed otherwise, certificates without an ISSUED record
in the database (must be 0), and the time from SIGTERM to the process's exit and to its
last descendant's exit. Calls in flight are counted twice: as the clients see them
(sent, not yet answered: with closed-loop clients, nearly all of them) and as the
servers' call gates counted them when the drain began (in the handlers; the rest were
still queued in grpc or on the wire). A Markdown summary is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from tests.integration.server_harness import TokenMinter, serve_command
from tests.integration.shutdown_harness import (
    DEV_PORT,
    OK,
    SERVE_PORT,
    UNAVAILABLE,
    Load,
    dev_command,
    end_served,
    issued_serials,
    sigterm_under_load,
    start_served,
)

from meshca.adapters.k8s.dev_issuer import DevTokenIssuer


async def trial(mode: str, base: Path, clients: int, grace: float, warmup: float) -> dict:
    if mode == "serve":
        minter, jwks = TokenMinter.create(base)
        flags = ["--plaintext", "--shutdown-grace", f"{grace}s"]
        command = serve_command(base / "data", jwks, workers=2, extra=flags)
        served = start_served(command, base / "data", SERVE_PORT, "serving on", 2)
        tokens = [minter.mint("shop", f"sa{i}") for i in range(clients)]
    else:
        data_dir = base / "dev"
        served = start_served(dev_command(data_dir, grace), data_dir, DEV_PORT, "serving on", 1)
        issuer = DevTokenIssuer(data_dir / "dev-issuer")
        now = datetime.now(UTC)
        tokens = [issuer.mint("shop", f"sa{i}", "meshca", now=now) for i in range(clients)]
    try:
        load = Load(served.target, tokens)
        stopped = await sigterm_under_load(served, load, warmup)
        missing = set(load.serials) - issued_serials(served.data_dir)
        other = sum(n for code, n in load.outcomes.items() if code not in (OK, UNAVAILABLE))
        said = "".join(served.output)
        in_handlers = sum(int(n) for n in re.findall(r"(\d+) call\(s\) in flight", said))
        return {
            "in_flight": stopped.in_flight_at_signal,
            "in_handlers": in_handlers,
            "ok": load.outcomes[OK],
            "unavailable": load.outcomes[UNAVAILABLE],
            "other": other,
            "other_codes": sorted(set(load.outcomes) - {OK, UNAVAILABLE}),
            "missing_records": len(missing),
            "exit_code": stopped.exit_code,
            "exit_s": stopped.exit_seconds,
            "tree_gone_s": stopped.tree_gone_seconds,
        }
    finally:
        end_served(served)


def summary(mode: str, runs: list[dict]) -> str:
    exits = [r["exit_s"] for r in runs]
    gone = [r["tree_gone_s"] for r in runs]
    total = collections.Counter()
    for r in runs:
        total.update({k: r[k] for k in ("ok", "unavailable", "other", "missing_records")})

    def spread(key: str) -> str:
        values = [r[key] for r in runs]
        return f"{statistics.median(values):g} ({min(values)}-{max(values)})"

    return (
        f"| {mode} | {len(runs)} | {spread('in_flight')} | {spread('in_handlers')} | "
        f"{total['ok']} | {total['unavailable']} | {total['other']} | "
        f"{total['missing_records']} | {sum(r['exit_code'] != 0 for r in runs)} | "
        f"{statistics.median(exits):.2f} / {max(exits):.2f} | "
        f"{statistics.median(gone):.2f} / {max(gone):.2f} |"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--modes", default="serve,dev")
    args = parser.parse_args()
    lines = []
    for mode in args.modes.split(","):
        runs = []
        for i in range(args.runs):
            with tempfile.TemporaryDirectory(prefix=f"meshca-shutdown-{mode}-") as base:
                result = await trial(mode, Path(base), args.clients, args.grace, args.warmup)
            print(f"{mode} run {i + 1}: {result}", flush=True)
            runs.append(result)
        lines.append(summary(mode, runs))
    print(
        f"\n{args.clients} clients, --shutdown-grace {args.grace:g}s, SIGTERM after "
        f"{args.warmup:g}s of load\n\n"
        "| server | runs | in flight at SIGTERM (clients), median (range) "
        "| in the handlers (servers) | OK | UNAVAILABLE | other "
        "| certificates without a record | non-zero exits | SIGTERM to exit, s, median / max "
        "| to last child gone, s, median / max |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
