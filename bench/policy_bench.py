"""Policy benchmark: 10,000 authorization policies over 1,000 workloads.

    python bench/policy_bench.py [--runs 3] [--quick]

Each run generates the policy set afresh, then measures:

1. **In process**: ``meshca.core.policy.evaluate`` on one thread, over a rotating mix of
   1,000 requests (allowed and denied, every workload), timing each check; and the same
   requests against a set holding only the destinations' own policies, to show that the
   other workloads' policies cost nothing.
2. **Through Envoy's ext_authz gRPC API**: ``meshca serve --policy-dir
   --policy-insecure-main-port`` (plaintext on the main port, as h2load speaks h2c; two
   workers, every decision recorded), driven by h2load over h2c with a length-prefixed
   ``CheckRequest`` at concurrency 1 and 64. Valid only if the decision log grew by
   exactly the number of requests h2load completed (gRPC errors would arrive as HTTP 200).

Results go to bench/results/policy-<timestamp>.json; a Markdown table of medians is
printed. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import grpc
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from sqlalchemy import create_engine, func, select
from sqlalchemy.pool import NullPool

from meshca.adapters.grpc.client import channel_to
from meshca.adapters.k8s.dev_issuer import DevTokenIssuer
from meshca.adapters.policy_files import load_policy_dir
from meshca.adapters.storage.tables import DecisionRecordRow
from meshca.core.policy import AuthzRequest, PolicySet, evaluate

from loadgen import ensure_h2load, percentile, run_h2load
from meshca_ca import _meshca_argv, _wait_serving
from procs import LOCALHOST, free_port, group_cpu_seconds, managed_group
from workload import grpc_frame

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
TRUST_DOMAIN = "cluster.local"
NAMESPACES = 100
ACCOUNTS_PER_NAMESPACE = 10
POLICIES_PER_WORKLOAD = 10
METHOD = "/envoy.service.auth.v3.Authorization/Check"
WORKERS = 2


def spiffe(namespace: int, account: int) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/ns{namespace}/sa/w{account}"


def _workload_policies(ns: int, sa: int) -> list[str]:
    """Ten policies for one workload: 7 ALLOW, 2 DENY and 1 AUDIT, with varied rules."""
    docs = []
    peer = (sa + 1) % ACCOUNTS_PER_NAMESPACE
    other_ns = (ns + 1) % NAMESPACES
    for k in range(7):
        docs.append(
            f"""apiVersion: meshca.io/v1
kind: AuthorizationPolicy
metadata: {{name: w{sa}-allow-{k}, namespace: ns{ns}}}
spec:
  selector: {{serviceAccounts: [w{sa}]}}
  action: ALLOW
  rules:
    - from:
        - source:
            principals: ["{spiffe(ns, (peer + k) % ACCOUNTS_PER_NAMESPACE)}"]
      to:
        - operation:
            methods: ["GET", "HEAD"]
            paths: ["/api/v{k}/*", "/status"]
    - from:
        - source:
            namespaces: ["ns{other_ns}"]
      to:
        - operation:
            methods: ["POST"]
            paths: ["/api/v{k}/orders"]
            ports: ["8080"]
      when:
        - key: request.headers[x-tenant]
          values: ["tenant-{k}", "shared-*"]
"""
        )
    for k in range(2):
        docs.append(
            f"""apiVersion: meshca.io/v1
kind: AuthorizationPolicy
metadata: {{name: w{sa}-deny-{k}, namespace: ns{ns}}}
spec:
  selector: {{serviceAccounts: [w{sa}]}}
  action: DENY
  rules:
    - to:
        - operation:
            paths: ["/admin{k}", "/admin{k}/*"]
    - from:
        - source:
            ipBlocks: ["192.168.{k}.0/24"]
"""
        )
    docs.append(
        f"""apiVersion: meshca.io/v1
kind: AuthorizationPolicy
metadata: {{name: w{sa}-audit, namespace: ns{ns}}}
spec:
  selector: {{serviceAccounts: [w{sa}]}}
  action: AUDIT
  rules:
    - to: [{{operation: {{methods: ["DELETE"]}}}}]
