"""Status messages are cut to MAX_DETAILS characters, whatever an error quoted."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meshca.adapters.grpc.errors import MAX_DETAILS, bounded


@given(st.text(max_size=3 * MAX_DETAILS))
def test_bounded_keeps_short_messages_and_cuts_long_ones(message: str) -> None:
    cut = bounded(message)
    assert len(cut) <= MAX_DETAILS
    if len(message) <= MAX_DETAILS:
        assert cut == message
    else:
        assert cut.endswith("\u2026") and message.startswith(cut[:-1])
