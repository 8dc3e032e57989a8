"""Settings from defaults, YAML, MESHCA_* and flags, in that rising order."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from meshca.cli import build_parser
from meshca.cli.serve_cmd import settings_from
from meshca.config import ConfigError, Settings, load_settings, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90", timedelta(seconds=90)),
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("1h30m", timedelta(minutes=90)),
        ("7d", timedelta(days=7)),
        (3600, timedelta(hours=1)),
    ],
)
def test_durations(text: str | int, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "h", "1x", "-5s", "0", "1h 30m", "10s5"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_precedence_file_env_flag(tmp_path: Path) -> None:
    config = tmp_path / "meshca.yaml"
    config.write_text(
        "trust-domain: from-file.org\nsvid_ttl: 2h\nworkers: 3\nk8s-audience: [a, b]\n"
    )
    settings = load_settings(
        {"config": str(config), "workers": "5"},
        environ={"MESHCA_TRUST_DOMAIN": "from-env.org", "MESHCA_PLAINTEXT": "true"},
    )
    assert settings.trust_domain == "from-env.org"
    assert settings.svid_ttl == timedelta(hours=2)
    assert settings.workers == 5
    assert settings.plaintext is True
    assert settings.k8s_audience == ("a", "b")


def test_every_setting_has_a_flag() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--listen",
            "127.0.0.1:9",
            "--k8s-audience",
            "x",
            "--k8s-audience",
            "y",
            "--plaintext",
            "--max-svid-ttl",
            "1h",
            "--data-dir",
            "/tmp/d",
        ]
    )
    settings = settings_from(args)
    assert settings.listen == "127.0.0.1:9"
    assert settings.k8s_audience == ("x", "y")
    assert settings.plaintext is True
    assert settings.max_svid_ttl == timedelta(hours=1)
    assert settings.data_dir == Path("/tmp/d")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("colour: blue\n", "unknown setting 'colour'"),
        ("- a\n- b\n", "must be a mapping"),
        ("workers: many\n", "workers"),
        ("svid-ttl: forever\n", "svid-ttl"),
        ("k8s-mode: magic\n", "k8s-mode"),
        ("plaintext: maybe\n", "plaintext"),
        ("key: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path: Path, document: str, message: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(document)
    with pytest.raises(ConfigError, match=message):
        load_settings({"config": str(config)}, environ={})


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings({"config": str(tmp_path / "nope.yaml")}, environ={})


def test_jwks_mode_needs_an_issuer() -> None:
    with pytest.raises(ConfigError, match="k8s-issuer"):
        Settings(k8s_mode="jwks").check_attestation()


def test_tokenreview_takes_in_cluster_defaults_from_the_environment() -> None:
    settings = load_settings(
        {}, environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "6443"}
    )
    assert settings.k8s_api_server == "https://10.0.0.1:6443"
    assert settings.k8s_token_file == Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    settings.check_attestation()


def test_tokenreview_outside_a_cluster_needs_an_api_server() -> None:
    with pytest.raises(ConfigError, match="k8s-api-server"):
        load_settings({}, environ={}).check_attestation()


def test_log_format_from_flag_env_or_file(tmp_path: Path) -> None:
    config = tmp_path / "meshca.yaml"
    config.write_text("log-format: json\n")
    assert load_settings({"config": str(config)}, environ={}).log_format == "json"
    assert load_settings({}, environ={"MESHCA_LOG_FORMAT": "json"}).log_format == "json"
    args = build_parser().parse_args(["serve", "--log-format", "json"])
    assert settings_from(args).log_format == "json"
    assert Settings().log_format == "text"
    with pytest.raises(ConfigError, match="log-format must be text or json, not 'xml'"):
        load_settings({"log_format": "xml"}, environ={})


def test_shutdown_grace() -> None:
    assert Settings().shutdown_grace == timedelta(seconds=10)
    assert load_settings({"shutdown_grace": "2.5s"}, environ={}).shutdown_grace == timedelta(
        seconds=2.5
    )
    env = {"MESHCA_SHUTDOWN_GRACE": "30s"}
    assert load_settings({}, environ=env).shutdown_grace == timedelta(seconds=30)
    for bad in ("0s", "-3s", "soon"):
        with pytest.raises(ConfigError, match="shutdown-grace"):
            load_settings({"shutdown_grace": bad}, environ={})
    with pytest.raises(ConfigError, match="shutdown-grace must be a positive duration"):
        Settings(shutdown_grace=timedelta(0))


def test_linkerd_settings_from_flag_env_or_file(tmp_path: Path) -> None:
    defaults = Settings()
    assert defaults.linkerd_certify is False  # opt-in
    assert defaults.linkerd_audience == ("identity.l5d.io",)
    assert defaults.linkerd_identity_domain == "linkerd.cluster.local"
    args = build_parser().parse_args(
        [
            "serve",
            "--linkerd-certify",
            "--linkerd-audience",
            "identity.l5d.io",
            "--linkerd-audience",
            "l5d-2",
            "--linkerd-identity-domain",
            "linkerd.prod.example.com",
        ]
    )
    settings = settings_from(args)
    assert settings.linkerd_certify is True
    assert settings.linkerd_audience == ("identity.l5d.io", "l5d-2")
    assert settings.linkerd_identity_domain == "linkerd.prod.example.com"
    env = {"MESHCA_LINKERD_CERTIFY": "true", "MESHCA_LINKERD_IDENTITY_DOMAIN": "l5d.cluster.local"}
    from_env = load_settings({}, environ=env)
    assert (from_env.linkerd_certify, from_env.linkerd_identity_domain) == (
        True,
        "l5d.cluster.local",
    )
    config = tmp_path / "meshca.yaml"
    config.write_text("linkerd-certify: true\nlinkerd-audience: [a, b]\n")
    assert load_settings({"config": str(config)}, environ={}).linkerd_audience == ("a", "b")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        pytest.param(
            {"linkerd_identity_domain": "Linkerd.Cluster.Local"},
            "linkerd-identity-domain",
            id="fail/uppercase-domain",
        ),
        pytest.param(
            {"linkerd_identity_domain": "linkerd.cluster.local."},
            "linkerd-identity-domain",
            id="fail/trailing-dot",
        ),
        pytest.param(
            {"linkerd_certify": "true", "linkerd_audience": "meshca"},
            "linkerd-audience and k8s-audience must differ; both have meshca",
            id="fail/shared-audience",
        ),
    ],
)
def test_bad_linkerd_settings(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(values, environ={})


def test_a_shared_audience_is_fine_while_linkerd_is_off() -> None:
    settings = load_settings({"k8s_audience": "identity.l5d.io"}, environ={})
    assert settings.k8s_audience == settings.linkerd_audience


def test_jwt_svid_settings_from_flag_env_or_file(tmp_path: Path) -> None:
    defaults = Settings()
    assert defaults.max_jwt_svid_ttl == timedelta(hours=1)
    assert defaults.jwt_issuer is None and defaults.oidc_discovery is None
    assert defaults.rotation_policy().jwt_keys
    assert defaults.rotation_policy().max_jwt_svid_ttl == timedelta(hours=1)
    config = tmp_path / "meshca.yaml"
    config.write_text("max-jwt-svid-ttl: 10m\njwt-issuer: https://oidc.example.org\n")
    from_file = load_settings({"config": str(config)}, environ={})
    assert from_file.max_jwt_svid_ttl == timedelta(minutes=10)
    assert from_file.jwt_issuer == "https://oidc.example.org"
    env = {"MESHCA_JWT_ISSUER": "https://a.example.org", "MESHCA_OIDC_DISCOVERY": "0.0.0.0:8443"}
    from_env = load_settings({}, environ=env)
    assert from_env.oidc_discovery == "0.0.0.0:8443"
    args = build_parser().parse_args(
        [
            "serve",
            "--max-jwt-svid-ttl",
            "2m",
            "--jwt-issuer",
            "https://b.example.org",
            "--oidc-discovery",
            "127.0.0.1:9000",
        ]
    )
    settings = settings_from(args)
    assert settings.max_jwt_svid_ttl == timedelta(minutes=2)
    assert settings.rotation_policy().max_jwt_svid_ttl == timedelta(minutes=2)
    assert (settings.jwt_issuer, settings.oidc_discovery) == (
        "https://b.example.org",
        "127.0.0.1:9000",
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"oidc_discovery": "127.0.0.1:9000"}, "oidc-discovery needs --jwt-issuer"),
        (
            {"oidc_discovery": "9000", "jwt_issuer": "https://x.example.org"},
            "oidc-discovery must be HOST:PORT",
        ),
        ({"jwt_issuer": "x.example.org"}, "jwt-issuer must be an https:// URL"),
        ({"max_jwt_svid_ttl": "0s"}, "max-jwt-svid-ttl"),
    ],
)
def test_bad_jwt_svid_settings(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(values, environ={})


def test_jwt_keys_outlive_four_propagation_delays() -> None:
    policy = Settings(intermediate_ttl=timedelta(hours=1), max_svid_ttl=timedelta(hours=2))
    rotation = policy.rotation_policy()
    assert rotation.jwt_key_ttl == 5 * rotation.propagation_delay
    assert rotation.problems() == []
