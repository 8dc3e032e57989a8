"""The metrics' parts without a server: what each observation counts, and a scrape that
cannot read the database still answering."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meshca.adapters import metrics
from meshca.adapters.metrics import DatabaseState, MeshcaMetrics, serving_registry
from meshca.core.audit import AuditRecord, Outcome
from meshca.core.rotation import AuthoritySet

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _registry(fresh: MeshcaMetrics) -> CollectorRegistry:
    registry = CollectorRegistry()
    for collector in fresh.collectors():
        registry.register(collector)
    return registry


def test_outcomes_count_by_api_and_reason() -> None:
    fresh = MeshcaMetrics()
    issued = AuditRecord(time=NOW, outcome=Outcome.ISSUED, api="a", reason="ok", serial="1")
    refused = AuditRecord(time=NOW, outcome=Outcome.REFUSED, api="b", reason="weak-key")
    fresh.observe_outcome(issued, timedelta(milliseconds=3))
    fresh.observe_outcome(refused, timedelta(milliseconds=1))
    fresh.observe_commit(4, 1)
    fresh.observe_degraded("vault is down")
    samples = _samples(_registry(fresh))
    assert samples[("meshca_certificates_issued_total", (("api", "a"),))] == 1
    assert samples[("meshca_requests_refused_total", (("api", "b"), ("reason", "weak-key")))] == 1
    # A refusal is not an issuance: only the issued request is timed.
    assert samples[("meshca_issuance_duration_seconds_count", ())] == 1
    assert samples[("meshca_issuance_duration_seconds_sum", ())] == pytest.approx(0.003)
    assert samples[("meshca_record_batch_size_sum", ())] == 4
    assert samples[("meshca_record_write_failures_total", ())] == 1
    assert samples[("meshca_degraded", ())] == 1
    fresh.observe_degraded(None)
    assert _samples(_registry(fresh))[("meshca_degraded", ())] == 0


def test_the_policy_gauge_exists_once_a_set_was_loaded() -> None:
    fresh = MeshcaMetrics()
    assert not any(n == "meshca_policy_set_valid" for n, _ in _samples(_registry(fresh)))
    fresh.observe_policy_set(False)
    assert _samples(_registry(fresh))[("meshca_policy_set_valid", ())] == 0
    fresh.observe_policy_set(True)
    assert _samples(_registry(fresh))[("meshca_policy_set_valid", ())] == 1


def test_a_scrape_without_the_database_says_so_and_still_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics, "STATE_MAX_AGE", 0.0)
    down = True

    def read() -> DatabaseState:
        if down:
            raise OSError("connection refused")
        return DatabaseState(AuthoritySet(()), 7, 42, NOW - timedelta(seconds=90))

    registry = serving_registry(read, lambda: NOW)
    samples = _samples(registry)
    assert samples[("meshca_database_readable", ())] == 0
    assert ("meshca_log_tree_size", ()) not in samples
    down = False
    samples = _samples(registry)
    assert samples[("meshca_database_readable", ())] == 1
    assert samples[("meshca_trust_bundle_sequence", ())] == 7
    assert samples[("meshca_log_tree_size", ())] == 42
    assert samples[("meshca_log_signed_head_age_seconds", ())] == 90


def test_the_database_is_read_at_most_once_a_second() -> None:
    reads = []

    def read() -> DatabaseState:
        reads.append(1)
        return DatabaseState(AuthoritySet(()), 1, 0, None)

    registry = serving_registry(read, lambda: NOW)
    for _ in range(5):
        samples = _samples(registry)
    assert len(reads) == 1
    # No signed head yet: no age, rather than a made-up one.
    assert ("meshca_log_signed_head_age_seconds", ()) not in samples
