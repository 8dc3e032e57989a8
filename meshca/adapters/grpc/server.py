"""The grpc.aio server: our services, Istio's CA contract, health and reflection on one port.

Optionally a second, plaintext server with nothing but health, for Kubernetes' gRPC
probes, which cannot speak TLS; the policy port's server is in ``policy_port``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from meshca.adapters.grpc import ext_authz, jwt_servicer, linkerd_servicer, policy_servicer
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc
from meshca.adapters.grpc._gen.meshca.v1 import audit_pb2, audit_pb2_grpc, ca_pb2, ca_pb2_grpc
from meshca.adapters.grpc.ca_servicer import CertificateServicer, IstioCertificateServicer
from meshca.adapters.grpc.errors import error_mapped
from meshca.adapters.grpc.gate import CallGate
from meshca.service.access import CallerGuard
from meshca.service.authz import AuthorizationService
from meshca.service.bundle import TrustBundleService
from meshca.service.ca import CertificateService
from meshca.service.jwt_svid import JwtSvidService

__all__ = [
    "AUDIT_SERVICE_NAME",
    "MAX_MESSAGE_BYTES",
    "MAX_METADATA_BYTES",
    "POLICY_HEALTH",
    "POLICY_SERVICE_NAMES",
    "READY_HEALTH",
    "ConnectionLimits",
    "ServerTls",
    "add_audit_port",
    "build_health_server",
    "build_server",
    "enable_reflection",
    "server_options",
]

#: Requests larger than this get RESOURCE_EXHAUSTED from gRPC itself: a CSR is ~1 KiB.
MAX_MESSAGE_BYTES = 64 * 1024
#: Room for a service-account token (a few KiB) and the usual headers.
MAX_METADATA_BYTES = 32 * 1024
#: Calls that may wait for the event loop at once before grpc starts refusing them.
MAX_PENDING_CALLS = 65_536

SERVICE_NAMES = (
    ca_pb2.DESCRIPTOR.services_by_name["CertificateService"].full_name,
    istio_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"].full_name,
)
#: Served with ``authz`` (``meshca serve --policy-dir``): Envoy's ext_authz and ours.
POLICY_SERVICE_NAMES = (ext_authz.SERVICE_NAME, policy_servicer.SERVICE_NAME)
#: Served when the audit API is configured (auditors or an audit token).
AUDIT_SERVICE_NAME = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name
#: Health-checking name that is NOT_SERVING while the newest policy files are invalid
#: (the last good set keeps being served under the two names above).
POLICY_HEALTH = "meshca.policy"
#: Health-checking name that is SERVING only while this replica can sign and write its
#: issuance record right now (readiness); the empty name stays liveness.
READY_HEALTH = "meshca.ready"


#: Several worker processes share one port; the kernel spreads connections.
_SHARED_PORT = (("grpc.so_reuseport", 1),)


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a connection may sit idle or stalled, and how much one may hold open.

    gRPC's own defaults leave every one of these unbounded or near it (no idle limit, a
    120 s handshake, keepalive pings every 2 h, no stream or connection cap), so a flood
    of idle or stalled connections would hold memory for as long as it liked. Each bound
    is chosen to stay out of a real proxy's way; ``bench/floods.py`` measures them.
    """

    #: A connection with no call open for this long gets GOAWAY (NO_ERROR) and is closed.
    #: gRPC clients reconnect on their next call, so a proxy that renews every few hours
    #: pays one handshake per renewal; a call in flight or an open watch is never idle.
    idle_seconds: float = 300.0
    #: From accept to the client's HTTP/2 SETTINGS, TLS included (gRPC's default: 120 s).
    #: A proxy in the cluster needs milliseconds; 10 s is Go's TLS handshake timeout and
    #: leaves room for a starved node, while a silent socket is dropped 12 times sooner.
    handshake_seconds: float = 10.0
    #: While calls are open, ping the client this often; close the connection when a
    #: ping (this one, or gRPC's own flow-control probes) is not answered within
    #: ``ping_timeout_seconds``: a client that stopped reading, or vanished, cannot pin
    #: its calls' memory. gRPC's defaults are 2 h and 60 s. A ping a minute costs an open
    #: watch a few bytes; a live client's gRPC stack answers one in microseconds.
    keepalive_seconds: float = 60.0
    ping_timeout_seconds: float = 20.0
    #: HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS, calls open on one connection (gRPC sets
    #: none). A stalled call holds ~34 KiB (bench/floods.py), so a client that never
    #: reads pins at most ~34 MiB, for at most ``ping_timeout_seconds`` past its first
    #: unanswered ping. A proxy makes one call at a time; gRPC clients queue calls
    #: beyond the limit instead of failing them.
    max_streams_per_connection: int = 1024
    #: Connections each worker accepts at once; beyond it new ones are closed at
    #: accept, before any handshake (``grpc.max_allowed_incoming_connections``). None:
    #: no cap. ``app`` derives it from the open-files limit, so that accept() never
    #: fails with EMFILE.
    max_connections: int | None = None

    def options(self) -> list[tuple[str, int]]:
        """The gRPC channel arguments that enforce these limits on a server."""
        options = [
            ("grpc.max_connection_idle_ms", _ms(self.idle_seconds)),
            ("grpc.server_handshake_timeout_ms", _ms(self.handshake_seconds)),
            ("grpc.keepalive_time_ms", _ms(self.keepalive_seconds)),
            # The second overrides the first for every ping; both are set for clarity.
            ("grpc.keepalive_timeout_ms", _ms(self.ping_timeout_seconds)),
            ("grpc.http2.ping_timeout_ms", _ms(self.ping_timeout_seconds)),
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
        ]
        if self.max_connections is not None:
            options.append(("grpc.max_allowed_incoming_connections", self.max_connections))
        return options


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


