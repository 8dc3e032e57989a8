"""``meshca serve``: run the CA. Every setting is a flag, a MESHCA_* variable or YAML key."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from meshca.config import Settings, load_settings

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
    "intermediate_ttl": "lifetime of a self-generated intermediate (default 30d)",
    "plaintext": "serve without TLS (local use only)",
    "server_name": "DNS name or IP in meshca's serving certificate; repeat (default localhost)",
    "workers": "server processes sharing the port (default: one per CPU)",
    "log_level": "debug, info, warning or error (default info)",
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

    return app.serve(settings_from(args))


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
