"""Who a caller proved to be, and the SPIFFE ID that identity maps to."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from meshca.core.errors import AuthenticationFailed
from meshca.core.spiffe import SpiffeId, TrustDomain

__all__ = ["KubernetesIdentity", "is_namespace", "is_service_account", "spiffe_id_for"]

# Namespaces are DNS-1123 labels and service accounts DNS-1123 subdomains; both are a
# subset of what a SPIFFE path segment allows, so a valid pair always maps cleanly.
_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# A subdomain is dot-separated labels (no empty label, none starting or ending in '-'),
# at most 253 characters in all; the lookahead holds the length.
_SUBDOMAIN_RE = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)


def is_namespace(name: str) -> bool:
    """Whether ``name`` is a valid Kubernetes namespace name (a DNS-1123 label)."""
    return _LABEL_RE.fullmatch(name) is not None


def is_service_account(name: str) -> bool:
    """Whether ``name`` is a valid service account name (a DNS-1123 subdomain)."""
    return _SUBDOMAIN_RE.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class KubernetesIdentity:
    """A service account identity proven by a Kubernetes token.

    ``expires_at`` is the token's expiry (None only for legacy tokens an operator allowed).
    Pod and node fields are present for projected tokens bound to a pod.
    """

    namespace: str
    service_account: str
    expires_at: datetime | None = None
    pod_name: str | None = None
    pod_uid: str | None = None
    node_name: str | None = None
    service_account_uid: str | None = None


def spiffe_id_for(identity: KubernetesIdentity, trust_domain: TrustDomain) -> SpiffeId:
    """Map a service account to ``spiffe://<td>/ns/<ns>/sa/<sa>``.

    A token whose names are not valid Kubernetes names is treated as a bad token.
    """
    if not is_namespace(identity.namespace):
        raise AuthenticationFailed(
            f"token names an invalid namespace {identity.namespace[:80]!r}",
            reason="token-invalid-namespace",
        )
    if not is_service_account(identity.service_account):
        raise AuthenticationFailed(
            f"token names an invalid service account {identity.service_account[:80]!r}",
            reason="token-invalid-service-account",
        )
    return trust_domain.workload_id(identity.namespace, identity.service_account)
