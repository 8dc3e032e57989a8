"""The agent's renewal timing: half-life with jitter, backoff with jitter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshca.core.agent import AgentSvid, RenewalPolicy, renew_at, retry_delay, svid_usable

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _svid(lifetime: timedelta, start: datetime = T0) -> AgentSvid:
    return AgentSvid("spiffe://td/ns/a/sa/b", (b"leaf",), b"key", start, start + lifetime, "1")


@pytest.mark.parametrize(
    ("lifetime", "jitter", "draw", "expected"),
    [
        pytest.param(timedelta(hours=1), 0.1, 0.0, timedelta(minutes=30), id="ok/half-life"),
        pytest.param(timedelta(hours=1), 0.1, 1.0, timedelta(minutes=24), id="ok/full-jitter"),
        pytest.param(timedelta(hours=1), 0.0, 1.0, timedelta(minutes=30), id="ok/no-jitter"),
        pytest.param(timedelta(seconds=4), 0.1, 0.5, timedelta(seconds=1.8), id="ok/seconds"),
        pytest.param(timedelta(0), 0.1, 1.0, timedelta(0), id="ok/zero-lifetime"),
    ],
)
def test_renew_at(lifetime: timedelta, jitter: float, draw: float, expected: timedelta) -> None:
    assert renew_at(_svid(lifetime), RenewalPolicy(jitter=jitter), draw) == T0 + expected


@given(
    seconds=st.integers(min_value=0, max_value=10 * 365 * 86400),
    jitter=st.floats(min_value=0, max_value=0.49),
    draw=st.floats(min_value=0, max_value=1),
)
def test_renewal_is_between_start_and_half_life(seconds: int, jitter: float, draw: float) -> None:
    svid = _svid(timedelta(seconds=seconds))
    when = renew_at(svid, RenewalPolicy(jitter=jitter), draw)
    half = svid.not_before + (svid.not_after - svid.not_before) / 2
    assert svid.not_before <= when <= half


@given(attempt=st.integers(min_value=1, max_value=10_000), draw=st.floats(min_value=0, max_value=1))
def test_retry_delay_is_positive_and_capped(attempt: int, draw: float) -> None:
    policy = RenewalPolicy(backoff_base=timedelta(seconds=1), backoff_cap=timedelta(seconds=30))
    delay = retry_delay(attempt, policy, draw)
    assert timedelta(seconds=0.5) <= delay <= timedelta(seconds=30)


@pytest.mark.parametrize(
    ("attempt", "draw", "expected"),
    [
        pytest.param(1, 1.0, 1.0, id="ok/first-full"),
        pytest.param(1, 0.0, 0.5, id="ok/first-half"),
        pytest.param(3, 1.0, 4.0, id="ok/doubles"),
        pytest.param(6, 1.0, 30.0, id="ok/capped"),
        pytest.param(500, 0.0, 15.0, id="ok/huge-attempt-capped"),
    ],
)
def test_retry_delay_table(attempt: int, draw: float, expected: float) -> None:
    assert retry_delay(attempt, RenewalPolicy(), draw).total_seconds() == pytest.approx(expected)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: retry_delay(0, RenewalPolicy(), 0.5), id="fail/attempt-zero"),
        pytest.param(lambda: retry_delay(1, RenewalPolicy(), 1.5), id="fail/draw-above-one"),
        pytest.param(
            lambda: renew_at(_svid(timedelta(1)), RenewalPolicy(), -0.1), id="fail/neg-draw"
        ),
        pytest.param(lambda: RenewalPolicy(jitter=0.5), id="fail/jitter-half"),
        pytest.param(lambda: RenewalPolicy(backoff_base=timedelta(0)), id="fail/zero-backoff-base"),
        pytest.param(
            lambda: RenewalPolicy(
                backoff_base=timedelta(seconds=10), backoff_cap=timedelta(seconds=1)
            ),
            id="fail/cap-below-base",
        ),
    ],
)
def test_bad_inputs_raise(call: object) -> None:
    with pytest.raises(ValueError):
        call()  # type: ignore[operator]


def test_svid_usable() -> None:
    svid = _svid(timedelta(hours=1))
    assert not svid_usable(None, T0)
    assert svid_usable(svid, T0)
    assert not svid_usable(svid, T0 - timedelta(seconds=1))
    assert not svid_usable(svid, T0 + timedelta(hours=1))
