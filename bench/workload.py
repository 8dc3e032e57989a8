"""The one CSR both systems sign, and the request bodies that carry it."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "NAMESPACE",
    "SERVICE_ACCOUNT",
    "SPIFFE_ID",
    "TRUST_DOMAIN",
    "TTL_SECONDS",
    "grpc_frame",
    "leaf_uri_sans",
    "make_csr",
]

TRUST_DOMAIN = "cluster.local"
NAMESPACE = "bench"
SERVICE_ACCOUNT = "bench"
SPIFFE_ID = f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{SERVICE_ACCOUNT}"
TTL_SECONDS = 3600


def make_csr() -> str:
    """A fresh EC P-256 key and a PEM CSR with an empty subject and SPIFFE_ID as URI SAN."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SPIFFE_ID)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: flag 0 (uncompressed), 4-byte big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def leaf_uri_sans(cert_pem: str) -> list[str]:
    """The URI SANs of a PEM certificate (used to check one answer of each system)."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return sans.get_values_for_type(x509.UniformResourceIdentifier)
