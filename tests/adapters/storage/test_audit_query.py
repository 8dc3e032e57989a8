"""Audit queries: every filter, pagination and hostile values, the same on both databases."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, func, inspect, select

from meshca.adapters.storage import SqlAuditLog
from meshca.adapters.storage.audit_query import SqlAuditReader, prefix_successor
from meshca.adapters.storage.tables import IssuanceRecordRow
from meshca.core.audit import AuditQuery, AuditRecord, LogEntry, Outcome
from meshca.core.errors import InvalidRequest
from tests.adapters.storage.log_fixtures import T0, TRUST_DOMAIN, make_record

COUNT = 60


def append_all(engine: Engine, records: list[AuditRecord]) -> None:
    async def run() -> None:
        store = SqlAuditLog(engine)
        try:
            for record in records:  # one by one: leaf order is this order
                await store.append(record)
        finally:
            await store.aclose()

    asyncio.run(run())


@pytest.fixture
def filled(engine: Engine) -> Iterator[tuple[SqlAuditReader, list[LogEntry]]]:
    records = [make_record(n) for n in range(COUNT)]
    # Two records at the same instant, and one committed late with an early time.
    records.append(make_record(COUNT, time=records[10].time))
    records.append(make_record(COUNT + 1, time=T0 - timedelta(minutes=5)))
    append_all(engine, records)
    yield SqlAuditReader(engine), [LogEntry(i, r) for i, r in enumerate(records)]


def reference(entries: list[LogEntry], query: AuditQuery) -> list[LogEntry]:
    """What the query must return, computed in Python."""

    def matches(entry: LogEntry) -> bool:
        r = entry.record
        checks = [
            query.spiffe_id is None or r.spiffe_id == query.spiffe_id,
            query.spiffe_id_prefix is None
            or (r.spiffe_id is not None and r.spiffe_id.startswith(query.spiffe_id_prefix)),
            query.namespace is None or r.namespace == query.namespace,
            query.service_account is None or r.service_account == query.service_account,
            query.pod is None or query.pod in (r.pod_name, r.pod_uid),
            query.serial is None or r.serial == query.serial,
            query.fingerprint is None or r.fingerprint_sha256 == query.fingerprint,
            query.since is None or r.time >= query.since,
            query.until is None or r.time < query.until,
            query.outcome is None or r.outcome == query.outcome,
            query.api is None or r.api == query.api,
        ]
        return all(checks)

    found = [e for e in entries if matches(e)]
    return sorted(found, key=lambda e: (e.record.time, e.leaf_index), reverse=True)


QUERIES = {
    "all": AuditQuery(limit=1000),
    "spiffe-id": AuditQuery(spiffe_id=f"{TRUST_DOMAIN}/ns/shop/sa/web"),
    "spiffe-id-prefix": AuditQuery(spiffe_id_prefix=f"{TRUST_DOMAIN}/ns/pa"),
    "namespace+sa": AuditQuery(namespace="ops", service_account="db"),
    "pod-name": AuditQuery(pod="web-2"),
    "pod-uid": AuditQuery(pod="uid-3"),
    "serial": AuditQuery(serial=f"{0xABC000 + 7:x}"),
    "fingerprint": AuditQuery(fingerprint=f"{8:064x}"),
    "time-range": AuditQuery(since=T0 + timedelta(minutes=10), until=T0 + timedelta(minutes=20)),
    "refused": AuditQuery(outcome=Outcome.REFUSED),
    "issued-istio": AuditQuery(outcome=Outcome.ISSUED, api="istio.v1.auth.CreateCertificate"),
    "nothing": AuditQuery(namespace="nowhere"),
}


@pytest.mark.parametrize("name", list(QUERIES))
def test_each_filter_matches_the_reference(
    filled: tuple[SqlAuditReader, list[LogEntry]], name: str
) -> None:
    reader, entries = filled
    query = QUERIES[name]
    page = reader.query(query)
    assert list(page.entries) == reference(entries, query)[: query.limit]


@pytest.mark.parametrize("limit", [1, 7, 50])
def test_pages_walk_every_entry_once_newest_first(
    filled: tuple[SqlAuditReader, list[LogEntry]], limit: int
) -> None:
    reader, entries = filled
    query = AuditQuery(limit=limit, namespace="shop")
    seen: list[LogEntry] = []
    cursor = None
    for _ in range(100):
        page = reader.query(dataclasses.replace(query, cursor=cursor))
        seen.extend(page.entries)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == reference(entries, dataclasses.replace(query, limit=1000))
    assert list(reader.export(query)) == seen


def test_get_by_serial_and_leaf_index(filled: tuple[SqlAuditReader, list[LogEntry]]) -> None:
    reader, entries = filled
    assert reader.get(serial=f"{0xABC000 + 3:x}") == entries[3]
    assert reader.get(leaf_index=4) == entries[4]
    assert reader.get(serial="nope") is None
    assert reader.get(leaf_index=10_000) is None


def test_bad_cursor_and_limits_are_invalid_requests(
    filled: tuple[SqlAuditReader, list[LogEntry]],
) -> None:
    reader, _ = filled
    for cursor in ["garbage", "djE6eDox", "", "%%%"]:
        with pytest.raises(InvalidRequest):
            reader.query(AuditQuery(cursor=cursor))
    for limit in [0, -1, 1001]:
        with pytest.raises(InvalidRequest):
            AuditQuery(limit=limit)


HOSTILE = [
    "spiffe://mesh.test/ns/o'brien/sa/x",
    "spiffe://mesh.test/ns/%",
    "spiffe://mesh.test/ns/_",
    "spiffe://mesh.test/ns/a%b_c",
    "x'; DROP TABLE issuance_record; --",
    'x"); DROP TABLE issuance_record; --',
    "back\\slash\\%",
    "\U0010ffff\U0010ffff",
    "é\ud7ff",
    "",
]


def test_hostile_values_are_bound_never_patterns(engine: Engine) -> None:
    decoys = ["spiffe://mesh.test/ns/abc", "spiffe://mesh.test/ns/a", "spiffe://mesh.test/ns/axb-c"]
    values = HOSTILE + decoys
    append_all(
        engine,
        [
            make_record(n, spiffe_id=v, namespace=v, pod_name=v, serial=v, api=v)
            for n, v in enumerate(values)
        ],
    )
    reader = SqlAuditReader(engine)
    for value in HOSTILE:
        for query in (
            AuditQuery(spiffe_id=value),
            AuditQuery(namespace=value),
            AuditQuery(pod=value),
            AuditQuery(serial=value),
            AuditQuery(api=value),
        ):
            assert [e.record.spiffe_id for e in reader.query(query).entries] == [value]
        by_prefix = {
            e.record.spiffe_id for e in reader.query(AuditQuery(spiffe_id_prefix=value)).entries
        }
        assert by_prefix == {v for v in values if v.startswith(value)}
    assert inspect(engine).has_table("issuance_record")
    with engine.connect() as connection:
        count = connection.scalar(select(func.count()).select_from(IssuanceRecordRow))
    assert count == len(values)


@pytest.mark.parametrize(
    ("prefix", "successor"),
    [("abc", "abd"), ("a\U0010ffff", "b"), ("\U0010ffff", None), ("\ud7ff", "\ue000"), ("", None)],
)
def test_prefix_successor(prefix: str, successor: str | None) -> None:
    assert prefix_successor(prefix) == successor
