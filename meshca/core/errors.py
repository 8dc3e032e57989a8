"""The one exception hierarchy of meshca.

Names say what went wrong; adapters decide how to report it (gRPC status codes live only
in ``meshca.adapters.grpc.errors``). Messages quote the offending input where that helps,
and never carry tokens or key material.

    MeshcaError
    ├── InvalidRequest                 the caller sent something malformed
    │   ├── MalformedCsr
    │   ├── WeakKey
    │   ├── InvalidSpiffeId
    │   ├── AmbiguousPath              an HTTP path that cannot be matched safely
    │   └── InvalidPolicy              policy files that cannot be loaded (``problems``)
    ├── RequestTooLarge                an input over its size limit
    ├── LimitExceeded                  a caller or an API is over one of its limits
    │   ├── RateLimited                a pod (or token) asked for too many certificates
    │   └── TooManyCalls               too many calls of one API are in progress
    ├── AuthenticationFailed           the token is missing, bad, expired, for someone else
    ├── NotAuthorized                  authenticated, but asks for more than it may have
    │   └── Revoked                    the identity or key is on the deny-list
    ├── Unavailable                    a backend we depend on cannot answer now
    │   ├── AuthorityNotReady
    │   ├── BackendUnavailable
    │   └── JournalConflict            another process changed the CA journal first
    ├── UnsafeChange                   an operator's CA change would break trust now
    └── InternalError                  a bug or broken invariant on our side
        └── IssuedCertificateInvalid
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

__all__ = [
    "AmbiguousPath",
    "AuthenticationFailed",
    "AuthorityNotReady",
    "BackendUnavailable",
    "InternalError",
    "InvalidPolicy",
    "InvalidRequest",
    "InvalidSpiffeId",
    "IssuedCertificateInvalid",
    "JournalConflict",
    "LimitExceeded",
    "MalformedCsr",
    "MeshcaError",
    "NotAuthorized",
    "RateLimited",
    "RequestTooLarge",
    "Revoked",
    "TooManyCalls",
    "Unavailable",
    "UnsafeChange",
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


class AmbiguousPath(InvalidRequest):
    reason = "ambiguous-path"


class InvalidPolicy(InvalidRequest):
    """One or more policy documents cannot be loaded; ``problems`` says where and why.

    Each problem is a value with ``file``, ``document``, ``line``, ``field`` and
    ``message`` (``meshca.core.policy.PolicyProblem``).
    """

    reason = "invalid-policy"

    def __init__(self, problems: Sequence[object]) -> None:
        self.problems = tuple(problems)
        first = "; ".join(str(p) for p in self.problems[:3])
        more = len(self.problems) - 3
        super().__init__(first + (f" (and {more} more)" if more > 0 else ""))


class RequestTooLarge(MeshcaError):
    reason = "request-too-large"


class LimitExceeded(MeshcaError):
    """The request is well-formed and allowed, but over a limit now; it may work later."""

    reason = "limit-exceeded"


class RateLimited(LimitExceeded):
    """Over ``--issuance-rate``; ``retry_after`` says when one more would be admitted."""

    reason = "rate-limited"

    def __init__(self, message: str, *, retry_after: timedelta) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyCalls(LimitExceeded):
    reason = "too-many-calls"


class AuthenticationFailed(MeshcaError):
    reason = "unauthenticated"


class NotAuthorized(MeshcaError):
    reason = "not-authorized"


class Revoked(NotAuthorized):
    """Issuance refused by a deny-list entry; the message names the entry's id only."""

    reason = "revoked"


class Unavailable(MeshcaError):
    reason = "unavailable"


class AuthorityNotReady(Unavailable):
    reason = "authority-not-ready"


class BackendUnavailable(Unavailable):
    reason = "backend-unavailable"


class JournalConflict(Unavailable):
    reason = "journal-conflict"


class UnsafeChange(MeshcaError):
    """Refused: the requested CA change would make certificates fail to verify."""

    reason = "unsafe-change"


class InternalError(MeshcaError):
    reason = "internal"


class IssuedCertificateInvalid(InternalError):
    reason = "issued-certificate-invalid"
