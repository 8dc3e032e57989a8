"""Who may call what: the one table of meshca's APIs, their credentials and their callers.

Each row names gRPC methods (``package.Service/Method``, or an HTTP endpoint), the
credential a caller presents and who is allowed. The gRPC adapters look a method's row
up (``row_for``) to choose the check they run, ``docs/design.md`` carries the same table
(a test compares the two both ways), and a test checks that every method meshca serves
has a row. ``SpiffePatterns`` are the ``--policy-caller`` patterns, written like
principals in a ``meshca.io/v1`` policy.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from meshca.core.errors import InvalidSpiffeId
from meshca.core.policy.match import StringMatcher
from meshca.core.spiffe import SpiffeId

__all__ = [
    "CALLERS",
    "Access",
    "CallerRow",
    "SpiffePatterns",
    "row_for",
]


class Access(enum.StrEnum):
    """Which check a row's methods run on every call."""

    #: Nothing: public data or probes.
    PUBLIC = "public"
    #: A Kubernetes service-account token, attested; the workload gets only its own ID.
    WORKLOAD_TOKEN = "workload-token"  # noqa: S105 (a name, not a secret)
    #: A verified client SVID on the policy port matching a ``--policy-caller`` pattern.
    POLICY_CALLER = "policy-caller"
    #: A ``--policy-admin`` client SVID, or the ``--policy-token-file`` bearer token.
    POLICY_ADMIN = "policy-admin"
    #: ``meshca agent``'s Unix socket: whoever its file mode lets open it (the pod).
    LOCAL_SOCKET = "local-socket"
    #: An ``--auditor`` client SVID, or the ``--audit-token-file`` bearer token.
    AUDITOR = "auditor"


@dataclass(frozen=True, slots=True)
class CallerRow:
    """One row: these methods take ``credential`` and serve ``allowed``."""

    api: str
    methods: tuple[str, ...]
    access: Access
    credential: str
    allowed: str


_CA = "meshca.v1.CertificateService"
_ISTIO = "istio.v1.auth.IstioCertificateService"
_POLICY = "meshca.v1.PolicyService"
_AUDIT = "meshca.v1.AuditService"

