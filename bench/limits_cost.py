"""What caller checks cost per request: the issuance rate limit, the per-API cap, the
deny-list lookup. CPU per call in a tight loop, median of several runs.

Usage: python bench/limits_cost.py [--runs 5] [--calls 200000]

These run on the signing path once per request (the cap on every call of an API);
a certificate costs about 1 ms of CPU, so the figures are read against that.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from meshca.adapters.grpc._gen.meshca.v1 import ca_pb2
from meshca.adapters.grpc.ca_servicer import CertificateServicer
from meshca.adapters.grpc.limits import DEFAULT_API_CAPS, CallLimits
from meshca.adapters.shared_rate import SharedRateLimiter, create_rate_table
from meshca.core.denylist import DenyEntry, DenyKind, DenyList
from meshca.core.rate_limit import IssuanceRate, RateLimiter

NOW = datetime(2026, 11, 28, tzinfo=UTC)
PODS = 10_000


def _per_call(run: Callable[[int], None], calls: int, runs: int) -> float:
    """Median µs per call over ``runs`` runs of ``calls`` calls."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        run(calls)
        samples.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(samples)


def _rate(limiter: RateLimiter | SharedRateLimiter) -> Callable[[int], None]:
    keys = [f"pod-{i:05d}-0000-0000-0000-000000000000" for i in range(PODS)]

    def run(calls: int) -> None:
        for i in range(calls):
            limiter.admit(keys[i % PODS], NOW + timedelta(microseconds=i))

    return run


def _cap() -> Callable[[int], None]:
    limits = CallLimits(DEFAULT_API_CAPS)
    cap = limits.cap_for(CertificateServicer.__new__(CertificateServicer), "Sign")
    assert cap is not None
    request = ca_pb2.SignRequest(csr=b"x" * 600)

    def run(calls: int) -> None:
        for _ in range(calls):
            cap.enter(request)
            cap.leave()

    return run


def _deny(entries: int) -> Callable[[int], None]:
    listed = tuple(
        DenyEntry(i, DenyKind.SPIFFE_ID, f"spiffe://example.org/ns/n{i}/sa/s", "r", "me", NOW)
        for i in range(entries)
    )
    deny = DenyList(revision=entries, entries=listed)
    who = "spiffe://example.org/ns/shop/sa/cart"

    def run(calls: int) -> None:
        for _ in range(calls):
            deny.is_denied(who, None, None, NOW)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    rate = IssuanceRate(10, timedelta(hours=1))
    with tempfile.TemporaryDirectory() as tmp:
        table = create_rate_table(Path(tmp), rate)
        shared = SharedRateLimiter(table, rate)
        rows = [
            ("--issuance-rate, shared table (serve)", _rate(shared)),
            ("--issuance-rate, in-process", _rate(RateLimiter(rate))),
            ("per-API cap, enter + leave", _cap()),
            ("deny-list lookup, empty", _deny(0)),
            ("deny-list lookup, 1,000 identity entries", _deny(1000)),
        ]
        print(f"median of {args.runs} runs of {args.calls:,} calls, {PODS:,} pods")
        for name, run in rows:
            print(f"{name:45s} {_per_call(run, args.calls, args.runs):6.2f} µs/call")


if __name__ == "__main__":
    main()
