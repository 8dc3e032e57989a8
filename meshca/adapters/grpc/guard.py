"""What a gRPC call proved about its caller, handed to ``service.access.CallerGuard``."""

from __future__ import annotations

from typing import Any

from meshca.adapters.grpc.metadata import bearer_token_or_problem, peer_address, peer_certificate
from meshca.service.access import Caller, CallerGuard

__all__ = ["admit", "caller_of"]


def caller_of(context: Any) -> Caller:
    """The verified client SVID's ID (mTLS ports only), the bearer token and the peer."""
    token, problem = bearer_token_or_problem(context)
    certificate = peer_certificate(context)
    return Caller(
        spiffe_id=None if certificate is None else certificate.spiffe_id,
        serial=None if certificate is None else certificate.serial,
        key_sha256=None if certificate is None else certificate.key_sha256,
        token=token,
        problem=problem,
        peer=peer_address(context),
    )


async def admit(guard: CallerGuard, method: str, context: Any) -> None:
    """Raise (after recording) unless the caller on ``context`` may call ``method``."""
    await guard.admit(method, caller_of(context))
