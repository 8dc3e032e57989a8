"""The last net before a status detail leaves: redacted and short, whatever the message."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meshca.adapters.grpc.errors import MAX_DETAIL_CHARS, bounded_detail

JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzZWNyZXQifQ.c2lnbmF0dXJl"
PEM = "-----BEGIN CERTIFICATE REQUEST-----\nMIIBsecret\n-----END CERTIFICATE REQUEST-----"


@given(st.text(max_size=5000), st.text(max_size=200))
def test_any_message_is_capped_and_keeps_no_token(before: str, after: str) -> None:
    detail = bounded_detail(f"{before}{JWT}{after}")
    assert len(detail) <= MAX_DETAIL_CHARS
    assert "c2lnbmF0dXJl" not in detail
    assert "eyJzdWIiOiJzZWNyZXQifQ" not in detail


@given(st.text(max_size=300))
def test_pem_blocks_are_redacted(prefix: str) -> None:
    detail = bounded_detail(prefix + PEM)
    assert "MIIBsecret" not in detail


def test_a_short_plain_message_is_unchanged() -> None:
    message = "CSR asks for 'spiffe://example.org/ns/a/sa/b' but the token proves another"
    assert bounded_detail(message) == message


def test_a_long_message_is_cut_with_a_mark() -> None:
    detail = bounded_detail("x" * 10_000)
    assert len(detail) == MAX_DETAIL_CHARS
    assert detail.endswith("…")