@dataclass(frozen=True)
class ServerTls:
    """The server's own key and certificate chain, PEM."""

    private_key_pem: bytes
    chain_pem: bytes


def _certificate_configuration(tls: ServerTls, client_roots_pem: bytes | None = None) -> Any:
    return grpc.ssl_server_certificate_configuration(
        [(tls.private_key_pem, tls.chain_pem)], root_certificates=client_roots_pem
    )


def _fetch(tls_updates: Callable[[], ServerTls | None]) -> Any:
    renewed = tls_updates()
    return None if renewed is None else _certificate_configuration(renewed)


def server_options(limits: ConnectionLimits | None) -> list[tuple[str, int]]:
    """The options of every TLS server of ours: message and metadata caps, shared port."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
        *_SHARED_PORT,
        *(limits or ConnectionLimits()).options(),
        # Calls not yet picked up by the event loop: past these (grpc's defaults are
        # 1,000 and 3,000) grpc answers CANCELLED, which a cold-start storm of proxies
        # or 10,000 watchers reconnecting at once would otherwise meet.
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_CALLS),
    ]


def build_server(
    *,
    ca: CertificateService,
    bundle: TrustBundleService,
    listen: str,
    tls: ServerTls | None,
    tls_updates: Callable[[], ServerTls | None] | None = None,
    authz: AuthorizationService | None = None,
    record_counters: Callable[[], tuple[int, int]] | None = None,
    audit: audit_pb2_grpc.AuditServiceServicer | None = None,
    gate: CallGate | None = None,
    limits: ConnectionLimits | None = None,
    policy_guard: CallerGuard | None = None,
    reflection_on: bool = True,
    linkerd: bool = False,
    jwt: JwtSvidService | None = None,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Build (not start) the server; returns it, the bound port and the health servicer.

    ``tls_updates`` is asked at each new TLS handshake for a renewed certificate (None:
    keep the current one). It must be quick: it runs on gRPC's own threads. With
    ``authz``, Envoy's ext_authz and ``meshca.v1.PolicyService`` are served too
    (``record_counters``: the decision log's failed and dropped counts), their callers
    checked by ``policy_guard`` (required with ``authz``). ``meshca serve`` passes
    ``authz`` here only with ``--policy-insecure-main-port``; otherwise the policy
    services have a port and server of their own (``policy_port``). Every service but
    health comes through ``gate`` (see ``gate.CallGate``). ``reflection_on``: False for
    ``--no-reflection``. With ``linkerd``, Linkerd's identity API is served too (``ca``
    must have a ``LinkerdDoor``); with ``jwt``, ``meshca.v1.JwtSvidService``.
    """
    if authz is not None and policy_guard is None:
        raise ValueError("the policy services need a caller guard")
    server = grpc.aio.server(options=server_options(limits))
    # Every servicer of ours reports errors through the one table in errors.py.
    ca_pb2_grpc.add_CertificateServiceServicer_to_server(
        error_mapped(CertificateServicer(ca, bundle), gate), server
    )
    istio_grpc.add_IstioCertificateServiceServicer_to_server(
        error_mapped(IstioCertificateServicer(ca), gate), server
    )
    if authz is not None and policy_guard is not None:
        ext_authz.add_to_server(authz, policy_guard, server, gate)
        policy_servicer.add_to_server(authz, policy_guard, server, record_counters, gate)
    if audit is not None:
        audit_pb2_grpc.add_AuditServiceServicer_to_server(error_mapped(audit, gate), server)
    if linkerd:
        linkerd_servicer.add_to_server(ca, server, gate)
    if jwt is not None:
        jwt_servicer.add_to_server(jwt, server, gate)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_on:
        enable_reflection(
            (
                *SERVICE_NAMES,
                *(POLICY_SERVICE_NAMES if authz is not None else ()),
                *((AUDIT_SERVICE_NAME,) if audit is not None else ()),
                *((linkerd_servicer.SERVICE_NAME,) if linkerd else ()),
                *((jwt_servicer.SERVICE_NAME,) if jwt is not None else ()),
            ),
            server,
        )
    if tls is None:
        port = server.add_insecure_port(listen)
    else:
        if tls_updates is None:
            credentials = grpc.ssl_server_credentials([(tls.private_key_pem, tls.chain_pem)])
        else:
            credentials = grpc.dynamic_ssl_server_credentials(
                _certificate_configuration(tls), functools.partial(_fetch, tls_updates)
            )
        port = server.add_secure_port(listen, credentials)
    if port == 0:
        raise OSError(f"could not listen on {listen}")
    return server, port, health_servicer


