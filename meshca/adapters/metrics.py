"""Prometheus metrics: what meshca counts, and the ``/metrics`` endpoint that serves it.

``meshca serve`` runs a supervisor and several worker processes. Every process counts
into memory-mapped files in one directory (prometheus_client's multiprocess mode), and
the supervisor, which serves no requests, sums them when scraped: a scrape reads files
and never waits on a worker. What lives in the database (the authorities' lifetimes,
the bundle's sequence, the log's size and newest signed head) is read at scrape time,
at most once a second, off every worker.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
    start_http_server,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.registry import Collector

from meshca.core.audit import AuditRecord, Outcome
from meshca.core.identity import KubernetesIdentity
from meshca.core.policy import Decision
from meshca.core.ports import Attestor
from meshca.core.rotation import AuthoritySet, AuthorityState

__all__ = [
    "DatabaseState",
    "MetricsServer",
    "TimedAttestor",
    "count_into",
    "meshca_metrics",
    "start_metrics_server",
]

log = logging.getLogger(__name__)

MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Issuance takes about a millisecond; a record commit can take tens.
_SECONDS_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
#: A scrape reads the database at most this often; faster scrapers see the last read.
STATE_MAX_AGE = 1.0


def count_into(directory: Path) -> None:
    """Count into files under ``directory``, in this process and in processes it starts.

    Call before ``meshca_metrics()`` is first used: the metrics choose where to count
    when they are made. Children inherit the setting through the environment.
    """
    os.environ[MULTIPROCESS_DIR_ENV] = str(directory)
    values.ValueClass = values.MultiProcessValue()


def _counting_in_files() -> bool:
    return MULTIPROCESS_DIR_ENV in os.environ


#: The first size of a count file: room for about 450 series, four times what a meshca
#: process has (prometheus_client's own first size, 1 MiB, would be allocated in full).
COUNT_FILE_BYTES = 64 * 1024


def _count_file(filename: str, read_mode: bool = False) -> MmapedDict:
    """prometheus_client's count file, with every block of it allocated first.

    The file is memory-mapped. Left sparse, as prometheus_client makes it, the first write
    to one of its pages on a full disk kills the process with SIGBUS; allocated when the
    file is opened, the disk has nothing more to give later, and a disk already full
    fails the open with an OSError instead. (A file that outgrows ``COUNT_FILE_BYTES`` is
    grown sparse again by prometheus_client.)
    """
    if not read_mode:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size or COUNT_FILE_BYTES)
        finally:
            os.close(fd)
    return MmapedDict(filename, read_mode)


class MeshcaMetrics:
    """The series meshca's processes update as they work (one instance per process)."""

    def __init__(self) -> None:
        # Not registered anywhere: the serving registry chooses how to collect them.
        self.issued = Counter(
            "meshca_certificates_issued",
            "Certificates issued, their records committed, by the API they came through.",
            ["api"],
            registry=None,
        )
        self.refused = Counter(
            "meshca_requests_refused",
            "Signing requests refused, by API and the reason recorded in the issuance log.",
            ["api", "reason"],
            registry=None,
        )
        self.issuance_seconds = Histogram(
            "meshca_issuance_duration_seconds",
            "From a signing request's arrival to its certificate's record being committed.",
            buckets=_SECONDS_BUCKETS,
            registry=None,
        )
        self.attestation_seconds = Histogram(
            "meshca_attestation_duration_seconds",
            "Token verifications that were not answered from the cache, by k8s mode.",
            ["mode"],
            buckets=_SECONDS_BUCKETS,
            registry=None,
        )
        self.batch_size = Histogram(
            "meshca_record_batch_size",
            "Issuance records committed together in one transaction.",
            buckets=_BATCH_BUCKETS,
            registry=None,
        )
        self.write_failures = Counter(
            "meshca_record_write_failures",
            "Issuance records that could not be committed (their certificates were withheld).",
            registry=None,
        )
        self.policy_decisions = Counter(
            "meshca_policy_decisions",
            "Authorization decisions made for ext_authz and PolicyService Check.",
            ["result"],
            registry=None,
        )
        # Made when a policy set is first loaded: without --policy-dir there is no series,
        # and a process that loads none (the supervisor) does not pull the minimum to 0.
        self._policy_set_valid: Gauge | None = None
        self.degraded = Gauge(
            "meshca_degraded",
            "1 when a CA rotation round is failing (issuance goes on, renewal does not).",
            multiprocess_mode="livemax",
            registry=None,
        )

    def collectors(self) -> tuple[Collector, ...]:
        return (
            self.issued,
            self.refused,
            self.issuance_seconds,
            self.attestation_seconds,
            self.batch_size,
            self.write_failures,
            self.policy_decisions,
            self.degraded,
            *([] if self._policy_set_valid is None else [self._policy_set_valid]),
        )

    def observe_outcome(self, record: AuditRecord, duration: timedelta) -> None:
        """An ``OutcomeObserver``: counts each signing request by how it ended."""
        if record.outcome is Outcome.ISSUED:
            self.issued.labels(record.api).inc()
            self.issuance_seconds.observe(duration.total_seconds())
        else:
            self.refused.labels(record.api, record.reason).inc()

    def observe_commit(self, size: int, failed: int) -> None:
        """One transaction of ``size`` records, ``failed`` of which were not committed."""
        self.batch_size.observe(size)
        if failed:
            self.write_failures.inc(failed)

    def observe_decision(self, decision: Decision) -> None:
        self.policy_decisions.labels("allow" if decision.allowed else "deny").inc()

    def observe_policy_set(self, valid: bool) -> None:
        if self._policy_set_valid is None:
            self._policy_set_valid = Gauge(
                "meshca_policy_set_valid",
                "1 when every process serves a valid policy set loaded from --policy-dir.",
                multiprocess_mode="livemin",
                registry=None,
            )
        self._policy_set_valid.set(1 if valid else 0)

    def observe_degraded(self, problem: str | None) -> None:
        self.degraded.set(0 if problem is None else 1)


