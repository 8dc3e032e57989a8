"""Kubernetes service-account token claims -> ``KubernetesIdentity``.

Two token shapes exist. Projected tokens (the only kind a pod gets since Kubernetes 1.24)
carry a nested ``kubernetes.io`` claim, an audience and an expiry. Legacy secret-based
tokens use flat ``kubernetes.io/serviceaccount/...`` claims, issuer
``kubernetes/serviceaccount``, no audience and no expiry: they are bearer credentials
that never die, so they are refused unless an operator opts in.

Every problem is reported as ``AuthenticationFailed`` with a ``token-...`` reason; messages
quote claim values (shortened), never the token.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from meshca.core.errors import AuthenticationFailed
from meshca.core.identity import KubernetesIdentity

__all__ = [
    "LEGACY_ISSUER",
    "MAX_TOKEN_CHARS",
    "SERVICE_ACCOUNT_USER_PREFIX",
    "decode_unverified",
    "expiry",
    "identity_from_claims",
    "is_legacy_token",
    "numeric_date",
    "parse_service_account_username",
    "shown",
]

LEGACY_ISSUER = "kubernetes/serviceaccount"
SERVICE_ACCOUNT_USER_PREFIX = "system:serviceaccount:"
# Kubernetes tokens are around 1 KiB; anything far larger is not one of them.
MAX_TOKEN_CHARS = 16 * 1024

_LEGACY_PREFIX = "kubernetes.io/serviceaccount/"
_LEGACY_NAMESPACE = _LEGACY_PREFIX + "namespace"
_LEGACY_SA_NAME = _LEGACY_PREFIX + "service-account.name"
_LEGACY_SA_UID = _LEGACY_PREFIX + "service-account.uid"
# Compact JWS: three base64url segments without padding; the signature may be empty
# (alg "none"), which verification then refuses with a precise reason.
_COMPACT_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def shown(value: object) -> str:
    """Quote a claim value in a message without flooding logs."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _malformed(what: str) -> AuthenticationFailed:
    return AuthenticationFailed(f"token is not a well-formed JWT: {what}", reason="token-malformed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers that pick different duplicates would see different claims.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate member {key[:40]!r}")
        result[key] = value
    return result


