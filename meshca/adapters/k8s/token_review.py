"""Online attestation: ask the Kubernetes API server, through a TokenReview, who a token is.

The API server also checks that the bound pod, secret and service account still exist, so
a token dies with its pod. The cost is one API call per attestation; wrap the attestor in
``meshca.service.attestation_cache.CachingAttestor``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from meshca.adapters.k8s._http import HttpClient, HttpResponse, check_http_url
from meshca.adapters.k8s.claims import (
    decode_unverified,
    expiry,
    is_legacy_token,
    parse_service_account_username,
    shown,
)
from meshca.core.errors import AuthenticationFailed, BackendUnavailable
from meshca.core.identity import KubernetesIdentity
from meshca.core.ports import Clock

__all__ = [
    "API_SERVER_REFUSED_MESHCA",
    "API_SERVER_UNAVAILABLE",
    "IN_CLUSTER_SECRETS_DIR",
    "InClusterDefaults",
    "TokenReviewAttestor",
    "in_cluster_defaults",
]

IN_CLUSTER_SECRETS_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"  # noqa: S105 - a path
_EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
_EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"
_EXTRA_NODE_NAME = "authentication.kubernetes.io/node-name"
_MAX_CREDENTIAL_BYTES = 64 * 1024
_EXPIRY_GRACE = timedelta(seconds=30)
#: The audit reason of a refusal because the API server could not review the token: the
#: token is not known bad, so the proxy gets UNAVAILABLE and retries.
API_SERVER_UNAVAILABLE = "k8s-api-unavailable"
#: ... and because the API server refused meshca's own credentials (RBAC, a stale token).
API_SERVER_REFUSED_MESHCA = "k8s-api-refused-meshca"


class InClusterDefaults(NamedTuple):
    """Where a pod finds its API server and its own credentials; all None outside a pod."""

    api_server: str | None
    ca_file: str | None
    token_file: str | None


def in_cluster_defaults(
    env: Mapping[str, str] | None = None, *, secrets_dir: str = IN_CLUSTER_SECRETS_DIR
) -> InClusterDefaults:
    """The in-cluster API server settings that ``env`` (default: ``os.environ``) implies.

    Meant for the composition root only. Reads nothing but ``env``: whether the files
    exist is checked when they are used.
    """
    env = os.environ if env is None else env
    host = env.get("KUBERNETES_SERVICE_HOST", "").strip()
    if not host:
        return InClusterDefaults(None, None, None)
    port = env.get("KUBERNETES_SERVICE_PORT", "").strip() or "443"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 service address
    return InClusterDefaults(
        api_server=f"https://{host}:{port}",
        ca_file=f"{secrets_dir}/ca.crt",
        token_file=f"{secrets_dir}/token",
    )


@dataclass(slots=True)
class _Credential:
    """meshca's own bearer token, re-read whenever its file changes (kubelet rotates it)."""

    path: Path
    stamp: tuple[int, int, int] | None = None
    token: str = ""

    def read(self) -> str:
        """Blocking; raises ``BackendUnavailable`` if the file cannot be read."""
        try:
            # stat follows the ..data symlink kubelet swaps, so a rotation changes the inode.
            info = self.path.stat()
            stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
            if stamp != self.stamp:
                with self.path.open("rb") as stream:
                    data = stream.read(_MAX_CREDENTIAL_BYTES + 1)
                if len(data) > _MAX_CREDENTIAL_BYTES:
                    raise BackendUnavailable(f"token file {self.path} is too large")
                self.token = data.decode("utf-8").strip()
                self.stamp = stamp
        except (OSError, UnicodeDecodeError) as error:
            raise BackendUnavailable(
                f"cannot read meshca's token file {self.path}: {error}"
            ) from None
        if not self.token:
            raise BackendUnavailable(f"meshca's token file {self.path} is empty")
        return self.token


