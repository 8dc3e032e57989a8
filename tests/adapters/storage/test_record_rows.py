"""The hot insert writes plain SQL: what it stores must be what the ORM would store."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, insert, select, text

from meshca.adapters.storage.record_rows import (
    insert_records,
    row_to_record,
    stored_record,
)
from meshca.adapters.storage.tables import IssuanceRecordRow
from meshca.core.audit import AuditRecord, Outcome, leaf_body, leaf_data
from meshca.core.errors import InternalError
from meshca.core.merkle import leaf_hash

PLUS_TWO = timezone(timedelta(hours=2))
RECORD = AuditRecord(
    time=datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=PLUS_TWO),
    outcome=Outcome.ISSUED,
    api="istio.v1.auth.CreateCertificate",
    reason="ok",
    detail="d\u00e9tail",
    spiffe_id="spiffe://example.org/ns/shop/sa/cart",
    serial="7f",
    fingerprint_sha256="ab" * 32,
    not_before=datetime(2031, 5, 6, 5, 7, 9, tzinfo=UTC),
    not_after=datetime(2031, 5, 7, 5, 8, 9, tzinfo=UTC),
    namespace="shop",
    service_account="cart",
    pod_name="cart-1",
    pod_uid="8c1d",
    node_name="node-a",
    peer="ipv4:10.1.2.3:5000",
    csr_sha256="cd" * 32,
)
_FIELDS = [f.name for f in dataclasses.fields(AuditRecord)]


def _stored(engine: Engine, leaf_index: int) -> tuple[object, ...]:
    """A row's values as the driver returns them, without the ORM's conversions."""
    with engine.connect() as connection:
        row = connection.execute(
            text(f"SELECT {', '.join(_FIELDS)} FROM issuance_record WHERE leaf_index = :i"),
            {"i": leaf_index},
        ).one()
    return tuple(row)


def test_raw_insert_stores_what_the_orm_stores(engine: Engine) -> None:
    with engine.begin() as connection:
        insert_records(connection, [stored_record(RECORD)])
        values = {name: getattr(RECORD, name) for name in _FIELDS}
        values["outcome"] = RECORD.outcome.value
        connection.execute(
            insert(IssuanceRecordRow), [{**values, "leaf_index": 1000, "leaf_hash": b"x"}]
        )
    assert _stored(engine, 0) == _stored(engine, 1000)
    with engine.connect() as connection:
        row = connection.execute(
            select(IssuanceRecordRow).where(IssuanceRecordRow.leaf_index == 0)
        ).one()
    assert row_to_record(row._mapping) == RECORD
    assert row.leaf_hash == leaf_hash(leaf_data(0, leaf_body(RECORD)))


def test_batch_gets_consecutive_leaves(engine: Engine) -> None:
    records = [dataclasses.replace(RECORD, serial=f"{n:x}") for n in range(5)]
    with engine.begin() as connection:
        insert_records(connection, records[:2])
    with engine.begin() as connection:
        insert_records(connection, records[2:])
    with engine.connect() as connection:
        rows = connection.execute(
            select(IssuanceRecordRow.leaf_index, IssuanceRecordRow.serial).order_by(
                IssuanceRecordRow.leaf_index
            )
        ).all()
    assert [(r.leaf_index, r.serial) for r in rows] == [(n, f"{n:x}") for n in range(5)]


@pytest.mark.parametrize("field", ["time", "not_before", "not_after"])
def test_naive_times_are_refused(field: str) -> None:
    naive = dataclasses.replace(RECORD, **{field: datetime(2031, 1, 1)})
    with pytest.raises(InternalError, match=field):
        stored_record(naive)


def test_unstorable_text_is_escaped_and_clean_records_are_kept_as_they_are() -> None:
    assert stored_record(RECORD) is RECORD
    odd = stored_record(dataclasses.replace(RECORD, detail="a\x00b\ud800"))
    assert odd.detail == "a\\x00b\\ud800"
