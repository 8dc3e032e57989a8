"""``--issuance-rate COUNT/PERIOD``: parsed once, refused clearly, off by default."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshca.cli import build_parser
from meshca.cli.serve_cmd import settings_from
from meshca.config import (
    MAX_RATE_COUNT,
    ConfigError,
    Settings,
    load_settings,
    parse_issuance_rate,
)
from meshca.core.rate_limit import IssuanceRate


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [
        pytest.param("30/1m", 30, timedelta(minutes=1), id="ok/per-minute"),
        pytest.param("30/m", 30, timedelta(minutes=1), id="ok/bare-unit"),
        pytest.param(" 100 / 1h ", 100, timedelta(hours=1), id="ok/spaces"),
        pytest.param("5/2s", 5, timedelta(seconds=2), id="ok/seconds"),
        pytest.param("1/1d", 1, timedelta(days=1), id="ok/longest"),
        pytest.param("12/1h30m", 12, timedelta(minutes=90), id="ok/compound"),
        pytest.param("100000/1s", 100_000, timedelta(seconds=1), id="ok/largest-count"),
    ],
)
def test_good_rates(text: str, count: int, period: timedelta) -> None:
    assert parse_issuance_rate(text) == IssuanceRate(count, period)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        pytest.param("30", "COUNT/PERIOD", id="fail/no-period"),
        pytest.param("/1m", "COUNT/PERIOD", id="fail/no-count"),
        pytest.param("-3/1m", "COUNT/PERIOD", id="fail/negative"),
        pytest.param("3.5/1m", "COUNT/PERIOD", id="fail/fraction"),
        pytest.param("٣/1m", "COUNT/PERIOD", id="fail/non-ascii-digit"),
        pytest.param("0/1m", "1 to 100,000", id="fail/zero"),
        pytest.param("100001/1m", "1 to 100,000", id="fail/too-many"),
        pytest.param("30/", "not a period", id="fail/empty-period"),
        pytest.param("30/1w", "not a period", id="fail/unknown-unit"),
        pytest.param("30/1m/2", "not a period", id="fail/two-slashes"),
        pytest.param("30/500ms", "1s to 1d", id="fail/too-short"),
        pytest.param("30/2d", "1s to 1d", id="fail/too-long"),
        pytest.param("1/" + "9" * 400 + "d", "1s to 1d", id="fail/overflow"),
    ],
)
def test_bad_rates_say_why(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse_issuance_rate(text)


@given(st.text(max_size=40))
def test_any_text_parses_or_is_a_config_error(text: str) -> None:
    try:
        rate = parse_issuance_rate(text)
    except ConfigError:
        return
    assert 1 <= rate.count <= MAX_RATE_COUNT
    assert timedelta(seconds=1) <= rate.period <= timedelta(days=1)


@given(
    count=st.integers(1, MAX_RATE_COUNT),
    period=st.timedeltas(timedelta(seconds=1), timedelta(days=1)),
)
def test_str_round_trips(count: int, period: timedelta) -> None:
    rate = IssuanceRate(count, period)
    assert parse_issuance_rate(str(rate)) == rate


def test_off_by_default_and_named_in_errors() -> None:
    assert Settings().issuance_rate_limit() is None
    assert Settings(issuance_rate="off").issuance_rate_limit() is None
    with pytest.raises(ConfigError, match=r"^issuance-rate: '30/1w'"):
        Settings(issuance_rate="30/1w")


def test_flag_env_and_yaml(tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", "--issuance-rate", "30/1m"])
    assert settings_from(args).issuance_rate_limit() == IssuanceRate(30, timedelta(minutes=1))
    env = load_settings({}, environ={"MESHCA_ISSUANCE_RATE": "5/10s"})
    assert env.issuance_rate_limit() == IssuanceRate(5, timedelta(seconds=10))
    config = tmp_path / "meshca.yaml"
    config.write_text("issuance-rate: 100/1h\n")
    from_file = load_settings({"config": str(config)}, environ={})
    assert from_file.issuance_rate_limit() == IssuanceRate(100, timedelta(hours=1))
