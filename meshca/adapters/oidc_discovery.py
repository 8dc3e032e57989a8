"""OIDC discovery for outside JWT-SVID verifiers: ``/.well-known/openid-configuration``
and the JWKS it points at (``/keys``).

Cloud providers and other OIDC relying parties verify a JWT-SVID by its ``iss``: they
fetch ``<iss>/.well-known/openid-configuration``, then its ``jwks_uri``. So the issuer
(``--jwt-issuer``) must be the public HTTPS URL at which this endpoint is reached; the
endpoint itself speaks plain HTTP, for the ingress or load balancer that terminates TLS
for that URL. The JWKS holds only the JWT-SVID keys (no ``spiffe_*`` members, no X.509
roots), with ``use: sig`` as OIDC verifiers expect.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from meshca.adapters.bundle_endpoint import BundleEndpoint
from meshca.core.jwt_svid import algorithm_for
from meshca.service.bundle import BundleSnapshot

__all__ = ["DISCOVERY_PATH", "JWKS_PATH", "discovery_document", "oidc_endpoint", "oidc_jwks"]

DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/keys"


def discovery_document(issuer: str) -> dict[str, Any]:
    """The provider metadata: the issuer, where its keys are, and what it signs."""
    return {
        "issuer": issuer,
        "jwks_uri": issuer.rstrip("/") + JWKS_PATH,
        "authorization_endpoint": "",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256", "ES384"],
    }


def oidc_jwks(snapshot: BundleSnapshot) -> dict[str, Any]:
    """The JWT-SVID keys as a plain JWKS, each with its ``alg``."""
    keys = []
    for key in snapshot.jwt_keys:
        jwk = key.jwk()
        jwk["use"] = "sig"
        jwk["alg"] = algorithm_for(key.public_key)
        keys.append(jwk)
    return {"keys": keys}


def oidc_endpoint(current: Callable[[], BundleSnapshot], issuer: str) -> BundleEndpoint:
    """An HTTP endpoint serving the discovery document and the JWKS (start it to listen)."""
    document = json.dumps(discovery_document(issuer)).encode()
    return BundleEndpoint(
        current,
        refresh_hint=0,
        tls=None,
        paths={
            DISCOVERY_PATH: lambda: document,
            JWKS_PATH: lambda: json.dumps(oidc_jwks(current())).encode(),
        },
    )
