"""The canonical leaf encoding: stable bytes, field by field in declaration order."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshca.core.audit import AuditRecord, Outcome, leaf_body


def reference_body(record: AuditRecord) -> bytes:
    """The encoding as docs/audit-log.md states it, as a plain loop over the fields."""
    parts = []
    for field in dataclasses.fields(AuditRecord):
        value = getattr(record, field.name)
        if value is None:
            parts.append(b"\x00")
            continue
        if isinstance(value, datetime):
            text = value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        else:
            text = str(value)
        data = text.encode("utf-8")
        parts.append(b"\x01" + len(data).to_bytes(4, "big") + data)
    return b"".join(parts)


storable = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
optional = st.none() | storable
times = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(9998, 12, 31),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]),
)


@given(
    st.builds(
        AuditRecord,
        time=times,
        outcome=st.sampled_from(Outcome),
        api=storable,
        reason=storable,
        detail=storable,
        spiffe_id=optional,
        serial=optional,
        fingerprint_sha256=optional,
        not_before=st.none() | times,
        not_after=st.none() | times,
        namespace=optional,
        service_account=optional,
        pod_name=optional,
        pod_uid=optional,
        node_name=optional,
        peer=optional,
        csr_sha256=optional,
    )
)
def test_leaf_body_is_the_documented_encoding(record: AuditRecord) -> None:
    assert leaf_body(record) == reference_body(record)


def test_known_record_has_known_bytes() -> None:
    record = AuditRecord(
        time=datetime(2030, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        outcome=Outcome.REFUSED,
        api="a",
        reason="r",
    )
    expected = (
        b"\x01\x00\x00\x00\x1b2030-01-02T03:04:05.000006Z"
        + b"\x01\x00\x00\x00\x07refused"
        + b"\x01\x00\x00\x00\x01a"
        + b"\x01\x00\x00\x00\x01r"
        + b"\x01\x00\x00\x00\x00"  # detail: present and empty
        + b"\x00" * 12
    )
    assert leaf_body(record) == expected


def test_naive_time_has_no_encoding() -> None:
    with pytest.raises(ValueError, match="naive"):
        leaf_body(AuditRecord(time=datetime(2030, 1, 1), outcome=Outcome.ISSUED, api="", reason=""))