def _segment(segment: str, name: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (binascii.Error, ValueError, RecursionError):
        raise _malformed(f"the {name} is not base64url-encoded JSON without duplicates") from None
    if not isinstance(value, dict):
        raise _malformed(f"the {name} is not a JSON object")
    return value


def decode_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a compact JWS into its header and claims, checking nothing but the syntax.

    The result is attacker-controlled until the signature is verified.
    """
    if len(token) > MAX_TOKEN_CHARS:
        raise _malformed(f"it is longer than {MAX_TOKEN_CHARS} characters")
    if not token.isascii() or not _COMPACT_RE.fullmatch(token):
        raise _malformed("expected three base64url segments separated by dots")
    header_part, claims_part, _ = token.split(".")
    return _segment(header_part, "header"), _segment(claims_part, "payload")


def is_legacy_token(claims: Mapping[str, Any]) -> bool:
    """True for a secret-based token, or any token without an expiry.

    A token with no ``exp`` is a long-lived credential whatever its shape, so it gets the
    same treatment as a legacy one.
    """
    return (
        claims.get("iss") == LEGACY_ISSUER
        or _LEGACY_NAMESPACE in claims
        or claims.get("exp") is None
    )


def numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim as seconds since the epoch; None if absent."""
    value = claims.get(name)
    if value is None:
        return None
    # bool is an int subclass, and true is not a date; Python's json also admits NaN.
    if not isinstance(value, bool) and isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
        if math.isfinite(seconds):
            return seconds
    raise AuthenticationFailed(
        f"token claim {name!r} is not a finite number: {shown(value)}", reason="token-malformed"
    )


def expiry(claims: Mapping[str, Any]) -> datetime | None:
    """The ``exp`` claim as an aware datetime; None if absent."""
    exp = numeric_date(claims, "exp")
    if exp is None:
        return None
    try:
        return datetime.fromtimestamp(exp, UTC)
    except (OverflowError, OSError, ValueError):
        raise AuthenticationFailed(
            "token claim 'exp' is out of range", reason="token-malformed"
        ) from None


def parse_service_account_username(username: object) -> tuple[str, str]:
    """``system:serviceaccount:<ns>:<sa>`` -> ``(ns, sa)``."""
    if isinstance(username, str) and username.startswith(SERVICE_ACCOUNT_USER_PREFIX):
        parts = username[len(SERVICE_ACCOUNT_USER_PREFIX) :].split(":")
        if len(parts) == 2 and all(parts):
            return parts[0], parts[1]
    raise AuthenticationFailed(
        f"token belongs to {shown(username)}, not to a service account",
        reason="token-not-service-account",
    )


def _required(container: Mapping[str, Any], key: str, where: str) -> str:
    value = container.get(key)
    if not isinstance(value, str) or not value:
        raise AuthenticationFailed(
            f"token claim {where} is missing or not a non-empty string",
            reason="token-missing-claims",
        )
    return value


def _optional(container: Mapping[str, Any], key: str, where: str) -> str | None:
    return None if container.get(key) is None else _required(container, key, where)


def _object(container: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any] | None:
    value = container.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise AuthenticationFailed(
            f"token claim {where} is not an object", reason="token-missing-claims"
        )
    return value


def _check_subject(claims: Mapping[str, Any], namespace: str, service_account: str) -> None:
    expected = f"{SERVICE_ACCOUNT_USER_PREFIX}{namespace}:{service_account}"
    subject = claims.get("sub")
    if subject != expected:
        raise AuthenticationFailed(
            f"token subject {shown(subject)} disagrees with its service account claims "
            f"{shown(expected)}",
            reason="token-subject-mismatch",
        )


def _projected_identity(claims: Mapping[str, Any], k8s: Mapping[str, Any]) -> KubernetesIdentity:
    namespace = _required(k8s, "namespace", "kubernetes.io.namespace")
    account = _object(k8s, "serviceaccount", "kubernetes.io.serviceaccount")
    if account is None:
        raise AuthenticationFailed(
            "token has no kubernetes.io.serviceaccount claim", reason="token-missing-claims"
        )
    name = _required(account, "name", "kubernetes.io.serviceaccount.name")
    _check_subject(claims, namespace, name)
    pod = _object(k8s, "pod", "kubernetes.io.pod")
    node = _object(k8s, "node", "kubernetes.io.node")
    return KubernetesIdentity(
        namespace=namespace,
        service_account=name,
        expires_at=expiry(claims),
        # A pod or node claim, when present, names its object completely.
        pod_name=_required(pod, "name", "kubernetes.io.pod.name") if pod is not None else None,
        pod_uid=_required(pod, "uid", "kubernetes.io.pod.uid") if pod is not None else None,
        node_name=_required(node, "name", "kubernetes.io.node.name") if node is not None else None,
        service_account_uid=_optional(account, "uid", "kubernetes.io.serviceaccount.uid"),
    )


def _legacy_identity(claims: Mapping[str, Any]) -> KubernetesIdentity:
    namespace = _required(claims, _LEGACY_NAMESPACE, _LEGACY_NAMESPACE)
    name = _required(claims, _LEGACY_SA_NAME, _LEGACY_SA_NAME)
    _check_subject(claims, namespace, name)
    return KubernetesIdentity(
        namespace=namespace,
        service_account=name,
        expires_at=expiry(claims),
        service_account_uid=_optional(claims, _LEGACY_SA_UID, _LEGACY_SA_UID),
    )


def identity_from_claims(
    claims: Mapping[str, Any], *, allow_legacy_tokens: bool
) -> KubernetesIdentity:
    """The identity that already-verified claims describe.

    The caller has checked signature, issuer, audience and validity times. Here: legacy
    tokens are refused unless allowed; ``sub`` must agree with the service account claims;
    pod and node details are optional but, when present, complete.
    """
    if is_legacy_token(claims) and not allow_legacy_tokens:
        raise AuthenticationFailed(
            "token is a legacy or non-expiring service-account token; use a projected token",
            reason="token-legacy",
        )
    k8s = _object(claims, "kubernetes.io", "kubernetes.io")
    if k8s is not None:
        return _projected_identity(claims, k8s)
    if _LEGACY_NAMESPACE in claims:
        return _legacy_identity(claims)
    raise AuthenticationFailed(
        "token has no kubernetes.io service account claims", reason="token-missing-claims"
    )