"""
    )
    return docs


def write_policies(directory: Path, namespaces: int = NAMESPACES) -> int:
    """One file per namespace, ten policies per workload; returns the number written."""
    directory.mkdir(parents=True, exist_ok=True)
    count = 0
    for ns in range(namespaces):
        docs = []
        for sa in range(ACCOUNTS_PER_NAMESPACE):
            docs += _workload_policies(ns, sa)
        count += len(docs)
        (directory / f"ns{ns:03}.yaml").write_text("---\n".join(docs))
    return count


def requests(count: int, seed: int, namespaces: int = NAMESPACES) -> list[AuthzRequest]:
    """A reproducible mix: allowed GETs, allowed tenant POSTs, denied admin and strangers."""
    rng = random.Random(seed)
    mix = []
    for _ in range(count):
        ns = rng.randrange(namespaces)
        sa = rng.randrange(ACCOUNTS_PER_NAMESPACE)
        kind = rng.randrange(4)
        k = rng.randrange(7)
        peer = (sa + 1 + k) % ACCOUNTS_PER_NAMESPACE
        if kind == 0:
            request = AuthzRequest(spiffe(ns, peer), spiffe(ns, sa), "GET", f"/api/v{k}/items/1")
        elif kind == 1:
            request = AuthzRequest(
                spiffe((ns + 1) % NAMESPACES, 3),
                spiffe(ns, sa),
                "POST",
                f"/api/v{k}/orders",
                headers={"x-tenant": "shared-eu"},
                destination_port=8080,
            )
        elif kind == 2:
            request = AuthzRequest(spiffe(ns, peer), spiffe(ns, sa), "GET", "/admin1/users")
        else:
            request = AuthzRequest(spiffe((ns + 7) % NAMESPACES, 1), spiffe(ns, sa), "GET", "/")
        mix.append(request)
    return mix


@dataclass(frozen=True)
class InProcess:
    checks: int
    checks_per_s: float
    p50_us: float
    p99_us: float
    allowed_share: float


def measure_in_process(policy_set: PolicySet, mix: list[AuthzRequest], checks: int) -> InProcess:
    """Time every check; throughput is checks over the summed check time (one thread)."""
    for request in mix:  # warm the per-destination cache, as a running server would be
        evaluate(policy_set, request)
    timings = []
    allowed = 0
    clock = time.perf_counter_ns
    size = len(mix)
    for i in range(checks):
        request = mix[i % size]
        started = clock()
        decision = evaluate(policy_set, request)
        timings.append(clock() - started)
        allowed += decision.allowed
    timings.sort()
    total_s = sum(timings) / 1e9
    return InProcess(
        checks=checks,
        checks_per_s=checks / total_s,
        p50_us=percentile(timings, 50) / 1000,
        p99_us=percentile(timings, 99) / 1000,
        allowed_share=allowed / checks,
    )


def check_request(request: AuthzRequest) -> Any:
    Peer = attribute_context_pb2.AttributeContext.Peer
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method=request.method, path=request.path, host="svc.local", headers=dict(request.headers)
    )
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            source=Peer(principal=request.source_principal or ""),
            destination=Peer(
                principal=request.destination_principal or "",
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(
                        address="10.0.0.2", port_value=request.destination_port or 8080
                    )
                ),
            ),
            request=attribute_context_pb2.AttributeContext.Request(http=http),
        )
    )


class _DecisionCounter:
    """Counts rows of meshca's decision log (SQLite, read only)."""

    def __init__(self, db: Path) -> None:
        self._engine = create_engine(f"sqlite:///file:{db}?mode=ro&uri=true", poolclass=NullPool)
        self._query = select(func.count()).select_from(DecisionRecordRow)

    def count(self) -> int:
        with self._engine.connect() as connection:
            return int(connection.execute(self._query).scalar_one())

    def close(self) -> None:
        self._engine.dispose()