_metrics: MeshcaMetrics | None = None
_metrics_lock = threading.Lock()


def meshca_metrics() -> MeshcaMetrics:
    """This process's metrics, made on first use (after ``count_into``, if at all)."""
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            disable_created_metrics()
            if _counting_in_files():
                # Read when each process opens its files, which is on its first count.
                values.MmapedDict = _count_file  # type: ignore[attr-defined,assignment]
            _metrics = MeshcaMetrics()
        return _metrics


class TimedAttestor:
    """An ``Attestor`` that times each verification of the one it wraps."""

    def __init__(self, inner: Attestor, observe: Callable[[float], None]) -> None:
        self._inner = inner
        self._observe = observe

    async def attest(self, token: str) -> KubernetesIdentity:
        started = time.perf_counter()
        try:
            return await self._inner.attest(token)
        finally:
            self._observe(time.perf_counter() - started)


@dataclass(frozen=True)
class DatabaseState:
    """What the scrape reads from the database; ``head_time`` None before the first head."""

    authorities: AuthoritySet
    bundle_sequence: int
    tree_size: int
    head_time: datetime | None


class _ThisProcess(Collector):
    """This process's metrics, as they are at each scrape (some are made late)."""

    def collect(self) -> Iterable[Metric]:
        for collector in meshca_metrics().collectors():
            yield from collector.collect()


class _DatabaseCollector(Collector):
    """The database's side of the metrics, read when scraped (at most once a second)."""

    def __init__(self, read: Callable[[], DatabaseState], now: Callable[[], datetime]) -> None:
        self._read = read
        self._now = now
        self._lock = threading.Lock()
        self._last: tuple[float, DatabaseState | None] = (float("-inf"), None)

    def _state(self) -> DatabaseState | None:
        with self._lock:
            read_at, state = self._last
            if time.monotonic() - read_at >= STATE_MAX_AGE:
                try:
                    state = self._read()
                except Exception as error:
                    log.warning("metrics: cannot read the database: %s", error)
                    state = None
                self._last = (time.monotonic(), state)
            return state

    def collect(self) -> Iterable[Metric]:
        state = self._state()
        yield GaugeMetricFamily(
            "meshca_database_readable",
            "1 when this scrape could read the CA's state from the database.",
            value=0 if state is None else 1,
        )
        if state is None:
            return
        yield from _authority_families(state)
        yield GaugeMetricFamily(
            "meshca_log_tree_size", "Records in the verifiable issuance log.", state.tree_size
        )
        if state.head_time is not None:
            age = (self._now() - state.head_time).total_seconds()
            yield GaugeMetricFamily(
                "meshca_log_signed_head_age_seconds",
                "Seconds since the newest signed tree head of the issuance log.",
                max(age, 0.0),
            )


def _authority_families(state: DatabaseState) -> Iterator[Metric]:
    not_after = GaugeMetricFamily(
        "meshca_authority_not_after_timestamp_seconds",
        "When each root and intermediate in the journal expires (Unix time).",
        labels=["role", "state", "id"],
    )
    for entry in state.authorities.entries:
        if entry.state is not AuthorityState.REMOVED:
            labels = [entry.kind.value, entry.state.value, entry.id]
            not_after.add_metric(labels, entry.not_after.timestamp())
    yield not_after
    yield GaugeMetricFamily(
        "meshca_trust_bundle_sequence",
        "The trust bundle's sequence number; the same on every replica.",
        state.bundle_sequence,
    )


def serving_registry(read_state: Callable[[], DatabaseState], now: Callable[[], datetime]) -> Any:
    """What ``/metrics`` serves: every process's counts, and the database's state."""
    registry = CollectorRegistry()
    if _counting_in_files():
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_ThisProcess())
    registry.register(_DatabaseCollector(read_state, now))
    return registry


@dataclass
class MetricsServer:
    """The running ``/metrics`` endpoint (a thread of this process)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(
    listen: str, read_state: Callable[[], DatabaseState], now: Callable[[], datetime]
) -> MetricsServer:
    """Serve the Prometheus text format at ``http://listen/metrics`` from a thread."""
    host, _, port = listen.rpartition(":")
    server, thread = start_http_server(
        int(port), addr=host.strip("[]"), registry=serving_registry(read_state, now)
    )
    return MetricsServer(server, thread)
