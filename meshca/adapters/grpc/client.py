"""A minimal client of meshca's CA APIs, for the CLI and for tests acting as a proxy."""

from __future__ import annotations

import grpc

from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc
from meshca.adapters.grpc._gen.meshca.v1 import ca_pb2, ca_pb2_grpc

__all__ = ["channel_to", "create_certificate", "sign"]


def channel_to(
    target: str, roots_pem: bytes | None, server_name: str | None = "localhost"
) -> grpc.Channel:
    """A channel verified against ``roots_pem``; plaintext when roots are None."""
    if roots_pem is None:
        return grpc.insecure_channel(target)
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(roots_pem), options)


def create_certificate(
    channel: grpc.Channel, token: str, csr_pem: str, ttl_seconds: int = 0, timeout: float = 10
) -> list[str]:
    """Istio's CreateCertificate: the PEM chain, leaf first and root last."""
    stub = istio_grpc.IstioCertificateServiceStub(channel)
    response = stub.CreateCertificate(
        istio_pb2.IstioCertificateRequest(csr=csr_pem, validity_duration=ttl_seconds),
        metadata=[("authorization", f"Bearer {token}")],
        timeout=timeout,
    )
    return list(response.cert_chain)


def sign(
    channel: grpc.Channel, token: str, csr: bytes, ttl_seconds: int = 0, timeout: float = 10
) -> ca_pb2.SignResponse:
    """meshca.v1.CertificateService/Sign."""
    stub = ca_pb2_grpc.CertificateServiceStub(channel)
    return stub.Sign(
        ca_pb2.SignRequest(csr=csr, ttl_seconds=ttl_seconds),
        metadata=[("authorization", f"Bearer {token}")],
        timeout=timeout,
    )
