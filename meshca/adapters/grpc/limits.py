"""Per-API caps: how many calls of each API one worker runs at once, and how large a
request each API takes.

Every call already meets the server-wide limits (``server.MAX_MESSAGE_BYTES``, grpc's
pending-call queue, ``ConnectionLimits``). These are per API, so that one API flooded
cannot take the memory and the event loop the others need: a storm of signing calls
leaves trust-bundle reads and ext_authz checks room, and a few auditors' exports cannot
hold the loop. A call over a cap is refused at once with RESOURCE_EXHAUSTED (``errors``
maps ``TooManyCalls`` and ``RequestTooLarge``); for the CA APIs the refusal is recorded
in the issuance record like any other (``record_ca_refusals``).

The caps apply per worker process (each has its own event loop and memory), so the host
admits ``--workers`` times each figure. Counting costs an attribute look-up, a
``ByteSize()`` (0.2 µs for a CSR request) and two integer updates per call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2_grpc

from meshca.adapters.grpc._gen.io.linkerd.proxy.identity import identity_pb2_grpc
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc
from meshca.adapters.grpc._gen.meshca.v1 import (
    audit_pb2_grpc,
    ca_pb2_grpc,
    jwt_pb2_grpc,
    policy_pb2_grpc,
)
from meshca.adapters.grpc.ca_servicer import API_ISTIO, API_MESHCA
from meshca.adapters.grpc.jwt_servicer import API_JWT_SVID
from meshca.adapters.grpc.linkerd_servicer import API_LINKERD
from meshca.adapters.grpc.metadata import peer_address
from meshca.core.errors import LimitExceeded, MeshcaError, RequestTooLarge, TooManyCalls
from meshca.service.ca import CertificateService
from meshca.service.jwt_svid import JwtSvidService

__all__ = [
    "DEFAULT_API_CAPS",
    "ApiCap",
    "ApiCaps",
    "CallLimits",
    "MethodCap",
    "api_of",
    "record_ca_refusals",
]

#: A refusal's recorder: (API key, method name, the call's context, the refusal).
RefusalHook = Callable[[str, str, Any, MeshcaError], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ApiCap:
    """Calls of one API running at once in one worker, and the largest request it takes."""

    max_in_flight: int
    max_request_bytes: int

    def __post_init__(self) -> None:
        if self.max_in_flight < 1 or self.max_request_bytes < 1:
            raise ValueError("caps must be at least 1")


@dataclass(frozen=True, slots=True)
class ApiCaps:
    """One ``ApiCap`` per API. The defaults are meant never to bite a real fleet."""

    #: CA Sign and CreateCertificate, together. One worker signs ~1,000 certificates/s
    #: (docs/benchmarks.md), so the 16,384th call admitted waits ~16 s, past any
    #: proxy's deadline worth keeping; a 10,000-proxy cold-start storm (bench/storm.py)
    #: stays under it even on one worker. 16 KiB is ten times an RSA-4096 CSR in PEM
    #: with Istio's metadata; a P-256 one is ~0.5 KiB.
    ca: ApiCap = ApiCap(16_384, 16 * 1024)
    #: Linkerd's Certify: as the CA's, but the token rides in the request (up to
    #: MAX_TOKEN_BYTES, 16 KiB) beside a DER CSR.
    linkerd: ApiCap = ApiCap(16_384, 32 * 1024)
    #: SignJwtSvid: signing is as cheap as a certificate's. At most 16 audiences of 255
    #: bytes and a 2 KiB SPIFFE ID make ~6 KiB; 16 KiB leaves room and stops the rest.
    jwt_svid: ApiCap = ApiCap(16_384, 16 * 1024)
    #: GetTrustBundle: a cached message, answered in microseconds; its request is empty.
    bundle: ApiCap = ApiCap(16_384, 1024)
    #: WatchTrustBundle streams: one per meshca client; tested at 10,000 in one burst
    #: (tests/integration/test_stream_scale.py), and a fleet spreads over replicas and
    #: workers. The open-files cap on connections usually binds first.
    bundle_watch: ApiCap = ApiCap(32_768, 1024)
    #: Envoy's ext_authz Check: ~25 µs each, so thousands in flight means a stalled
    #: loop. Envoy forwards request headers up to its own 60 KiB default (and a body
    #: if configured): no tighter than the server-wide 64 KiB.
    ext_authz: ApiCap = ApiCap(8_192, 64 * 1024)
    #: PolicyService (Check, Explain, Status): operators' tools, not the data path;
    #: an Explain over 10,000 policies takes milliseconds. Requests as ext_authz's.
    policy: ApiCap = ApiCap(256, 64 * 1024)
    #: AuditService: auditors' queries and exports. Few auditors call at once, but an
    #: export to a slow reader stays open: one worker holds 10,000 of those without a
    #: thread each (tests/integration/test_stream_scale.py), and the cap keeps that
    #: room. A filter is a SPIFFE ID (<= 2 KiB) and a page token: 8 KiB.
    audit: ApiCap = ApiCap(16_384, 8 * 1024)


DEFAULT_API_CAPS = ApiCaps()


def api_of(servicer: object, method: str) -> str | None:
    """Which ``ApiCaps`` field governs ``servicer``'s ``method`` (None: no cap)."""
    if isinstance(servicer, ca_pb2_grpc.CertificateServiceServicer):
        return {"GetTrustBundle": "bundle", "WatchTrustBundle": "bundle_watch"}.get(method, "ca")
    if isinstance(servicer, istio_grpc.IstioCertificateServiceServicer):
        return "ca"
    if isinstance(servicer, identity_pb2_grpc.IdentityServicer):
        return "linkerd"
    if isinstance(servicer, jwt_pb2_grpc.JwtSvidServiceServicer):
        return "jwt_svid"
    if isinstance(servicer, external_auth_pb2_grpc.AuthorizationServicer):
        return "ext_authz"
    if isinstance(servicer, policy_pb2_grpc.PolicyServiceServicer):
        return "policy"
    if isinstance(servicer, audit_pb2_grpc.AuditServiceServicer):
        return "audit"
    return None