class TokenReviewAttestor:
    """An ``Attestor`` that asks the API server to review each token.

    The review names our ``audiences``; a token passes only if the API server says it is
    authenticated, confirms one of those audiences, and names a service account. Legacy
    tokens (issuer ``kubernetes/serviceaccount`` or no ``exp``, read unverified) are
    refused before any call unless ``allow_legacy_tokens``, and so are tokens whose
    unverified ``exp`` is more than 30 s past by ``clock``. ``expires_at`` comes from the
    unverified ``exp`` and is fit only for bounding caches.

    Raises ``BackendUnavailable`` when the API server cannot be reached, does not answer
    within ``timeout``, fails, or refuses meshca's own credentials (HTTP 401/403).

    Reviews run on threads of their own, at most ``max_concurrent_reviews`` at a time:
    while the API server hangs, each holds its thread for ``timeout``, and on the shared
    default executor they would starve the readiness probe and the rotator.
    """

    def __init__(
        self,
        *,
        api_server: str,
        audiences: Sequence[str],
        ca_file: str | None,
        token_file: str | None,
        clock: Clock,
        allow_legacy_tokens: bool = False,
        timeout: float = 5.0,
        max_concurrent_reviews: int = 16,
    ) -> None:
        if not audiences:
            raise ValueError("at least one audience is required")
        self._url = check_http_url(api_server, "API server") + TOKEN_REVIEW_PATH
        self._audiences = list(dict.fromkeys(audiences))
        self._client = HttpClient(ca_file=ca_file, timeout=timeout)
        self._credential = _Credential(Path(token_file)) if token_file else None
        self._clock = clock
        self._allow_legacy = allow_legacy_tokens
        self._reviewers = ThreadPoolExecutor(
            max_workers=max_concurrent_reviews, thread_name_prefix="meshca-tokenreview"
        )

    def with_audiences(self, audiences: Sequence[str]) -> TokenReviewAttestor:
        """This attestor (same API server client, credentials and review threads) asking
        for other audiences: for a second door whose tokens are minted for another
        audience (Linkerd's). Both share ``max_concurrent_reviews``."""
        if not audiences:
            raise ValueError("at least one audience is required")
        other = copy.copy(self)
        other._audiences = list(dict.fromkeys(audiences))
        return other

    async def attest(self, token: str) -> KubernetesIdentity:
        _, claims = decode_unverified(token)
        if is_legacy_token(claims) and not self._allow_legacy:
            raise AuthenticationFailed(
                "token is a legacy or non-expiring service-account token; use a projected token",
                reason="token-legacy",
            )
        expires_at = expiry(claims)
        if expires_at is not None and self._clock.now() - _EXPIRY_GRACE >= expires_at:
            # Certain to fail; spare the API server. The grace matches JwksAttestor's leeway.
            raise AuthenticationFailed("token has expired", reason="token-expired")
        loop = asyncio.get_running_loop()
        response = await loop.run_in_executor(self._reviewers, self._review, token)
        status = _review_status(response, self._url)
        return self._identity(status, token, expires_at)

    def _review(self, token: str) -> HttpResponse:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._credential is not None:
            headers["Authorization"] = f"Bearer {self._credential.read()}"
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": self._audiences},
        }
        try:
            return self._client.request(
                self._url,
                what="Kubernetes API server",
                method="POST",
                body=json.dumps(body).encode(),
                headers=headers,
            )
        except BackendUnavailable as error:
            raise BackendUnavailable(error.message, reason=API_SERVER_UNAVAILABLE) from None

    def _identity(
        self, status: Mapping[str, Any], token: str, expires_at: datetime | None
    ) -> KubernetesIdentity:
        if status.get("authenticated") is not True:
            error = status.get("error")
            detail = error if isinstance(error, str) and error else "no reason given"
            # The API server echoes no tokens today; make sure it never reaches our logs.
            detail = detail.replace(token, "<token>")[:300]
            raise AuthenticationFailed(
                f"the Kubernetes API server rejected the token: {detail}",
                reason=_rejection_reason(detail),
            )
        confirmed = status.get("audiences")
        if not isinstance(confirmed, list) or not set(self._audiences).intersection(
            a for a in confirmed if isinstance(a, str)
        ):
            raise AuthenticationFailed(
                f"the Kubernetes API server confirmed audiences {shown(confirmed)}, "
                f"none of {self._audiences}",
                reason="token-wrong-audience",
            )
        user = status.get("user")
        if not isinstance(user, dict):
            raise BackendUnavailable(
                "TokenReview status has no user; is this a Kubernetes API?",
                reason=API_SERVER_UNAVAILABLE,
            )
        namespace, service_account = parse_service_account_username(user.get("username"))
        extra = user.get("extra")
        extra = extra if isinstance(extra, dict) else {}
        uid = user.get("uid")
        return KubernetesIdentity(
            namespace=namespace,
            service_account=service_account,
            expires_at=expires_at,
            pod_name=_first(extra.get(_EXTRA_POD_NAME)),
            pod_uid=_first(extra.get(_EXTRA_POD_UID)),
            node_name=_first(extra.get(_EXTRA_NODE_NAME)),
            service_account_uid=uid if isinstance(uid, str) and uid else None,
        )


def _review_status(response: HttpResponse, url: str) -> Mapping[str, Any]:
    if response.status in (401, 403):
        raise BackendUnavailable(
            f"the Kubernetes API server refused meshca's own credentials for TokenReview "
            f"(HTTP {response.status}); check meshca's token file and that its service "
            f"account may create tokenreviews (ClusterRole system:auth-delegator)",
            reason=API_SERVER_REFUSED_MESHCA,
        )
    if not 200 <= response.status < 300:
        raise BackendUnavailable(
            f"the Kubernetes API server's TokenReview at {url} failed with HTTP {response.status}",
            reason=API_SERVER_UNAVAILABLE,
        )
    try:
        review = json.loads(response.body)
    except (ValueError, RecursionError):
        review = None
    status = review.get("status") if isinstance(review, dict) else None
    if not isinstance(status, dict):
        raise BackendUnavailable(
            f"the Kubernetes API server's TokenReview at {url} answered without a status object",
            reason=API_SERVER_UNAVAILABLE,
        )
    return status


def _rejection_reason(detail: str) -> str:
    # The API server's wording is all we have to tell these apart in the audit log.
    lowered = detail.lower()
    if "expired" in lowered:
        return "token-expired"
    if "audience" in lowered:
        return "token-wrong-audience"
    return "token-rejected"


def _first(values: object) -> str | None:
    """The first entry of a TokenReview ``extra`` value (a list of strings)."""
    if isinstance(values, list) and values and isinstance(values[0], str) and values[0]:
        return values[0]
    return None