#: The table. Order is the order of ``docs/design.md``.
CALLERS: tuple[CallerRow, ...] = (
    CallerRow(
        api="CA Sign / CreateCertificate",
        methods=(f"{_CA}/Sign", f"{_ISTIO}/CreateCertificate"),
        access=Access.WORKLOAD_TOKEN,
        credential="service-account token (bearer)",
        allowed="any attested workload, for its own SPIFFE ID",
    ),
    CallerRow(
        api="Linkerd Certify",
        methods=("io.linkerd.proxy.identity.Identity/Certify",),
        access=Access.WORKLOAD_TOKEN,
        credential="service-account token (in the request, audience --linkerd-audience)",
        allowed="any attested workload, for its own Linkerd name; only with --linkerd-certify",
    ),
    CallerRow(
        api="JWT-SVID",
        methods=("meshca.v1.JwtSvidService/SignJwtSvid",),
        access=Access.WORKLOAD_TOKEN,
        credential="service-account token (bearer)",
        allowed="any attested workload, for its own SPIFFE ID and the audiences it asks",
    ),
    CallerRow(
        api="trust bundle",
        methods=(
            f"{_CA}/GetTrustBundle",
            f"{_CA}/WatchTrustBundle",
            "GET / (--bundle-endpoint)",
            "GET /crl/<sha256>.der (--bundle-endpoint)",
            "GET /.well-known/openid-configuration and /keys (--oidc-discovery)",
        ),
        access=Access.PUBLIC,
        credential="none",
        allowed="anyone (public data)",
    ),
    CallerRow(
        api="Envoy ext_authz",
        methods=("envoy.service.auth.v3.Authorization/Check",),
        access=Access.POLICY_CALLER,
        credential="client SVID (mTLS) on --policy-listen",
        allowed="--policy-caller SPIFFE ID patterns (default: any SVID of the trust domain); "
        "anyone on the main port with --policy-insecure-main-port",
    ),
    CallerRow(
        api="PolicyService",
        methods=(f"{_POLICY}/Check", f"{_POLICY}/Explain", f"{_POLICY}/Status"),
        access=Access.POLICY_ADMIN,
        credential="client SVID (mTLS) or bearer token",
        allowed="--policy-admin SPIFFE IDs, or holders of --policy-token-file",
    ),
    CallerRow(
        api="AuditService",
        methods=tuple(
            f"{_AUDIT}/{m}"
            for m in (
                "ListIssuances",
                "ListRefusals",
                "GetIssuance",
                "Export",
                "GetSignedTreeHead",
                "GetInclusionProof",
                "GetConsistencyProof",
                "GetLogInfo",
            )
        ),
        access=Access.AUDITOR,
        credential="client SVID (mTLS, --audit-listen) or bearer token",
        allowed="--auditor SPIFFE IDs, or holders of --audit-token-file",
    ),
    CallerRow(
        api="agent Workload API",
        methods=tuple(
            f"SpiffeWorkloadAPI/{m}"
            for m in (
                "FetchX509SVID",
                "FetchX509Bundles",
                "FetchJWTSVID",
                "FetchJWTBundles",
                "ValidateJWTSVID",
                "FetchWITSVID",
                "FetchWITBundles",
            )
        ),
        access=Access.LOCAL_SOCKET,
        credential="none: `meshca agent`'s Unix socket (--socket-mode, 0600) and the "
        "`workload.spiffe.io: true` header",
        allowed="processes that can open the socket: the workload's own pod; each gets "
        "the pod's identity",
    ),
    CallerRow(
        api="agent SDS",
        methods=tuple(
            f"envoy.service.secret.v3.SecretDiscoveryService/{m}"
            for m in ("StreamSecrets", "FetchSecrets", "DeltaSecrets")
        ),
        access=Access.LOCAL_SOCKET,
        credential="none: `meshca agent`'s Unix socket (--socket-mode, 0600)",
        allowed="processes that can open the socket: the pod's Envoy",
    ),
    CallerRow(
        api="health",
        methods=(
            "grpc.health.v1.Health/Check",
            "grpc.health.v1.Health/Watch",
            "grpc.health.v1.Health/List",
        ),
        access=Access.PUBLIC,
        credential="none",
        allowed="anyone (also plaintext on --health-listen)",
    ),
    CallerRow(
        api="reflection",
        methods=("grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",),
        access=Access.PUBLIC,
        credential="none",
        allowed="anyone; off with --no-reflection",
    ),
)

_BY_METHOD = {method: row for row in CALLERS for method in row.methods}


def row_for(method: str) -> CallerRow:
    """The row of ``method`` (``package.Service/Method``); KeyError if it has none.

    A method without a row is a bug on our side (a test checks that every served method
    has one), never a reason to let a call through.
    """
    return _BY_METHOD[method]


def _check_pattern(text: str) -> str:
    if not text:
        raise InvalidSpiffeId("a SPIFFE ID pattern cannot be empty")
    stars = text.count("*")
    if text == "*":
        return text
    if stars > 1 or (stars == 1 and not (text.startswith("*") or text.endswith("*"))):
        raise InvalidSpiffeId(
            f"{text[:200]!r}: '*' may only stand alone, or once at the start or the end"
        )
    if text.startswith("*"):
        return text
    if not text.startswith("spiffe://"):
        raise InvalidSpiffeId(
            f"{text[:200]!r} is not a SPIFFE ID pattern: write 'spiffe://...', a prefix "
            "ending in '*', a suffix starting with '*', or '*'"
        )
    if not text.endswith("*"):
        SpiffeId.parse(text)
    return text


@dataclass(frozen=True, slots=True)
class SpiffePatterns:
    """SPIFFE ID patterns as a ``meshca.io/v1`` policy writes principals.

    An exact ID, a prefix ending in ``*`` (``spiffe://example.org/ns/shop/*``), a suffix
    starting with ``*`` (``*/sa/envoy``) or ``*`` alone (any ID). ``parse`` either returns
    valid patterns or raises ``InvalidSpiffeId``.
    """

    written: tuple[str, ...]
    _matcher: StringMatcher

    @classmethod
    def parse(cls, patterns: Iterable[str]) -> SpiffePatterns:
        written = tuple(patterns)
        return cls(written, StringMatcher.of(tuple(_check_pattern(p) for p in written)))

    def test(self, spiffe_id: str | None) -> bool:
        """Whether ``spiffe_id`` matches one of the patterns (None never does)."""
        return spiffe_id is not None and self._matcher.test(spiffe_id)
