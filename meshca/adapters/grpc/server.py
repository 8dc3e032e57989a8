"""The grpc.aio server: our services, Istio's CA contract, health and reflection on one port."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc
from meshca.adapters.grpc._gen.meshca.v1 import ca_pb2, ca_pb2_grpc
from meshca.adapters.grpc.ca_servicer import CertificateServicer, IstioCertificateServicer
from meshca.adapters.grpc.errors import ErrorMappingInterceptor
from meshca.service.bundle import TrustBundleService
from meshca.service.ca import CertificateService

__all__ = ["MAX_MESSAGE_BYTES", "MAX_METADATA_BYTES", "ServerTls", "build_server"]

#: Requests larger than this get RESOURCE_EXHAUSTED from gRPC itself: a CSR is ~1 KiB.
MAX_MESSAGE_BYTES = 64 * 1024
#: Room for a service-account token (a few KiB) and the usual headers.
MAX_METADATA_BYTES = 32 * 1024

SERVICE_NAMES = (
    ca_pb2.DESCRIPTOR.services_by_name["CertificateService"].full_name,
    istio_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"].full_name,
)


@dataclass(frozen=True)
class ServerTls:
    """The server's own key and certificate chain, PEM."""

    private_key_pem: bytes
    chain_pem: bytes


def build_server(
    *,
    ca: CertificateService,
    bundle: TrustBundleService,
    listen: str,
    tls: ServerTls | None,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Build (not start) the server; returns it, the bound port and the health servicer."""
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_metadata_size", MAX_METADATA_BYTES),
            # Several worker processes share one port; the kernel spreads connections.
            ("grpc.so_reuseport", 1),
        ],
    )
    ca_pb2_grpc.add_CertificateServiceServicer_to_server(CertificateServicer(ca, bundle), server)
    istio_grpc.add_IstioCertificateServiceServicer_to_server(IstioCertificateServicer(ca), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    if tls is None:
        port = server.add_insecure_port(listen)
    else:
        credentials = grpc.ssl_server_credentials([(tls.private_key_pem, tls.chain_pem)])
        port = server.add_secure_port(listen, credentials)
    if port == 0:
        raise OSError(f"could not listen on {listen}")
    return server, port, health_servicer
