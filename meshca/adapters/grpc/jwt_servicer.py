"""meshca.v1.JwtSvidService: protos <-> core values."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, TypeAlias

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from meshca.adapters.grpc._gen.meshca.v1 import jwt_pb2, jwt_pb2_grpc
from meshca.adapters.grpc.errors import error_mapped
from meshca.adapters.grpc.gate import CallGate
from meshca.adapters.grpc.metadata import bearer_token_or_problem, peer_address
from meshca.service.jwt_svid import JwtSvidRequest, JwtSvidService

__all__ = ["API_JWT_SVID", "SERVICE_NAME", "JwtSvidServicer", "add_to_server"]

API_JWT_SVID = "meshca.v1.SignJwtSvid"
SERVICE_NAME = jwt_pb2.DESCRIPTOR.services_by_name["JwtSvidService"].full_name

Context: TypeAlias = Any  # grpc.aio.ServicerContext; grpcio ships no type hints


def _ttl(seconds: int) -> timedelta | None:
    # Beyond ~100 years a requested TTL means nothing but an overflow risk; the service
    # refuses anything above its maximum anyway.
    return timedelta(seconds=min(seconds, 3_153_600_000)) if seconds > 0 else None


class JwtSvidServicer(jwt_pb2_grpc.JwtSvidServiceServicer):
    def __init__(self, service: JwtSvidService) -> None:
        self._service = service

    async def SignJwtSvid(
        self, request: jwt_pb2.SignJwtSvidRequest, context: Context
    ) -> jwt_pb2.SignJwtSvidResponse:
        token, token_problem = bearer_token_or_problem(context)
        signed = await self._service.sign(
            JwtSvidRequest(
                token=token,
                token_problem=token_problem,
                audiences=tuple(request.audiences),
                spiffe_id=request.spiffe_id or None,
                requested_ttl=_ttl(request.ttl_seconds),
                api=API_JWT_SVID,
                peer=peer_address(context),
            )
        )
        expires = Timestamp()
        expires.FromDatetime(signed.expires_at)
        return jwt_pb2.SignJwtSvidResponse(
            token=signed.token,
            spiffe_id=str(signed.spiffe_id),
            expires_at=expires,
            jti=signed.jti,
            kid=signed.kid,
        )


def add_to_server(service: JwtSvidService, server: grpc.aio.Server, gate: CallGate | None) -> None:
    jwt_pb2_grpc.add_JwtSvidServiceServicer_to_server(
        error_mapped(JwtSvidServicer(service), gate), server
    )