def enable_reflection(services: Sequence[str], server: grpc.aio.Server) -> None:
    """Reflection listing ``services``, health and reflection itself."""
    reflection.enable_server_reflection(
        (
            *services,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )


class _AuditCredentials:
    """The audit port's certificate fetcher: the current serving TLS and client roots.

    gRPC asks at every handshake, on its own threads: the two getters must only read a
    cached value. A new configuration is built only when either one has changed.
    """

    def __init__(
        self, tls: Callable[[], ServerTls], client_roots: Callable[[], Sequence[str]]
    ) -> None:
        self._tls = tls
        self._client_roots = client_roots
        self._served = (tls(), client_roots())

    def initial(self) -> Any:
        return _audit_configuration(*self._served)

    def __call__(self) -> Any:
        current = (self._tls(), self._client_roots())
        # Tuples compare items by identity first: an unchanged pair costs no byte compare.
        if current == self._served:
            return None
        self._served = current
        return _audit_configuration(*current)


def _audit_configuration(tls: ServerTls, client_roots: Sequence[str]) -> Any:
    return _certificate_configuration(tls, "".join(client_roots).encode())


def add_audit_port(
    server: grpc.aio.Server,
    listen: str,
    tls: Callable[[], ServerTls],
    client_roots: Callable[[], Sequence[str]],
) -> int:
    """Listen on ``listen`` too, requiring a client certificate under ``client_roots()``.

    For auditors' SVIDs. gRPC Python can either not ask for a client certificate or
    require one (it cannot ask and accept none), so proxies keep the main port, where
    none is asked for, and auditors with an SVID use this one. Every service is served
    on both; the audit API checks who is calling. ``tls`` and ``client_roots`` (PEM
    roots) are read at each new handshake, so a renewed certificate and a rotated trust
    bundle apply without a restart. Returns the bound port.
    """
    fetcher = _AuditCredentials(tls, client_roots)
    credentials = grpc.dynamic_ssl_server_credentials(
        fetcher.initial(), fetcher, require_client_authentication=True
    )
    port = server.add_secure_port(listen, credentials)
    if port == 0:
        raise OSError(f"could not listen on {listen}")
    return port


def build_health_server(
    health_servicer: health.aio.HealthServicer, listen: str, limits: ConnectionLimits | None = None
) -> tuple[grpc.aio.Server, int]:
    """Build (not start) a plaintext server on ``listen`` with only ``health_servicer``.

    Nothing else is registered, reflection included: this port has no TLS, so it must
    answer nothing but health. Workers share it as they share the main port. Returns the
    server and the bound port.
    """
    # A HealthCheckRequest holds a service name: anything larger is not a probe.
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 4096),
            *_SHARED_PORT,
            *(limits or ConnectionLimits()).options(),
        ]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"could not listen on {listen}")
    return server, port
