"""The one exception hierarchy of meshca.

Names say what went wrong; adapters decide how to report it (gRPC status codes live only
in ``meshca.adapters.grpc.errors``). Messages quote the offending input where that helps,
and never carry tokens or key material.

    MeshcaError
    ├── InvalidRequest                 the caller sent something malformed
    │   ├── MalformedCsr
    │   ├── WeakKey
    │   └── InvalidSpiffeId
    ├── RequestTooLarge                an input over its size limit
    ├── AuthenticationFailed           the token is missing, bad, expired, for someone else
    ├── NotAuthorized                  authenticated, but asks for more than it may have
    ├── Unavailable                    a backend we depend on cannot answer now
    │   ├── AuthorityNotReady
    │   └── BackendUnavailable
    └── InternalError                  a bug or broken invariant on our side
        └── IssuedCertificateInvalid
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "AuthorityNotReady",
    "BackendUnavailable",
    "InternalError",
    "InvalidRequest",
    "InvalidSpiffeId",
    "IssuedCertificateInvalid",
    "MalformedCsr",
    "MeshcaError",
    "NotAuthorized",
    "RequestTooLarge",
    "Unavailable",
    "WeakKey",
]


class MeshcaError(Exception):
    """Base of every error meshca raises on purpose."""

    #: Short machine-readable reason recorded in the issuance log.
    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class InvalidRequest(MeshcaError):
    reason = "invalid-request"


class MalformedCsr(InvalidRequest):
    reason = "malformed-csr"


class WeakKey(InvalidRequest):
    reason = "weak-key"


class InvalidSpiffeId(InvalidRequest):
    reason = "invalid-spiffe-id"


class RequestTooLarge(MeshcaError):
    reason = "request-too-large"


class AuthenticationFailed(MeshcaError):
    reason = "unauthenticated"


class NotAuthorized(MeshcaError):
    reason = "not-authorized"


class Unavailable(MeshcaError):
    reason = "unavailable"


class AuthorityNotReady(Unavailable):
    reason = "authority-not-ready"


class BackendUnavailable(Unavailable):
    reason = "backend-unavailable"


class InternalError(MeshcaError):
    reason = "internal"


class IssuedCertificateInvalid(InternalError):
    reason = "issued-certificate-invalid"
