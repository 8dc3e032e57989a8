"""The policy settings: flags, environment, YAML, and refused values."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from meshca.cli import build_parser
from meshca.cli.serve_cmd import settings_from
from meshca.config import ConfigError, Settings, load_settings


def test_defaults_are_deny_and_record_everything() -> None:
    settings = Settings()
    assert settings.policy_dir is None
    assert settings.policy_default == "deny"
    assert settings.decision_sample_rate == 1.0
    assert settings.policy_poll_interval == timedelta(seconds=5)


def test_flags() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--policy-dir",
            "policies",
            "--policy-default",
            "allow",
            "--decision-sample-rate",
            "0.25",
            "--policy-poll-interval",
            "2s",
        ]
    )
    settings = settings_from(args)
    assert settings.policy_dir == Path("policies")
    assert settings.policy_default == "allow"
    assert settings.decision_sample_rate == 0.25
    assert settings.policy_poll_interval == timedelta(seconds=2)


def test_environment_and_file(tmp_path: Path) -> None:
    config = tmp_path / "meshca.yaml"
    config.write_text("policy-dir: /etc/meshca/policies\ndecision-sample-rate: 0.5\n")
    settings = load_settings(
        {"config": str(config)},
        environ={"MESHCA_POLICY_DEFAULT": "allow", "MESHCA_DECISION_SAMPLE_RATE": "0.1"},
    )
    assert settings.policy_dir == Path("/etc/meshca/policies")
    assert settings.policy_default == "allow"
    assert settings.decision_sample_rate == 0.1


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("policy_default", "permit", "policy-default must be deny or allow"),
        ("decision_sample_rate", "2", "between 0 and 1"),
        ("decision_sample_rate", "-0.5", "between 0 and 1"),
        ("decision_sample_rate", "often", "bad value"),
        ("policy_poll_interval", "0s", "positive"),
    ],
)
def test_bad_values(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings({name: value}, environ={})
