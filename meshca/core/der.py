"""The little DER that meshca writes and reads itself: leaf certificates on the hot path.

Encoding covers what a leaf X509-SVID needs (lengths, INTEGER, times, TLVs). Reading
walks definite-length TLVs with one-byte tags, which is all X.509 uses; anything else
raises ``DerError``. The reader is for checking certificates meshca has just made, not a
general parser of hostile input (CSRs are parsed by cryptography).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

__all__ = [
    "BIT_STRING",
    "BOOLEAN",
    "CONTEXT_0",
    "CONTEXT_3",
    "GENERALIZED_TIME",
    "INTEGER",
    "OCTET_STRING",
    "OID",
    "SEQUENCE",
    "UTC_TIME",
    "DerError",
    "children",
    "encode_integer",
    "encode_length",
    "encode_time",
    "read",
    "read_integer",
    "read_time",
    "tlv",
]

BOOLEAN = 0x01
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
OID = 0x06
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18
SEQUENCE = 0x30
CONTEXT_0 = 0xA0
CONTEXT_3 = 0xA3

# RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050 (and before 1950).
_UTC_TIME_YEARS = range(1950, 2050)


class DerError(ValueError):
    """Bytes that are not the DER this module reads."""


def encode_length(length: int) -> bytes:
    """A DER definite length: one byte below 128, else 0x80|n and n big-endian bytes."""
    if length < 0x80:
        return bytes((length,))
    size = (length.bit_length() + 7) // 8
    return bytes((0x80 | size,)) + length.to_bytes(size, "big")


def tlv(tag: int, content: bytes) -> bytes:
    """One element: tag, length, content."""
    length = len(content)
    # The short forms inline: this runs a dozen times for every certificate issued.
    if length < 0x80:
        return bytes((tag, length)) + content
    if length < 0x100:
        return bytes((tag, 0x81, length)) + content
    return bytes((tag,)) + encode_length(length) + content


def encode_integer(value: int) -> bytes:
    """An INTEGER element in the fewest two's-complement bytes."""
    # A negative value needs the bits of its complement plus the sign bit: -128 is 0x80.
    magnitude = value if value >= 0 else ~value
    size = magnitude.bit_length() // 8 + 1
    return tlv(INTEGER, value.to_bytes(size, "big", signed=True))


def encode_time(value: datetime) -> bytes:
    """A certificate time, whole seconds (fractions are dropped, as X.509 has none)."""
    utc = value if value.tzinfo is UTC else value.astimezone(UTC)
    clock = f"{utc.month:02d}{utc.day:02d}{utc.hour:02d}{utc.minute:02d}{utc.second:02d}Z"
    if utc.year in _UTC_TIME_YEARS:
        return b"\x17\x0d" + f"{utc.year % 100:02d}{clock}".encode("ascii")
    return b"\x18\x0f" + f"{utc.year:04d}{clock}".encode("ascii")


def read(data: bytes, offset: int = 0, end: int | None = None) -> tuple[int, int, int]:
    """The element at ``offset``: ``(tag, content_start, content_end)``.

    The element must end at or before ``end`` (default: the end of ``data``).
    """
    limit = len(data) if end is None else end
    if offset + 2 > limit:
        raise DerError(f"truncated element at byte {offset}")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise DerError(f"multi-byte tag at byte {offset}")
    first = data[offset + 1]
    start = offset + 2
    if first < 0x80:
        length = first
    else:
        size = first & 0x7F
        if size == 0 or size > 4:
            raise DerError(f"unsupported length form at byte {offset}")
        if start + size > limit:
            raise DerError(f"truncated length at byte {offset}")
        length = int.from_bytes(data[start : start + size], "big")
        if length < 0x80 or data[start] == 0:
            raise DerError(f"non-minimal length at byte {offset}")
        start += size
    if start + length > limit:
        raise DerError(f"element at byte {offset} runs past its container")
    return tag, start, start + length


def children(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """Each element in ``data[start:end]``, which they must fill exactly."""
    offset = start
    while offset < end:
        element = read(data, offset, end)
        yield element
        offset = element[2]


def read_integer(data: bytes, start: int, end: int) -> int:
    """The value of INTEGER content ``data[start:end]`` (minimal encoding required)."""
    if end <= start:
        raise DerError("empty INTEGER")
    if end - start > 1 and (
        (data[start] == 0 and data[start + 1] < 0x80)
        or (data[start] == 0xFF and data[start + 1] >= 0x80)
    ):
        raise DerError("non-minimal INTEGER")
    return int.from_bytes(data[start:end], "big", signed=True)


def read_time(tag: int, content: bytes) -> datetime:
    """A UTCTime or GeneralizedTime in the ``...Z`` form certificates use."""
    if tag == UTC_TIME and len(content) == 13:
        year = _digits(content, 0, 2)
        # RFC 5280: two-digit years 50..99 are 1950..1999, 00..49 are 2000..2049.
        year += 1900 if year >= 50 else 2000
        rest = 2
    elif tag == GENERALIZED_TIME and len(content) == 15:
        year, rest = _digits(content, 0, 4), 4
    else:
        raise DerError(f"not a certificate time: {content[:20]!r}")
    if content[-1:] != b"Z":
        raise DerError(f"not a UTC certificate time: {content[:20]!r}")
    try:
        return datetime(
            year,
            _digits(content, rest, rest + 2),
            _digits(content, rest + 2, rest + 4),
            _digits(content, rest + 4, rest + 6),
            _digits(content, rest + 6, rest + 8),
            _digits(content, rest + 8, rest + 10),
            tzinfo=UTC,
        )
    except ValueError:
        raise DerError(f"not a calendar time: {content[:20]!r}") from None


def _digits(content: bytes, start: int, end: int) -> int:
    part = content[start:end]
    if not part.isdigit():
        raise DerError(f"not a certificate time: {content[:20]!r}")
    return int(part)