@contextlib.contextmanager
def meshca_server(workdir: Path, policy_dir: Path) -> Iterator[tuple[str, int, _DecisionCounter]]:
    """``meshca serve --policy-dir`` on a free port; yields target, pgid and a row counter."""
    issuer = DevTokenIssuer(workdir / "dev-issuer")
    issuer.ensure()
    port = free_port()
    target = f"{LOCALHOST}:{port}"
    command, cwd = _meshca_argv()
    argv = [
        *command, "serve", "--listen", target, "--data-dir", str(workdir / "data"),
        "--trust-domain", TRUST_DOMAIN, "--k8s-mode", "jwks", "--k8s-issuer", issuer.issuer,
        "--k8s-jwks-file", str(issuer.jwks_path), "--k8s-audience", "meshca", "--plaintext",
        "--workers", str(WORKERS), "--log-level", "warning", "--policy-dir", str(policy_dir),
        "--policy-insecure-main-port",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")}
    with managed_group(argv, workdir / "meshca.log", env=env, cwd=cwd) as proc:
        _wait_serving(target, lambda: proc.poll() is None, 120.0)
        counter = _DecisionCounter(workdir / "data" / "meshca.db")
        try:
            yield target, proc.pid, counter
        finally:
            counter.close()


def _check_one(target: str, body: Any, expect_allowed: bool) -> None:
    with channel_to(target, None) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        for _ in range(50):  # every worker must have loaded the set
            try:
                response = stub.Check(body, timeout=10)
            except grpc.RpcError:
                time.sleep(0.2)
                continue
            if (response.status.code == 0) == expect_allowed:
                return
            time.sleep(0.2)
    raise RuntimeError(f"ext_authz at {target} does not answer as expected")


def _wait_records_settle(counter: _DecisionCounter, expected: int, timeout: float = 30) -> int:
    """Decision records are written just after the answer; wait for them to land."""
    deadline = time.monotonic() + timeout
    count = counter.count()
    while count < expected and time.monotonic() < deadline:
        time.sleep(0.1)
        count = counter.count()
    return count


def measure_grpc(
    h2load: str,
    workdir: Path,
    policy_dir: Path,
    levels: list[tuple[int, int]],
    namespaces: int,
) -> list[dict[str, Any]]:
    # A request the destination's last ALLOW policy decides (worst case within the workload).
    dest_ns, dest_sa = min(42, namespaces - 1), 4
    source = spiffe(dest_ns, (dest_sa + 1 + 6) % ACCOUNTS_PER_NAMESPACE)
    allowed = AuthzRequest(source, spiffe(dest_ns, dest_sa), "GET", "/api/v6/items/1?x=1")
    message = check_request(allowed)
    body = workdir / "check.bin"
    body.write_bytes(grpc_frame(message.SerializeToString()))
    rows = []
    with meshca_server(workdir, policy_dir) as (target, pgid, counter):
        _check_one(target, message, expect_allowed=True)
        for concurrency, count in levels:
            common = {
                "body": body,
                "headers": ["content-type: application/grpc", "te: trailers"],
                "clients": concurrency,
                "streams": 1,
                "http1": False,
                "log_file": workdir / f"h2load-{concurrency}.log",
            }
            url = f"http://{target}{METHOD}"
            run_h2load(h2load, url, requests=max(200, count // 10), timeout=300, **common)
            time.sleep(0.5)  # let the warm-up's records land first
            before = counter.count()
            cpu_before = group_cpu_seconds(pgid)
            result = run_h2load(h2load, url, requests=count, timeout=600, **common)
            cpu_after = group_cpu_seconds(pgid)
            after = _wait_records_settle(counter, before + result.done)
            problems = []
            if not result.clean:
                problems.append(f"h2load: {result.succeeded}/{result.requests} succeeded")
            if after - before != result.done:
                problems.append(
                    f"decision log grew by {after - before}, h2load completed {result.done}"
                )
            rows.append(
                {
                    "concurrency": concurrency,
                    "requests": result.requests,
                    "checks_per_s": result.req_per_s,
                    "p50_ms": result.p50_ms,
                    "p99_ms": result.p99_ms,
                    "server_cpu_cores": (cpu_after - cpu_before) / result.wall_seconds,
                    "decisions_recorded": after - before,
                    "valid": not problems,
                    "problems": problems,
                }
            )
            flag = "" if not problems else "  INVALID: " + "; ".join(problems)
            print(
                f"    grpc c={concurrency:<3} {result.req_per_s:8.0f} checks/s  "
                f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms{flag}",
                flush=True,
            )
    return rows


def one_run(index: int, h2load: str, quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="meshca-policy-bench-") as tmp:
        workdir = Path(tmp)
        policy_dir = workdir / "policies"
        namespaces = 10 if quick else NAMESPACES
        written = write_policies(policy_dir, namespaces)
        started = time.perf_counter()
        policy_set = load_policy_dir(policy_dir)
        load_s = time.perf_counter() - started
        mix = requests(1000, seed=index, namespaces=namespaces)
        checks = 20_000 if quick else 200_000
        full = measure_in_process(policy_set, mix, checks)
        # Requests to 20 workloads, against the whole set and against a set holding only
        # those workloads' own policies: the index makes the other policies cost nothing.
        few = requests(1000, seed=index, namespaces=2)
        few_full = measure_in_process(policy_set, few, checks)
        selected = {
            id(p) for r in few for p in policy_set.targets(r.destination_principal or "").all
        }
        own = PolicySet([p for p in policy_set.policies if id(p) in selected], "own")
        few_own = measure_in_process(own, few, checks)
        print(
            f"  run {index}: {written} policies loaded in {load_s:.2f} s; in process "
            f"{full.checks_per_s:,.0f} checks/s p50 {full.p50_us:.1f} us p99 {full.p99_us:.1f} us;"
            f" 20 workloads: {few_full.checks_per_s:,.0f} checks/s with all policies, "
            f"{few_own.checks_per_s:,.0f} with only their {len(own)}",
            flush=True,
        )
        levels = [(1, 500), (64, 2000)] if quick else [(1, 5_000), (64, 30_000)]
        grpc_rows = measure_grpc(h2load, workdir, policy_dir, levels, namespaces)
        return {
            "run": index,
            "policies": written,
            "workloads": namespaces * ACCOUNTS_PER_NAMESPACE,
            "load_seconds": load_s,
            "in_process": full.__dict__,
            "in_process_20_workloads_all_policies": few_full.__dict__,
            "in_process_20_workloads_own_policies": {**few_own.__dict__, "policies": len(own)},
            "grpc": grpc_rows,
        }


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summary(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| measurement | checks/s | p50 | p99 | server CPU (cores) | valid runs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    total = runs[0]["policies"] if runs else 0
    workloads = runs[0]["workloads"] if runs else 0
    own = runs[0]["in_process_20_workloads_own_policies"]["policies"] if runs else 0
    for key, label in (
        ("in_process", f"in process, requests to all {workloads:,} workloads, {total:,} policies"),
        (
            "in_process_20_workloads_all_policies",
            f"in process, requests to 20 workloads, {total:,} policies",
        ),
        (
            "in_process_20_workloads_own_policies",
            f"in process, requests to 20 workloads, only their {own} policies",
        ),
    ):
        rows = [r[key] for r in runs]
        lines.append(
            f"| {label} | {_median([r['checks_per_s'] for r in rows]):,.0f} | "
            f"{_median([r['p50_us'] for r in rows]):.1f} us | "
            f"{_median([r['p99_us'] for r in rows]):.1f} us | 1 thread | {len(rows)} |"
        )
    levels = sorted({row["concurrency"] for r in runs for row in r["grpc"]})
    for level in levels:
        rows = [row for r in runs for row in r["grpc"] if row["concurrency"] == level]
        valid = [row for row in rows if row["valid"]]
        lines.append(
            f"| ext_authz gRPC, concurrency {level} | "
            f"{_median([r['checks_per_s'] for r in valid]):,.0f} | "
            f"{_median([r['p50_ms'] for r in valid]):.2f} ms | "
            f"{_median([r['p99_ms'] for r in valid]):.2f} ms | "
            f"{_median([r['server_cpu_cores'] for r in valid]):.2f} | "
            f"{len(valid)} of {len(rows)} |"
        )
    load = _median([r["load_seconds"] for r in runs])
    lines.append("")
    lines.append(f"Loading and compiling the policy files: {load:.2f} s (median).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, help="repetitions; medians are reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="1,000 policies, tiny counts, 1 run")
    args = parser.parse_args(argv)
    runs_wanted = args.runs or (1 if args.quick else 3)
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    os.environ["no_grpc_proxy"] = "127.0.0.1,localhost"
    h2load = ensure_h2load()
    started = datetime.now(UTC)
    runs = []
    for index in range(1, runs_wanted + 1):
        print(f"run {index}/{runs_wanted}", flush=True)
        runs.append(one_run(index, h2load, args.quick))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"policy-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(
        json.dumps(
            {
                "started": started.isoformat(timespec="seconds"),
                "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                "command": ["python", "bench/policy_bench.py", *(argv or sys.argv[1:])],
                "nproc": len(os.sched_getaffinity(0)),
                "workers": WORKERS,
                "runs": runs,
            },
            indent=2,
        )
        + "\n"
    )
    print()
    print(summary(runs))
    print(f"\nresults: {out.relative_to(BENCH.parent)}")
    invalid = any(not row["valid"] for r in runs for row in r["grpc"])
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
