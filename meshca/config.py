"""Settings: the only code that reads the environment or configuration files.

Each setting comes from, in rising precedence: its default, the YAML file given with
``--config`` (or ``MESHCA_CONFIG``), a ``MESHCA_<NAME>`` environment variable, and the
command-line flag ``--<name>``. Names are the same everywhere, with ``-`` in flags and
YAML (``_`` is accepted in YAML too) and ``_`` upper-cased in the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from meshca.adapters.k8s.token_review import in_cluster_defaults
from meshca.core.callers import SpiffePatterns
from meshca.core.errors import InvalidSpiffeId
from meshca.core.linkerd import check_linkerd_domain
from meshca.core.rate_limit import IssuanceRate
from meshca.core.rotation import RotationPolicy
from meshca.core.spiffe import SpiffeId, TrustDomain

__all__ = ["ConfigError", "Settings", "load_settings", "parse_duration", "parse_issuance_rate"]


class ConfigError(ValueError):
    """A setting is missing, unknown or has a bad value; the message names it."""


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | int | float) -> timedelta:
    """``90``, ``"90s"``, ``"15m"``, ``"1h30m"``, ``"7d"`` -> timedelta; bare numbers: seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        value = str(text).strip().lower()
        if re.fullmatch(r"\d+(\.\d+)?", value):
            seconds = float(value)
        else:
            pos, seconds = 0, 0.0
            for match in _DURATION_RE.finditer(value):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _UNITS[match.group(2)]
                pos = match.end()
            if pos != len(value) or not value:
                raise ConfigError(f"{text!r} is not a duration (examples: 90s, 15m, 24h, 7d)")
    if seconds <= 0:
        raise ConfigError(f"{text!r}: a duration must be positive")
    return timedelta(seconds=seconds)


#: Bounds of ``--issuance-rate``: beyond them a value is a typo, not a policy.
MAX_RATE_COUNT = 100_000
MIN_RATE_PERIOD = timedelta(seconds=1)
MAX_RATE_PERIOD = timedelta(days=1)


def parse_issuance_rate(text: str) -> IssuanceRate:
    """``"30/1m"`` -> 30 per minute; the period is a duration (``"30/m"`` means ``30/1m``).

    The count is 1..100,000 and the period 1s..1d; anything else is a ConfigError.
    """
    example = "(examples: 30/1m, 100/1h)"
    count_text, slash, period_text = str(text).strip().partition("/")
    count_text, period_text = count_text.strip(), period_text.strip().lower()
    if not slash or not count_text.isascii() or not count_text.isdigit():
        raise ConfigError(f"{text!r} is not COUNT/PERIOD {example}")
    count = int(count_text)
    if not 1 <= count <= MAX_RATE_COUNT:
        raise ConfigError(f"{text!r}: the count must be 1 to {MAX_RATE_COUNT:,}")
    if period_text in ("s", "m", "h", "d"):
        period_text = "1" + period_text
    try:
        period = parse_duration(period_text)
    except ConfigError:
        raise ConfigError(f"{text!r}: {period_text!r} is not a period {example}") from None
    except OverflowError:
        period = MAX_RATE_PERIOD * 2
    if not MIN_RATE_PERIOD <= period <= MAX_RATE_PERIOD:
        raise ConfigError(f"{text!r}: the period must be 1s to 1d")
    return IssuanceRate(count, period)


