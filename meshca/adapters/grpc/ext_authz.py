"""Envoy's ext_authz v3 (``envoy.service.auth.v3.Authorization/Check``) over the policy set.

``CheckRequest`` -> ``AuthzRequest``: the source principal from
``attributes.source.principal``, the destination from ``attributes.destination.principal``,
method, path, host and headers from ``attributes.request.http`` (pseudo-headers fill in
what is missing), addresses and port from the peers' socket addresses, SNI from
``attributes.tls_session``.

``Decision`` -> ``CheckResponse``: an allow is status OK; a deny is a ``CheckResponse``
with status PERMISSION_DENIED and a 403 ``denied_response`` whose body and
``x-meshca-denied-by`` header name the deciding policy (or rule of last resort). Both
carry ``x-meshca-policy-version`` and the decision in ``dynamic_metadata``. RPC errors are
only for meshca's own failures.
"""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from meshca.adapters.grpc.errors import error_mapped
from meshca.adapters.grpc.gate import CallGate
from meshca.adapters.grpc.guard import admit
from meshca.core.policy import AuthzRequest, Decision
from meshca.service.access import CallerGuard
from meshca.service.authz import AuthorizationService

__all__ = [
    "API_NAME",
    "CHECK_METHOD",
    "DENIED_BY_HEADER",
    "SERVICE_NAME",
    "VERSION_HEADER",
    "ExtAuthzServicer",
    "add_to_server",
    "to_authz_request",
    "to_check_response",
]

API_NAME = "envoy.ext_authz.v3"
SERVICE_NAME = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
#: The method's name in the table of callers (``meshca.core.callers``).
CHECK_METHOD = f"{SERVICE_NAME}/Check"
DENIED_BY_HEADER = "x-meshca-denied-by"
VERSION_HEADER = "x-meshca-policy-version"


def _headers(http: Any) -> dict[str, str]:
    headers = {key.lower(): value for key, value in http.headers.items()}
    if not headers and http.HasField("header_map"):
        for entry in http.header_map.headers:
            value = entry.value or entry.raw_value.decode("utf-8", "replace")
            key = entry.key.lower()
            headers[key] = f"{headers[key]},{value}" if key in headers else value
    return headers


def _socket(peer: Any) -> Any:
    address = peer.address
    return address.socket_address if address.HasField("socket_address") else None


def to_authz_request(request: Any) -> AuthzRequest:
    """What the policy set needs from an Envoy ``CheckRequest``."""
    attributes = request.attributes
    http = attributes.request.http
    headers = _headers(http)
    source = _socket(attributes.source)
    destination = _socket(attributes.destination)
    return AuthzRequest(
        source_principal=attributes.source.principal or None,
        destination_principal=attributes.destination.principal or None,
        method=http.method or headers.get(":method", ""),
        path=http.path or headers.get(":path", "") or "/",
        host=http.host or headers.get(":authority", "") or headers.get("host", ""),
        headers=headers,
        source_ip=source.address if source is not None and source.address else None,
        destination_ip=(
            destination.address if destination is not None and destination.address else None
        ),
        destination_port=(
            destination.port_value if destination is not None and destination.port_value else None
        ),
        sni=attributes.tls_session.sni or None,
        request_id=http.id or headers.get("x-request-id") or None,
    )


def _header(key: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value))


def _metadata(decision: Decision) -> Any:
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            "allowed": decision.allowed,
            "reason": decision.reason.value,
            "policy": decision.policy.key if decision.policy is not None else "",
            "rule": decision.rule if decision.rule is not None else -1,
            "version": decision.version,
            "audit": [p.key for p in decision.audit],
        }
    )
    return metadata


def to_check_response(decision: Decision) -> Any:
    """The ``CheckResponse`` Envoy acts on."""
    if decision.allowed:
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(),
            dynamic_metadata=_metadata(decision),
        )
    decided_by = decision.decided_by
    rule = f" rule {decision.rule}" if decision.rule is not None else ""
    body = (
        f"RBAC: access denied by meshca: {decided_by}{rule} "
        f"(policy set {decision.version}): {decision.detail}\n"
    )
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(
            code=code_pb2.PERMISSION_DENIED, message=f"denied by {decided_by}{rule}"
        ),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden),
            headers=[
                _header(DENIED_BY_HEADER, decided_by),
                _header(VERSION_HEADER, decision.version),
                _header("content-type", "text/plain"),
            ],
            body=body,
        ),
        dynamic_metadata=_metadata(decision),
    )


class ExtAuthzServicer(external_auth_pb2_grpc.AuthorizationServicer):
    """Each call's caller is checked by ``guard`` first (its row: ``CHECK_METHOD``)."""

    def __init__(self, authz: AuthorizationService, guard: CallerGuard) -> None:
        self._authz = authz
        self._guard = guard

    async def Check(self, request: Any, context: Any) -> Any:
        await admit(self._guard, CHECK_METHOD, context)
        decision = self._authz.check(to_authz_request(request), api=API_NAME)
        return to_check_response(decision)


def add_to_server(
    authz: AuthorizationService, guard: CallerGuard, server: Any, gate: CallGate | None = None
) -> None:
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        error_mapped(ExtAuthzServicer(authz, guard), gate), server
    )
