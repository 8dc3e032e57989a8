"""``meshca serve``: run the CA. Every setting is a flag, a MESHCA_* variable or YAML key."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any

from meshca.config import Settings, load_settings
from meshca.core.errors import BackendUnavailable

__all__ = ["add_setting_flags", "register", "settings_from"]

HELP = {
    "listen": "address to serve gRPC on, HOST:PORT (default 0.0.0.0:15012)",
    "data_dir": "directory for the CA files and the SQLite database (default ./meshca-data)",
    "trust_domain": "SPIFFE trust domain (default cluster.local)",
    "k8s_mode": "how tokens are checked: tokenreview (ask the API server) or jwks (offline)",
    "k8s_issuer": "the cluster's service-account token issuer (jwks mode; also OIDC discovery)",
    "k8s_jwks_file": "JWKS file with the cluster's token keys (jwks mode)",
    "k8s_jwks_url": "URL of the cluster's JWKS (jwks mode; default: OIDC discovery)",
    "k8s_audience": "accepted token audience; repeat for several (default meshca)",
    "k8s_api_server": "Kubernetes API server URL (tokenreview mode; default in-cluster)",
    "k8s_ca_file": "CA bundle for the API server or JWKS URL (default in-cluster CA)",
    "k8s_token_file": "meshca's own token for TokenReview (default in-cluster token)",
    "k8s_allow_legacy_tokens": "accept legacy non-expiring secret tokens (not recommended)",
    "k8s_jwks_min_refresh": "least time between JWKS refetches for unknown key ids (default 30s)",
    "token_cache_ttl": "how long a reviewed token is trusted without asking again (default 60s)",
    "database_url": "SQLAlchemy URL of the issuance record (default SQLite in --data-dir)",
    "svid_ttl": "lifetime of a certificate when the caller asks for none (default 24h)",
    "max_svid_ttl": "longest lifetime a caller may get (default 24h)",
    "root_ttl": "lifetime of a self-generated root (default 365d)",
    "intermediate_ttl": "lifetime of an intermediate; renewed at half-life (default 30d)",
    "propagation_delay": "how long a new root is in the trust bundle before anything is "
    "signed under it (default: --max-svid-ttl)",
    "root_rotation": "age at which a self-generated root's successor is prepared "
    "(default: half of --root-ttl)",
    "journal_poll": "how often each server process re-reads the CA journal (rotations, "
    "taints) and the deny-list (default 2s)",
    "bundle_endpoint": "serve the SPIFFE trust bundle over HTTPS at HOST:PORT, path / "
    "(plain HTTP with --plaintext)",
    "crl_validity": "each intermediate's CRL is valid this long (nextUpdate) and re-signed "
    "at half of it and on every deny-list change (default 24h; 2s to 7d)",
    "vault_addr": "Vault (OpenBao) address, e.g. https://vault:8200; Vault is off without it",
    "vault_upstream": "Vault's PKI owns the roots and signs meshca's intermediates",
    "vault_transit": "keep the CA private keys in Vault's Transit engine (none on disk)",
    "vault_pki_mount": "PKI mount of the upstream CA (default pki)",
    "vault_transit_mount": "Transit mount for the CA keys (default transit)",
    "vault_auth": "how meshca logs in to Vault: token, approle or kubernetes (default token)",
    "vault_auth_mount": "auth mount (default: the method's name)",
    "vault_token_file": "file holding the Vault token (vault-auth token)",
    "vault_role_id": "AppRole role id (vault-auth approle)",
    "vault_secret_id_file": "file holding the AppRole secret id (vault-auth approle)",
    "vault_role": "Vault role for Kubernetes login (vault-auth kubernetes)",
    "vault_jwt_file": "service-account token for Kubernetes login (default: the pod's own)",
    "vault_ca_file": "CA bundle to verify Vault's TLS certificate",
    "plaintext": "serve without TLS (local use only)",
    "server_name": "DNS name or IP in meshca's serving certificate; repeat (default localhost)",
    "workers": "server processes sharing the port (default: one per CPU)",
    "log_level": "debug, info, warning or error (default info); warning keeps refusals "
    "but drops the line per certificate issued",
    "log_format": "text, or json: one object per line with stable keys (default text)",
    "policy_dir": "serve Envoy ext_authz decisions from the authorization policies here",
    "policy_default": "decision when no ALLOW policy selects a workload: deny or allow "
    "(default deny)",
    "policy_poll_interval": "how often the policy directory is checked for changes (default 5s)",
    "decision_sample_rate": "share of allowed decisions recorded, 0..1 (denied: all; default 1)",
    "policy_listen": "HOST:PORT serving Envoy ext_authz and the policy API to callers with a "
    "client SVID (mTLS required); with --policy-dir they are served only there",
    "policy_insecure_main_port": "serve ext_authz and the policy API on the main port instead "
    "of --policy-listen: anyone who can reach it may ask ext_authz (the policy API still "
    "needs --policy-admin or --policy-token-file)",
    "policy_caller": "SPIFFE ID pattern allowed to call ext_authz on --policy-listen "
    "(exact, prefix*, *suffix or *); repeat (default: spiffe://<trust-domain>/*)",
    "policy_admin": "SPIFFE ID allowed to use the policy API (Check, Explain, Status) with its "
    "client SVID; repeat",
    "policy_token_file": "file holding a bearer token that grants the policy API (for tools)",
    "no_reflection": "do not serve gRPC server reflection",
    "auditor": "SPIFFE ID allowed to use the audit API over mTLS (--audit-listen); repeat",
    "audit_token_file": "file holding a bearer token that grants the audit API (for tools)",
    "audit_listen": "HOST:PORT where auditors connect with a client SVID (mTLS required)",
    "tree_head_interval": "how often the log's tree head is signed when it grew (default 60s)",
    "audit_retention": "prune issuance records older than this (default: keep forever)",
    "key_encryption_key_file": "file with a base64 32-byte key that seals the CA and log keys "
    "in the database, so replicas on several hosts share them (the same Secret on every "
    "one); while replacing it, one key per line, the new one first",
    "health_listen": "HOST:PORT serving only gRPC health, in plaintext, for Kubernetes probes "
    "(service '' is liveness, 'meshca.ready' readiness)",
    "metrics_listen": "HOST:PORT serving Prometheus metrics at /metrics, in plaintext "
    "(every worker process summed)",
    "shutdown_grace": "on SIGTERM or SIGINT, how long calls in flight may take to finish "
    "before the server exits; a second signal cuts it short (default 10s)",
    "connection_idle_timeout": "close a client connection with no call open for this long "
    "(GOAWAY; gRPC clients reconnect on their next call; default 5m)",
    "linkerd_certify": "also serve Linkerd's identity API (io.linkerd.proxy.identity.Identity/"
    "Certify) on the main port, for linkerd2-proxy",
    "linkerd_audience": "token audience accepted by Linkerd's identity API, and only there; "
    "repeat for several (default identity.l5d.io)",
    "linkerd_identity_domain": "suffix of Linkerd names after <sa>.<ns>.serviceaccount.identity.: "
    "<linkerd-namespace>.<identityTrustDomain> (default linkerd.cluster.local)",
    "issuance_rate": "most certificates one pod (or one token bound to no pod) gets, as "
    "COUNT/PERIOD, e.g. 30/1m; counted once for all the workers (default off; see "
    "docs/operations.md)",
    "max_jwt_svid_ttl": "longest lifetime a JWT-SVID may be asked for (default 1h; a request "
    "for none gets 5m, or this if shorter)",
    "jwt_issuer": "the 'iss' claim of every JWT-SVID: the public https:// URL where "
    "--oidc-discovery is reached (default: no 'iss')",
    "oidc_discovery": "HOST:PORT serving /.well-known/openid-configuration and its JWKS "
    "(/keys) in plain HTTP, for outside JWT-SVID verifiers behind --jwt-issuer's URL",
}


def add_setting_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML file of settings (MESHCA_CONFIG)")
    for f in fields(Settings):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=HELP[f.name])
        elif "tuple" in kind:
            parser.add_argument(flag, action="append", metavar="VALUE", help=HELP[f.name])
        else:
            metavar = "DURATION" if "timedelta" in kind else f.name.split("_")[-1].upper()
            parser.add_argument(flag, metavar=metavar, help=HELP[f.name])


def settings_from(args: argparse.Namespace, base: Settings | None = None) -> Settings:
    flags: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("run", "command")}
    return load_settings(flags, base=base)


def _run(args: argparse.Namespace) -> int:
    from meshca import app
    from meshca.adapters.shutdown import exit_now

    try:
        code = app.serve(settings_from(args))
    except BackendUnavailable as error:
        # A database that cannot be opened (down, disk full) is for the operator to fix:
        # say which and why, without a traceback.
        print(f"meshca: cannot start: {error.message}", file=sys.stderr)
        return 1
    exit_now(code)


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "serve",
        help="run the CA server",
        description="Run the CA: gRPC (meshca.v1 and Istio's CA API), health and reflection.",
        epilog="Each flag can also be set as MESHCA_<FLAG> (e.g. MESHCA_TRUST_DOMAIN) or in "
        "the --config YAML file (e.g. trust-domain: example.org).",
    )
    add_setting_flags(parser)
    parser.set_defaults(run=_run)