@dataclass(frozen=True)
class Settings:
    """Everything ``meshca serve`` can be told. See README.md for each setting."""

    listen: str = "0.0.0.0:15012"
    data_dir: Path = Path("meshca-data")
    trust_domain: str = "cluster.local"
    k8s_mode: str = "tokenreview"
    k8s_issuer: str | None = None
    k8s_jwks_file: Path | None = None
    k8s_jwks_url: str | None = None
    k8s_audience: tuple[str, ...] = ("meshca",)
    k8s_api_server: str | None = None
    k8s_ca_file: Path | None = None
    k8s_token_file: Path | None = None
    k8s_allow_legacy_tokens: bool = False
    k8s_jwks_min_refresh: timedelta = timedelta(seconds=30)
    token_cache_ttl: timedelta = timedelta(seconds=60)
    database_url: str | None = None
    svid_ttl: timedelta = timedelta(hours=24)
    max_svid_ttl: timedelta = timedelta(hours=24)
    root_ttl: timedelta = timedelta(days=365)
    intermediate_ttl: timedelta = timedelta(days=30)
    propagation_delay: timedelta | None = None
    root_rotation: timedelta | None = None
    journal_poll: timedelta = timedelta(seconds=2)
    bundle_endpoint: str | None = None
    crl_validity: timedelta = timedelta(hours=24)
    vault_addr: str | None = None
    vault_upstream: bool = False
    vault_transit: bool = False
    vault_pki_mount: str = "pki"
    vault_transit_mount: str = "transit"
    vault_auth: str = "token"
    vault_auth_mount: str | None = None
    vault_token_file: Path | None = None
    vault_role_id: str | None = None
    vault_secret_id_file: Path | None = None
    vault_role: str | None = None
    vault_jwt_file: Path | None = None
    vault_ca_file: Path | None = None
    plaintext: bool = False
    server_name: tuple[str, ...] = ("localhost",)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    log_level: str = "info"
    log_format: str = "text"
    policy_dir: Path | None = None
    policy_default: str = "deny"
    policy_poll_interval: timedelta = timedelta(seconds=5)
    decision_sample_rate: float = 1.0
    policy_listen: str | None = None
    policy_insecure_main_port: bool = False
    policy_caller: tuple[str, ...] = ()
    policy_admin: tuple[str, ...] = ()
    policy_token_file: Path | None = None
    no_reflection: bool = False
    auditor: tuple[str, ...] = ()
    audit_token_file: Path | None = None
    audit_listen: str | None = None
    tree_head_interval: timedelta = timedelta(seconds=60)
    audit_retention: timedelta | None = None
    key_encryption_key_file: Path | None = None
    health_listen: str | None = None
    metrics_listen: str | None = None
    shutdown_grace: timedelta = timedelta(seconds=10)
    connection_idle_timeout: timedelta = timedelta(minutes=5)
    # Linkerd's identity API: opt-in, as it lets every pod holding a Linkerd-audience
    # token (every meshed pod, where Linkerd runs) get a certificate from meshca.
    linkerd_certify: bool = False
    linkerd_audience: tuple[str, ...] = ("identity.l5d.io",)
    # Linkerd's <linkerd-ns>.<identityTrustDomain>: namespace "linkerd" and trust domain
    # "cluster.local" by default upstream.
    linkerd_identity_domain: str = "linkerd.cluster.local"
    issuance_rate: str | None = None
    max_jwt_svid_ttl: timedelta = timedelta(hours=1)
    jwt_issuer: str | None = None
    oidc_discovery: str | None = None

    def __post_init__(self) -> None:
        if self.k8s_mode not in ("tokenreview", "jwks"):
            raise ConfigError(f"k8s-mode must be 'tokenreview' or 'jwks', not {self.k8s_mode!r}")
        if self.workers < 1:
            raise ConfigError("workers must be at least 1")
        if not self.k8s_audience:
            raise ConfigError("at least one k8s-audience is required")
        try:
            TrustDomain.parse(self.trust_domain)
        except InvalidSpiffeId as exc:
            raise ConfigError(f"trust-domain: {exc}") from None
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError("log-level must be one of debug, info, warning, error")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log-format must be text or json, not {self.log_format!r}")
        if self.policy_default not in ("deny", "allow"):
            raise ConfigError(f"policy-default must be deny or allow, not {self.policy_default!r}")
        if not 0.0 <= self.decision_sample_rate <= 1.0:
            raise ConfigError("decision-sample-rate must be between 0 and 1")
        for problem in self.rotation_policy().problems():
            raise ConfigError(f"CA lifetimes: {problem}")
        if self.bundle_endpoint is not None and ":" not in self.bundle_endpoint:
            raise ConfigError("bundle-endpoint must be HOST:PORT")
        if not timedelta(seconds=2) <= self.crl_validity <= timedelta(days=7):
            raise ConfigError("crl-validity must be between 2s and 7d")
        if self.vault_auth not in ("token", "approle", "kubernetes"):
            raise ConfigError("vault-auth must be token, approle or kubernetes")
        if (self.vault_upstream or self.vault_transit) and not self.vault_addr:
            raise ConfigError("--vault-upstream and --vault-transit need --vault-addr")
        for auditor in self.auditor:
            try:
                SpiffeId.parse(auditor)
            except InvalidSpiffeId as exc:
                raise ConfigError(f"auditor: {exc}") from None
        self._check_policy_access()
        if self.audit_listen is not None and ":" not in self.audit_listen:
            raise ConfigError("audit-listen must be HOST:PORT")
        if self.health_listen is not None and ":" not in self.health_listen:
            raise ConfigError("health-listen must be HOST:PORT")
        if self.metrics_listen is not None and ":" not in self.metrics_listen:
            raise ConfigError("metrics-listen must be HOST:PORT")
        if self.shutdown_grace <= timedelta(0):
            raise ConfigError("shutdown-grace must be a positive duration")
        if self.audit_listen and self.plaintext:
            raise ConfigError("audit-listen is mTLS: it cannot be used with --plaintext")
        self._check_linkerd()
        self.issuance_rate_limit()
        self._check_jwt()

    def _check_jwt(self) -> None:
        if self.max_jwt_svid_ttl <= timedelta(0):
            raise ConfigError("max-jwt-svid-ttl must be a positive duration")
        if self.jwt_issuer is not None and not self.jwt_issuer.startswith(("https://", "http://")):
            raise ConfigError(f"jwt-issuer must be an https:// URL, not {self.jwt_issuer!r}")
        if self.oidc_discovery is not None:
            if ":" not in self.oidc_discovery:
                raise ConfigError("oidc-discovery must be HOST:PORT")
            if not self.jwt_issuer:
                raise ConfigError(
                    "oidc-discovery needs --jwt-issuer: the public URL verifiers reach it at"
                )

    def _check_linkerd(self) -> None:
        try:
            check_linkerd_domain(self.linkerd_identity_domain)
        except ValueError as exc:
            raise ConfigError(f"linkerd-identity-domain: {exc}") from None
        if not self.linkerd_audience:
            raise ConfigError("at least one linkerd-audience is required")
        shared = sorted(set(self.linkerd_audience) & set(self.k8s_audience))
        if shared and self.linkerd_certify:
            # Each door takes the tokens minted for it; one audience on both would let a
            # token for either be used at the other.
            raise ConfigError(
                f"linkerd-audience and k8s-audience must differ; both have {', '.join(shared)}"
            )

    def _check_policy_access(self) -> None:
        if self.policy_listen is not None and ":" not in self.policy_listen:
            raise ConfigError("policy-listen must be HOST:PORT")
        if self.policy_listen and self.plaintext:
            raise ConfigError("policy-listen is mTLS: it cannot be used with --plaintext")
        if self.policy_listen and self.policy_insecure_main_port:
            raise ConfigError(
                "give --policy-listen or --policy-insecure-main-port, not both: with "
                "--policy-listen the policy services are served only there"
            )
        if self.policy_listen and self.policy_dir is None:
            raise ConfigError("policy-listen serves the policies of --policy-dir: give it too")
        try:
            self.policy_callers()
        except InvalidSpiffeId as exc:
            raise ConfigError(f"policy-caller: {exc}") from None
        for admin in self.policy_admin:
            try:
                SpiffeId.parse(admin)
            except InvalidSpiffeId as exc:
                raise ConfigError(f"policy-admin: {exc}") from None

    def policy_callers(self) -> SpiffePatterns:
        """Who may call ext_authz on the policy port: ``--policy-caller``, or by default
        any SVID of our trust domain."""
        written = self.policy_caller or (f"spiffe://{TrustDomain.parse(self.trust_domain).name}/*",)
        return SpiffePatterns.parse(written)

    def check_policy_exposure(self) -> None:
        """Raise ConfigError when ``--policy-dir`` would open the policy set on the main port.

        The main port takes proxies without client certificates, so ext_authz there
        answers anyone who can reach it; that takes ``--policy-insecure-main-port``.
        """
        if self.policy_dir is None or self.policy_listen or self.policy_insecure_main_port:
            return
        raise ConfigError(
            "--policy-dir needs --policy-listen HOST:PORT: Envoy's ext_authz and the policy "
            "API are served there, to callers with a client SVID (mTLS). To serve them on "
            "the main port instead, where anyone who can reach it may ask ext_authz, give "
            "--policy-insecure-main-port"
        )

    def issuance_rate_limit(self) -> IssuanceRate | None:
        """``--issuance-rate`` parsed; None when it is off (the default)."""
        if self.issuance_rate is None or self.issuance_rate.strip().lower() in ("", "off"):
            return None
        try:
            return parse_issuance_rate(self.issuance_rate)
        except ConfigError as exc:
            raise ConfigError(f"issuance-rate: {exc}") from None

    def rotation_policy(self) -> RotationPolicy:
        """The CA lifetimes as core values; unset delays take their documented defaults."""
        return RotationPolicy(
            root_ttl=self.root_ttl,
            intermediate_ttl=self.intermediate_ttl,
            max_svid_ttl=self.max_svid_ttl,
            # A proxy renews within its certificate's lifetime, fetching the bundle.
            propagation_delay=self.propagation_delay or self.max_svid_ttl,
            root_rotation=self.root_rotation or self.root_ttl / 2,
            # With Vault's PKI upstream, roots are Vault's: meshca follows, never makes one.
            self_managed_roots=not self.vault_upstream,
            jwt_keys=True,
            # Long enough for a successor to wait out the propagation delay at half-life.
            jwt_key_ttl=max(
                self.intermediate_ttl, 5 * (self.propagation_delay or self.max_svid_ttl)
            ),
            max_jwt_svid_ttl=self.max_jwt_svid_ttl,
        )

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir.resolve() / 'meshca.db'}"

    def check_attestation(self) -> None:
        """Raise ConfigError unless the chosen k8s mode has what it needs."""
        if self.k8s_mode == "jwks":
            if not self.k8s_issuer:
                raise ConfigError("k8s-mode jwks needs --k8s-issuer")
            if self.k8s_jwks_file and self.k8s_jwks_url:
                raise ConfigError("give --k8s-jwks-file or --k8s-jwks-url, not both")
        elif not self.k8s_api_server:
            raise ConfigError(
                "k8s-mode tokenreview needs --k8s-api-server outside a cluster "
                "(KUBERNETES_SERVICE_HOST is not set); or use --k8s-mode jwks"
            )


