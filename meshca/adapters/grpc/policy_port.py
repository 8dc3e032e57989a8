"""The policy port (``--policy-listen``): Envoy's ext_authz and PolicyService under mTLS.

grpc.aio serves every registered service on every port of a server, so the policy
services get a server of their own: on the main port, proxies present no client
certificate and must not reach the policy set. This one requires a client certificate
under the current trust bundle, read at each handshake like the audit port's, so a
rotated root and a renewed serving certificate apply without a restart. Workers share
the port as they share the main one. Health is served here too (Envoy can check its
authorization server on the port it uses); reflection unless switched off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from meshca.adapters.grpc import ext_authz, policy_servicer
from meshca.adapters.grpc.gate import CallGate
from meshca.adapters.grpc.server import (
    POLICY_SERVICE_NAMES,
    ConnectionLimits,
    ServerTls,
    add_audit_port,
    enable_reflection,
    server_options,
)
from meshca.service.access import CallerGuard
from meshca.service.authz import AuthorizationService

__all__ = ["build_policy_server"]


def build_policy_server(
    *,
    authz: AuthorizationService,
    guard: CallerGuard,
    listen: str,
    tls: Callable[[], ServerTls],
    client_roots: Callable[[], Sequence[str]],
    health_servicer: health.aio.HealthServicer,
    record_counters: Callable[[], tuple[int, int]] | None = None,
    gate: CallGate | None = None,
    limits: ConnectionLimits | None = None,
    reflection_on: bool = True,
) -> tuple[grpc.aio.Server, int]:
    """Build (not start) the policy port's server; returns it and the bound port.

    ``tls`` and ``client_roots`` (PEM roots) are read at each new handshake; both must
    only read a cached value (they run on gRPC's threads). ``guard`` checks every
    caller (``--policy-caller`` for ext_authz, admins for PolicyService).
    """
    server = grpc.aio.server(options=server_options(limits))
    ext_authz.add_to_server(authz, guard, server, gate)
    policy_servicer.add_to_server(authz, guard, server, record_counters, gate)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_on:
        enable_reflection(POLICY_SERVICE_NAMES, server)
    # The audit port's mechanism: mTLS required, credentials fetched per handshake.
    port = add_audit_port(server, listen, tls, client_roots)
    return server, port
