"""Building policy sets from YAML text in tests (the core itself takes plain mappings)."""

from __future__ import annotations

from typing import Any

import yaml

from meshca.core.policy import AuthzRequest, PolicySet, parse_policy

TD = "spiffe://cluster.local"


def policies(text: str, version: str = "test") -> PolicySet:
    """Every document of ``text`` (YAML) compiled into one set."""
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    return PolicySet(
        [parse_policy(d, file="test.yaml", document=i + 1) for i, d in enumerate(docs)],
        version,
    )


def workload(namespace: str, account: str) -> str:
    return f"{TD}/ns/{namespace}/sa/{account}"


def req(
    source: str | None,
    destination: str | None,
    method: str = "GET",
    path: str = "/",
    **extra: Any,
) -> AuthzRequest:
    return AuthzRequest(
        source_principal=source,
        destination_principal=destination,
        method=method,
        path=path,
        **extra,
    )
