"""The agent's side of meshca's own API: ``Sign`` with the pod's token, and
``WatchTrustBundle``; gRPC failures become core errors here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.adapters.grpc._gen.meshca.v1 import ca_pb2, ca_pb2_grpc, jwt_pb2, jwt_pb2_grpc
from meshca.core.agent import MAX_TAINTED, AgentSvid, TrustBundleView
from meshca.core.agent_jwt import AgentJwtSvid
from meshca.core.errors import (
    AuthenticationFailed,
    BackendUnavailable,
    InvalidRequest,
    MeshcaError,
    NotAuthorized,
)

__all__ = ["GrpcUpstream", "TokenFile", "new_key_and_csr"]

#: The longest a Sign call may take before it counts as a failure and is retried.
SIGN_TIMEOUT = 15.0


def new_key_and_csr() -> tuple[bytes, bytes]:
    """A fresh P-256 key (PKCS#8 DER) and a CSR for it (DER, empty subject: the server
    sets the SPIFFE ID from the token)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    key_der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_der, csr.public_bytes(serialization.Encoding.DER)


class TokenFile:
    """The pod's service-account token, read from its file on every call (kubelet
    rotates projected tokens in place)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> str:
        try:
            token = self.path.read_text().strip()
        except OSError as exc:
            raise AuthenticationFailed(
                f"token file {self.path} cannot be read: {exc.strerror or exc}",
                reason="token-file-unreadable",
            ) from exc
        if not token:
            raise AuthenticationFailed(
                f"token file {self.path} is empty", reason="token-file-empty"
            )
        return token


def _error(exc: grpc.RpcError, what: str) -> MeshcaError:
    code = exc.code()
    details = exc.details() or ""
    message = f"{what}: server said {code.name}: {details}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationFailed(message)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return NotAuthorized(message)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(message)
    return BackendUnavailable(message)


def _der(pem: str) -> bytes:
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)


class GrpcUpstream:
    """``meshca.core.agent.Upstream`` over ``meshca.v1.CertificateService``, and
    ``meshca.core.agent_jwt.JwtUpstream`` over ``meshca.v1.JwtSvidService``."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = ca_pb2_grpc.CertificateServiceStub(channel)
        self._jwt_stub = jwt_pb2_grpc.JwtSvidServiceStub(channel)

    async def sign_jwt(
        self, token: str, audiences: tuple[str, ...], spiffe_id: str
    ) -> AgentJwtSvid:
        """A JWT-SVID of the server's default lifetime; ``fetched_at`` is when it came."""
        try:
            response = await self._jwt_stub.SignJwtSvid(
                jwt_pb2.SignJwtSvidRequest(audiences=list(audiences), spiffe_id=spiffe_id),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=SIGN_TIMEOUT,
            )
        except grpc.RpcError as exc:
            raise _error(exc, "SignJwtSvid") from exc
        if not response.token or not response.HasField("expires_at"):
            raise BackendUnavailable("SignJwtSvid: the server's answer has no token")
        return AgentJwtSvid(
            spiffe_id=response.spiffe_id,
            token=response.token,
            fetched_at=datetime.now(UTC),
            expires_at=response.expires_at.ToDatetime(UTC),
        )

    async def sign(
        self, token: str, csr_der: bytes, key_der: bytes
    ) -> tuple[AgentSvid, tuple[bytes, ...]]:
        try:
            response = await self._stub.Sign(
                ca_pb2.SignRequest(csr=csr_der),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=SIGN_TIMEOUT,
            )
        except grpc.RpcError as exc:
            raise _error(exc, "Sign") from exc
        try:
            leaf = x509.load_pem_x509_certificate(response.certificate.encode())
            chain = (
                leaf.public_bytes(serialization.Encoding.DER),
                *(_der(p) for p in response.intermediates),
            )
            roots = tuple(_der(p) for p in response.bundle)
        except ValueError as exc:
            raise BackendUnavailable(f"Sign: the server's answer does not parse: {exc}") from exc
        svid = AgentSvid(
            spiffe_id=response.spiffe_id,
            chain_der=chain,
            key_der=key_der,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            serial=response.serial or f"{leaf.serial_number:x}",
        )
        return svid, roots

    async def watch_bundle(self) -> AsyncIterator[TrustBundleView]:
        stream = self._stub.WatchTrustBundle(ca_pb2.WatchTrustBundleRequest())
        try:
            async for message in stream:
                try:
                    roots = tuple(_der(p) for p in message.roots)
                except ValueError as exc:
                    raise BackendUnavailable(f"WatchTrustBundle: bad root: {exc}") from exc
                tainted = frozenset(
                    t for t in list(message.tainted)[:MAX_TAINTED] if _is_fingerprint(t)
                )
                crls = tuple(bytes(c) for c in message.crls)
                for crl in crls:
                    try:
                        x509.load_der_x509_crl(crl)
                    except ValueError as exc:
                        raise BackendUnavailable(f"WatchTrustBundle: bad CRL: {exc}") from exc
                yield TrustBundleView(
                    message.trust_domain,
                    roots,
                    message.sequence,
                    tainted=tainted,
                    crls_der=crls,
                    jwt_bundle=bytes(message.jwt_bundle),
                )
        except grpc.RpcError as exc:
            raise _error(exc, "WatchTrustBundle") from exc
        finally:
            stream.cancel()


def _is_fingerprint(text: str) -> bool:
    """A SHA-256 as 64 lowercase hex digits; anything else a server sends is ignored."""
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)
