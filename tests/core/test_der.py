"""The small DER codec of the leaf hot path: round trips, strictness, and hostile bytes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshca.core import der


@given(st.integers(min_value=-(2**200), max_value=2**200))
def test_integer_round_trip_is_minimal(value: int) -> None:
    encoded = der.encode_integer(value)
    tag, start, end = der.read(encoded)
    assert (tag, end) == (der.INTEGER, len(encoded))
    assert der.read_integer(encoded, start, end) == value
    if end - start > 1:  # minimal: one byte fewer cannot hold the value
        with pytest.raises(OverflowError):
            value.to_bytes(end - start - 1, "big", signed=True)


@given(
    st.binary(max_size=70_000),
    st.integers(min_value=0, max_value=255).filter(lambda tag: tag & 0x1F != 0x1F),
)
def test_tlv_round_trip(content: bytes, tag: int) -> None:
    encoded = der.tlv(tag, content)
    assert der.read(encoded) == (tag, len(encoded) - len(content), len(encoded))
    assert encoded[len(encoded) - len(content) :] == content


@given(
    st.datetimes(
        min_value=datetime(1950, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC)
    )
)
def test_time_round_trip_drops_only_fractions(value: datetime) -> None:
    encoded = der.encode_time(value)
    tag, start, end = der.read(encoded)
    assert tag == (der.UTC_TIME if value.year < 2050 else der.GENERALIZED_TIME)
    assert der.read_time(tag, encoded[start:end]) == value.replace(microsecond=0)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        pytest.param(b"", "truncated", id="fail/empty"),
        pytest.param(b"\x30", "truncated", id="fail/no-length"),
        pytest.param(b"\x30\x05\x00", "runs past", id="fail/short-content"),
        pytest.param(b"\x1f\x01\x00", "multi-byte tag", id="fail/high-tag"),
        pytest.param(b"\x04\x80", "length form", id="fail/indefinite-length"),
        pytest.param(b"\x04\x85\x00\x00\x00\x00\x01\x00", "length form", id="fail/5-byte-length"),
        pytest.param(b"\x04\x81\x05" + b"\x00" * 5, "non-minimal", id="fail/long-form-short"),
        pytest.param(b"\x04\x82\x00\x80" + b"\x00" * 128, "non-minimal", id="fail/leading-zero"),
    ],
)
def test_bad_elements_are_refused(data: bytes, problem: str) -> None:
    with pytest.raises(der.DerError, match=problem):
        der.read(data)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="fail/empty"),
        pytest.param(b"\x00\x01", id="fail/leading-zero"),
        pytest.param(b"\xff\x80", id="fail/leading-ones"),
    ],
)
def test_non_minimal_integers_are_refused(content: bytes) -> None:
    with pytest.raises(der.DerError):
        der.read_integer(content, 0, len(content))


@pytest.mark.parametrize(
    ("tag", "content"),
    [
        pytest.param(der.UTC_TIME, b"300101120000", id="fail/no-zone"),
        pytest.param(der.UTC_TIME, b"3001011200+0100", id="fail/offset"),
        pytest.param(der.UTC_TIME, b"301301120000Z", id="fail/month-13"),
        pytest.param(der.UTC_TIME, b"30 101120000Z", id="fail/space"),
        pytest.param(der.GENERALIZED_TIME, b"20300101120000.5Z", id="fail/fraction"),
        pytest.param(der.OCTET_STRING, b"300101120000Z", id="fail/wrong-tag"),
    ],
)
def test_bad_times_are_refused(tag: int, content: bytes) -> None:
    with pytest.raises(der.DerError):
        der.read_time(tag, content)


def test_two_digit_years_follow_rfc5280() -> None:
    assert der.read_time(der.UTC_TIME, b"500101000000Z").year == 1950
    assert der.read_time(der.UTC_TIME, b"491231235959Z").year == 2049


@given(st.binary(max_size=300))
def test_random_bytes_raise_only_der_errors(data: bytes) -> None:
    try:
        _tag, start, end = der.read(data)
        for _inner, inner_start, inner_end in der.children(data, start, end):
            assert start <= inner_start <= inner_end <= end
    except der.DerError:
        pass


@pytest.mark.parametrize("value", [-129, -128, -1, 0, 127, 128, 255, 256, -(2**63)])
def test_integer_edges_are_minimal(value: int) -> None:
    encoded = der.encode_integer(value)
    assert der.read_integer(encoded, 2, len(encoded)) == value
    assert len(encoded) - 2 == max(1, (value if value >= 0 else ~value).bit_length() // 8 + 1)