SETTING_NAMES = tuple(f.name for f in fields(Settings))
_TYPES = {f.name: f.type for f in fields(Settings)}


def _convert(name: str, value: Any) -> Any:
    kind = str(_TYPES[name])
    if value is None:
        return None
    try:
        if "timedelta" in kind:
            return parse_duration(value)
        if "tuple" in kind:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(i).strip() for i in items if str(i).strip())
        if kind == "bool":
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ConfigError(f"{value!r} is not true or false")
        if kind == "int":
            if isinstance(value, bool):
                raise ConfigError(f"{value!r} is not a whole number")
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ConfigError(f"{value!r} is not a number")
            return float(value)
        if "Path" in kind:
            return Path(str(value)).expanduser()
        if not isinstance(value, str | int | float):
            raise ConfigError(f"expected text, got {type(value).__name__}")
        return str(value)
    except ConfigError as exc:
        raise ConfigError(f"{name.replace('_', '-')}: {exc}") from None
    except (TypeError, ValueError):
        raise ConfigError(f"{name.replace('_', '-')}: bad value {value!r}") from None


def _from_file(path: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"config file {path} must be a mapping of setting: value")
    values = {}
    for key, value in document.items():
        name = str(key).replace("-", "_")
        if name not in SETTING_NAMES:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        values[name] = value
    return values


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    for name in SETTING_NAMES:
        env_name = "MESHCA_" + name.upper()
        if env_name in environ:
            values[name] = environ[env_name]
    return values


