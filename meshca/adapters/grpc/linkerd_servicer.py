"""Linkerd's identity API, ``io.linkerd.proxy.identity.Identity/Certify``: protos <-> core.

The token comes in the request (not the metadata) and is attested with Linkerd's
audiences; the CSR is DER; the answer is DER. Refusals carry Linkerd's status codes
(``errors.LINKERD_STATUS_TABLE``) and are recorded like any other door's.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc
from cryptography.hazmat.primitives.serialization import Encoding
from google.protobuf.timestamp_pb2 import Timestamp

from meshca.adapters.grpc._gen.io.linkerd.proxy.identity import (
    identity_pb2,
    identity_pb2_grpc,
)
from meshca.adapters.grpc.errors import LINKERD_STATUS_TABLE, error_mapped
from meshca.adapters.grpc.gate import CallGate
from meshca.adapters.grpc.metadata import peer_address
from meshca.core.errors import AuthenticationFailed
from meshca.service.ca import CertificateService, SignRequest

__all__ = ["API_LINKERD", "SERVICE_NAME", "LinkerdIdentityServicer", "add_to_server"]

#: The ``api`` of every record made through this door.
API_LINKERD = "io.linkerd.proxy.identity.Certify"
SERVICE_NAME = identity_pb2.DESCRIPTOR.services_by_name["Identity"].full_name

Context: TypeAlias = Any  # grpc.aio.ServicerContext; grpcio ships no type hints


def _token(raw: bytes) -> tuple[str | None, AuthenticationFailed | None]:
    """The token as text, or why it cannot be one (recorded like any bad token)."""
    if not raw.strip():
        return None, AuthenticationFailed(
            "no token: CertifyRequest.token is empty", reason="token-missing"
        )
    try:
        return raw.decode("utf-8").strip(), None
    except UnicodeDecodeError:
        return None, AuthenticationFailed("token is not UTF-8 text", reason="token-malformed")


class LinkerdIdentityServicer(identity_pb2_grpc.IdentityServicer):
    def __init__(self, ca: CertificateService) -> None:
        self._ca = ca

    async def Certify(
        self, request: identity_pb2.CertifyRequest, context: Context
    ) -> identity_pb2.CertifyResponse:
        token, token_problem = _token(request.token)
        signed = await self._ca.sign(
            SignRequest(
                token=token,
                token_problem=token_problem,
                csr=request.certificate_signing_request,
                # Linkerd asks for no lifetime: the server's default applies.
                requested_ttl=None,
                api=API_LINKERD,
                peer=peer_address(context),
                linkerd_identity=request.identity,
            )
        )
        valid_until = Timestamp()
        valid_until.FromDatetime(signed.not_after)
        return identity_pb2.CertifyResponse(
            leaf_certificate=signed.leaf_der,
            intermediate_certificates=[c.public_bytes(Encoding.DER) for c in signed.intermediates],
            valid_until=valid_until,
        )


def add_to_server(ca: CertificateService, server: grpc.aio.Server, gate: CallGate | None) -> None:
    """Serve Linkerd's identity API from ``ca`` (which must have a ``LinkerdDoor``)."""
    identity_pb2_grpc.add_IdentityServicer_to_server(
        error_mapped(LinkerdIdentityServicer(ca), gate, LINKERD_STATUS_TABLE), server
    )