@dataclass(eq=False, slots=True)
class _Count:
    in_flight: int = 0


class MethodCap:
    """One method's view of its API's cap; the API's methods share one count."""

    __slots__ = ("_api", "_cap", "_count", "_method", "_on_refusal")

    def __init__(
        self, api: str, method: str, cap: ApiCap, count: _Count, on_refusal: RefusalHook | None
    ) -> None:
        self._api = api
        self._method = method
        self._cap = cap
        self._count = count
        self._on_refusal = on_refusal

    @property
    def in_flight(self) -> int:
        return self._count.in_flight

    def enter(self, request: Any) -> LimitExceeded | RequestTooLarge | None:
        """Count the call in, or return why not (then it is not counted)."""
        count = self._count
        if count.in_flight >= self._cap.max_in_flight:
            return TooManyCalls(
                f"{self._api.replace('_', '-')} is at its cap of {self._cap.max_in_flight} "
                "calls in progress on this server process; retry with backoff"
            )
        size = request.ByteSize()
        if size > self._cap.max_request_bytes:
            return RequestTooLarge(
                f"{self._method} request is {size} bytes; the limit is "
                f"{self._cap.max_request_bytes}"
            )
        count.in_flight += 1
        return None

    def leave(self) -> None:
        self._count.in_flight -= 1

    async def refused(self, context: Any, error: MeshcaError) -> None:
        """Tell the API's recorder of ``error``, if it has one."""
        if self._on_refusal is not None:
            await self._on_refusal(self._api, self._method, context, error)


@dataclass
class CallLimits:
    """The caps of one worker, with their live counts. ``on_refusal`` is told of every
    refusal (the CA APIs record theirs)."""

    caps: ApiCaps = DEFAULT_API_CAPS
    on_refusal: RefusalHook | None = None
    _counts: dict[str, _Count] = field(default_factory=dict, init=False, repr=False)

    def cap_for(self, servicer: object, method: str) -> MethodCap | None:
        api = api_of(servicer, method)
        if api is None:
            return None
        count = self._counts.setdefault(api, _Count())
        return MethodCap(api, method, getattr(self.caps, api), count, self.on_refusal)

    def in_flight(self, api: str) -> int:
        count = self._counts.get(api)
        return 0 if count is None else count.in_flight


def record_ca_refusals(ca: CertificateService, jwt: JwtSvidService | None = None) -> RefusalHook:
    """A recorder that writes the CA APIs' refusals (and, with ``jwt``, SignJwtSvid's) to
    the issuance record."""
    apis = {"Sign": API_MESHCA, "CreateCertificate": API_ISTIO, "Certify": API_LINKERD}

    async def record(api: str, method: str, context: Any, error: MeshcaError) -> None:
        if api in ("ca", "linkerd") and method in apis:
            await ca.record_refusal(apis[method], peer_address(context), error)
        elif api == "jwt_svid" and jwt is not None:
            await jwt.record_refusal(API_JWT_SVID, peer_address(context), error)

    return record