def load_settings(
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    base: Settings | None = None,
) -> Settings:
    """Merge defaults (or ``base``), config file, environment and flags into Settings.

    ``flags`` maps setting names to values; None means "not given on the command line".
    """
    environ = os.environ if environ is None else environ
    config_file = flags.get("config") or environ.get("MESHCA_CONFIG")
    merged: dict[str, Any] = {}
    if config_file:
        merged.update(_from_file(Path(config_file)))
    merged.update(_from_env(environ))
    merged.update({k: v for k, v in flags.items() if k in SETTING_NAMES and v is not None})
    converted = {name: _convert(name, value) for name, value in merged.items()}
    try:
        settings = replace(base or Settings(), **converted)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    return _with_in_cluster_defaults(settings, environ)


def _with_in_cluster_defaults(settings: Settings, environ: Mapping[str, str]) -> Settings:
    """In a pod, TokenReview needs no flags: fill in the API server and our credentials."""
    if settings.k8s_mode != "tokenreview":
        return settings
    defaults = in_cluster_defaults(environ)
    return replace(
        settings,
        k8s_api_server=settings.k8s_api_server or defaults.api_server,
        k8s_ca_file=settings.k8s_ca_file or _path(defaults.ca_file),
        k8s_token_file=settings.k8s_token_file or _path(defaults.token_file),
    )


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None
