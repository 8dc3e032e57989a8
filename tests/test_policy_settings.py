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


# -- who may call the policy APIs -------------------------------------------------------------


def test_policy_access_flags_environment_and_file(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--trust-domain",
            "example.org",
            "--policy-dir",
            "policies",
            "--policy-listen",
            "0.0.0.0:15014",
            "--policy-caller",
            "spiffe://example.org/ns/istio-system/*",
            "--policy-caller",
            "*/sa/envoy",
            "--policy-admin",
            "spiffe://example.org/ns/ops/sa/admin",
            "--no-reflection",
        ]
    )
    settings = settings_from(args)
    assert settings.policy_listen == "0.0.0.0:15014"
    assert settings.policy_caller == ("spiffe://example.org/ns/istio-system/*", "*/sa/envoy")
    assert settings.policy_callers().test("spiffe://example.org/ns/istio-system/sa/gw")
    assert not settings.policy_callers().test("spiffe://example.org/ns/shop/sa/web")
    assert settings.policy_admin == ("spiffe://example.org/ns/ops/sa/admin",)
    assert settings.no_reflection
    settings.check_policy_exposure()

    config = tmp_path / "meshca.yaml"
    config.write_text("policy-dir: p\npolicy-insecure-main-port: true\nno-reflection: yes\n")
    from_file = load_settings(
        {"config": str(config)}, environ={"MESHCA_POLICY_TOKEN_FILE": "/run/policy-token"}
    )
    assert from_file.policy_insecure_main_port and from_file.no_reflection
    assert from_file.policy_token_file == Path("/run/policy-token")
    from_file.check_policy_exposure()


def test_default_policy_callers_are_any_svid_of_the_trust_domain() -> None:
    callers = Settings(trust_domain="example.org").policy_callers()
    assert callers.written == ("spiffe://example.org/*",)
    assert callers.test("spiffe://example.org/ns/a/sa/b")
    assert not callers.test("spiffe://other.org/ns/a/sa/b")
    assert not callers.test("spiffe://example.org.evil/ns/a/sa/b")


def test_policy_dir_without_a_policy_port_is_refused_and_the_error_names_the_fix() -> None:
    settings = Settings(policy_dir=Path("policies"))
    with pytest.raises(ConfigError) as caught:
        settings.check_policy_exposure()
    message = str(caught.value)
    assert "--policy-listen" in message and "--policy-insecure-main-port" in message
    Settings().check_policy_exposure()
    Settings(policy_dir=Path("p"), policy_insecure_main_port=True).check_policy_exposure()
    Settings(policy_dir=Path("p"), policy_listen="127.0.0.1:0").check_policy_exposure()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"policy_dir": "p", "policy_listen": "15014"}, "policy-listen must be HOST:PORT"),
        ({"policy_listen": "127.0.0.1:0"}, "give it too"),
        (
            {"policy_dir": "p", "policy_listen": "127.0.0.1:0", "plaintext": "true"},
            "cannot be used with --plaintext",
        ),
        (
            {
                "policy_dir": "p",
                "policy_listen": "127.0.0.1:0",
                "policy_insecure_main_port": "true",
            },
            "not both",
        ),
        ({"policy_caller": "example.org/ns/a"}, "policy-caller: .*not a SPIFFE ID pattern"),
        ({"policy_caller": "spiffe://example.org/*/sa/a"}, "policy-caller: "),
        ({"policy_admin": "spiffe://example.org/ns/*"}, "policy-admin: "),
    ],
)
def test_bad_policy_access_values(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(values, environ={})
