"""meshca.v1.CertificateService and Istio's IstioCertificateService: protos <-> core values."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, TypeAlias

from google.protobuf.timestamp_pb2 import Timestamp

from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc
from meshca.adapters.grpc._gen.meshca.v1 import ca_pb2, ca_pb2_grpc
from meshca.adapters.grpc.metadata import bearer_token_or_problem, peer_address
from meshca.service.bundle import BundleSnapshot, TrustBundleService
from meshca.service.ca import CertificateService, SignedCertificate, SignRequest, serial_hex

__all__ = ["API_ISTIO", "API_MESHCA", "CertificateServicer", "IstioCertificateServicer"]

API_MESHCA = "meshca.v1.Sign"
API_ISTIO = "istio.v1.auth.CreateCertificate"

Context: TypeAlias = Any  # grpc.aio.ServicerContext; grpcio ships no type hints


def _ttl(seconds: int) -> timedelta | None:
    # Beyond ~100 years a requested TTL means nothing but an overflow risk.
    return timedelta(seconds=min(seconds, 3_153_600_000)) if seconds > 0 else None


def _to_message(snapshot: BundleSnapshot) -> ca_pb2.TrustBundle:
    return ca_pb2.TrustBundle(
        trust_domain=snapshot.trust_domain.name,
        roots=snapshot.roots_pems,
        sequence=snapshot.sequence,
        jwt_bundle=snapshot.jwks,
        tainted=snapshot.tainted,
        crls=snapshot.crls,
    )


class CertificateServicer(ca_pb2_grpc.CertificateServiceServicer):
    def __init__(self, ca: CertificateService, bundle: TrustBundleService) -> None:
        self._ca = ca
        self._bundle = bundle
        self._message: tuple[BundleSnapshot, ca_pb2.TrustBundle] | None = None

    def _bundle_message(self, snapshot: BundleSnapshot) -> ca_pb2.TrustBundle:
        """The message of ``snapshot``, built once for all the watchers it goes to."""
        if self._message is None or self._message[0] is not snapshot:
            self._message = (snapshot, _to_message(snapshot))
        return self._message[1]

    async def Sign(self, request: ca_pb2.SignRequest, context: Context) -> ca_pb2.SignResponse:
        token, token_problem = bearer_token_or_problem(context)
        signed = await self._ca.sign(
            SignRequest(
                token=token,
                token_problem=token_problem,
                csr=request.csr,
                requested_ttl=_ttl(request.ttl_seconds),
                api=API_MESHCA,
                peer=peer_address(context),
            )
        )
        expires = Timestamp()
        expires.FromDatetime(signed.not_after)
        return ca_pb2.SignResponse(
            certificate=signed.leaf_pem(),
            intermediates=signed.authority.chain_pems,
            bundle=signed.authority.roots_pems,
            expires_at=expires,
            spiffe_id=str(signed.spiffe_id),
            serial=serial_hex(signed.serial),
        )

    async def GetTrustBundle(
        self, request: ca_pb2.GetTrustBundleRequest, context: Context
    ) -> ca_pb2.TrustBundle:
        return self._bundle_message(self._bundle.current())

    async def WatchTrustBundle(
        self, request: ca_pb2.WatchTrustBundleRequest, context: Context
    ) -> AsyncIterator[ca_pb2.TrustBundle]:
        async for snapshot in self._bundle.watch():
            yield self._bundle_message(snapshot)


class IstioCertificateServicer(istio_grpc.IstioCertificateServiceServicer):
    """Istio's CA contract: PEM CSR in, PEM chain out (leaf first, root last)."""

    def __init__(self, ca: CertificateService) -> None:
        self._ca = ca

    async def CreateCertificate(
        self, request: istio_pb2.IstioCertificateRequest, context: Context
    ) -> istio_pb2.IstioCertificateResponse:
        # The Struct metadata (ImpersonatedIdentity, CertSigner) never changes who the
        # caller is: identity comes from the token alone.
        token, token_problem = bearer_token_or_problem(context)
        signed = await self._ca.sign(
            SignRequest(
                token=token,
                token_problem=token_problem,
                csr=request.csr.encode("utf-8", "surrogateescape"),
                requested_ttl=_ttl(request.validity_duration),
                api=API_ISTIO,
                peer=peer_address(context),
            )
        )
        return istio_pb2.IstioCertificateResponse(cert_chain=istio_chain(signed))


def istio_chain(signed: SignedCertificate) -> list[str]:
    """Leaf, intermediates, then the root that anchors them, each PEM ending in a newline."""
    authority = signed.authority
    anchor = () if authority.anchor_pem is None else (authority.anchor_pem,)
    return [signed.leaf_pem(), *authority.chain_pems, *anchor]
