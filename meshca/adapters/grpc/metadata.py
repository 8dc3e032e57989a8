"""Reading what callers put in gRPC metadata."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from meshca.core.errors import AuthenticationFailed

__all__ = [
    "PeerCertificate",
    "bearer_token",
    "bearer_token_or_problem",
    "peer_address",
    "peer_certificate",
    "peer_spiffe_id",
]


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """What the deny-list may name in a verified client certificate."""

    spiffe_id: str | None
    #: As the issuance log writes serials: lowercase hex, no leading zeros.
    serial: str
    #: SHA-256 of the DER SubjectPublicKeyInfo, as ``meshca revoke --key-sha256`` takes it.
    key_sha256: str


def bearer_token(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The token from ``authorization: Bearer <token>``; None when there is no header.

    A header with another scheme or with several values is an authentication failure,
    so a caller never learns which of its values was used.
    """
    values = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise AuthenticationFailed("more than one authorization header", reason="token-malformed")
    value = values[0]
    if isinstance(value, bytes):
        raise AuthenticationFailed("authorization header is binary", reason="token-malformed")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed(
            "authorization header must be 'Bearer <token>'", reason="token-malformed"
        )
    return token.strip()


def bearer_token_or_problem(
    context: grpc.aio.ServicerContext[Any, Any],
) -> tuple[str | None, AuthenticationFailed | None]:
    """``bearer_token``'s answer, or its refusal as a value, for a caller that records it."""
    try:
        return bearer_token(context), None
    except AuthenticationFailed as problem:
        return None, problem


def peer_address(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    peer = context.peer()
    return str(peer) if peer else None


def peer_spiffe_id(context: Any) -> str | None:
    """The SPIFFE ID of the client certificate gRPC verified, if the caller sent one.

    Only the mTLS ports (audit, policy) ask for client certificates, verified against
    the trust bundle at the handshake; the certificate must carry exactly one
    ``spiffe://`` URI SAN.
    """
    certificate = peer_certificate(context)
    return None if certificate is None else certificate.spiffe_id


def peer_certificate(context: Any) -> PeerCertificate | None:
    """The verified client certificate's SPIFFE ID, serial and key hash; None without one."""
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        return None
    return _facts_of(pems[0])


# A connection's certificate is the same on every call: parse it once (ext_authz is a
# hot path, and parsing costs more than a decision). Bounded; keyed by the PEM bytes.
@functools.lru_cache(maxsize=4096)
def _facts_of(pem: bytes) -> PeerCertificate:
    cert = x509.load_pem_x509_certificate(pem)
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return PeerCertificate(
        spiffe_id=_spiffe_id_of(cert),
        serial=f"{cert.serial_number:x}",
        key_sha256=hashlib.sha256(spki).hexdigest(),
    )


def _spiffe_id_of(cert: x509.Certificate) -> str | None:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier)]
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    return spiffe[0] if len(spiffe) == 1 else None
