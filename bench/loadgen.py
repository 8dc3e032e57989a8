"""Drive h2load and turn its output into numbers.

Throughput is h2load's own "X req/s" (completed requests over the whole run, connection
setup included). Latency percentiles come from ``--log-file``: h2load prints only
min/max/mean/sd, so p50 and p99 are computed here from every request's elapsed time.
"""

from __future__ import annotations

import math
import os
import re
import resource
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["H2loadError", "LoadResult", "ensure_h2load", "percentile", "run_h2load"]

_FINISHED = re.compile(r"finished in [0-9.]+\w+, ([0-9.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)


class H2loadError(RuntimeError):
    """h2load is missing, failed, timed out or printed something we cannot read."""


def ensure_h2load() -> str:
    """The path of ``h2load``, installing Debian's nghttp2-client first if it is missing."""
    found = shutil.which("h2load")
    if found:
        return found
    print("h2load not found: installing nghttp2-client with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "nghttp2-client"], check=True, env=env)
    found = shutil.which("h2load")
    if not found:
        raise H2loadError("nghttp2-client is installed but h2load is still not on PATH")
    return found


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an ascending, non-empty sequence."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True)
class LoadResult:
    """One h2load run. Latencies are in milliseconds, over requests with a 2xx status."""

    clients: int
    streams: int
    requests: int
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_2xx: int
    wall_seconds: float
    req_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    h2load_cpu_seconds: float
    #: What h2load negotiated, from its output: e.g. "TLSv1.3" (None without TLS), "h2".
    tls_protocol: str | None
    application_protocol: str | None

    @property
    def clean(self) -> bool:
        """Every request was answered with a 2xx status (HTTP level only)."""
        return self.succeeded == self.requests == self.status_2xx and not (
            self.failed or self.errored or self.timeout
        )


def run_h2load(
    h2load: str,
    url: str,
    *,
    body: Path,
    headers: Sequence[str],
    clients: int,
    streams: int,
    requests: int,
    http1: bool,
    log_file: Path,
    timeout: float,
) -> LoadResult:
    """POST ``body`` to ``url`` ``requests`` times with ``clients`` x ``streams`` in flight.

    One h2load thread: it needs a fraction of a core at these rates and the servers need
    the rest. Raises ``H2loadError`` if h2load fails or runs longer than ``timeout``.
    """
    argv = [
        h2load,
        "-n",
        str(requests),
        "-c",
        str(clients),
        "-m",
        str(streams),
        "-t",
        "1",
        "-d",
        str(body),
        f"--log-file={log_file}",
    ]
    if http1:
        argv.append("--h1")
    for header in headers:
        argv += ["-H", header]
    argv.append(url)
    log_file.unlink(missing_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise H2loadError(f"h2load did not finish {requests} requests in {timeout:.0f}s") from exc
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise H2loadError(f"h2load exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    return _parse(done.stdout, log_file, clients, streams, wall, cpu)


def _parse(
    out: str, log_file: Path, clients: int, streams: int, wall: float, cpu: float
) -> LoadResult:
    finished = _FINISHED.search(out)
    counts = _REQUESTS.search(out)
    status = re.search(r"status codes: (\d+) 2xx", out)
    if not (finished and counts and status):
        raise H2loadError(f"cannot read h2load's output:\n{out[-1500:]}")
    total, _started, done, succeeded, failed, errored, timeout = map(int, counts.groups())
    tls = re.search(r"^TLS Protocol: (\S+)", out, re.MULTILINE)
    alpn = re.search(r"^Application protocol: (\S+)", out, re.MULTILINE)
    elapsed_ms = sorted(_elapsed_2xx_ms(log_file))
    if not elapsed_ms:
        raise H2loadError(f"h2load logged no successful request in {log_file}:\n{out[-1500:]}")
    return LoadResult(
        clients=clients,
        streams=streams,
        requests=total,
        done=done,
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        timeout=timeout,
        status_2xx=int(status.group(1)),
        wall_seconds=wall,
        req_per_s=float(finished.group(1)),
        p50_ms=percentile(elapsed_ms, 50),
        p99_ms=percentile(elapsed_ms, 99),
        mean_ms=sum(elapsed_ms) / len(elapsed_ms),
        max_ms=elapsed_ms[-1],
        h2load_cpu_seconds=cpu,
        tls_protocol=tls.group(1) if tls else None,
        application_protocol=alpn.group(1) if alpn else None,
    )


def _elapsed_2xx_ms(log_file: Path) -> list[float]:
    """Per-request elapsed time from h2load's log: start(us) TAB status TAB elapsed(us)."""
    values = []
    with log_file.open() as log:
        for line in log:
            parts = line.split("\t")
            if len(parts) >= 3 and parts[1].startswith("2"):
                values.append(int(parts[2]) / 1000)
    return values
