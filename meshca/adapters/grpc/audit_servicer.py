"""meshca.v1.AuditService: who is calling (client SVID, bearer token) and protos <-> core."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from meshca.adapters.grpc._gen.meshca.v1 import audit_pb2, audit_pb2_grpc
from meshca.adapters.grpc.audit_convert import (
    consistency_to_proto,
    entry_to_proto,
    head_to_proto,
    query_from_proto,
)
from meshca.adapters.grpc.metadata import bearer_token, peer_certificate, peer_spiffe_id
from meshca.core.log import LogState
from meshca.service.audit import AuditCaller, AuditService

__all__ = ["AuditServicer", "caller_of", "peer_spiffe_id"]

Context: TypeAlias = Any  # grpc.aio.ServicerContext; grpcio ships no type hints


def caller_of(context: Context) -> AuditCaller:
    certificate = peer_certificate(context)
    if certificate is None:
        return AuditCaller(token=bearer_token(context))
    return AuditCaller(
        spiffe_id=certificate.spiffe_id,
        token=bearer_token(context),
        serial=certificate.serial,
        key_sha256=certificate.key_sha256,
    )


def _oneof(request: Any, name: str) -> dict[str, Any]:
    which = request.WhichOneof(name)
    return {} if which is None else {which: getattr(request, which)}


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, audit: AuditService, public_key_der: bytes) -> None:
        self._audit = audit
        self._public_key_der = public_key_der

    async def ListIssuances(self, request: Any, context: Context) -> Any:
        query = query_from_proto(request.filter, request.page_size, request.page_token)
        page = await self._audit.query(caller_of(context), query)
        return audit_pb2.ListRecordsResponse(
            entries=[entry_to_proto(e) for e in page.entries],
            next_page_token=page.next_cursor or "",
        )

    async def ListRefusals(self, request: Any, context: Context) -> Any:
        query = query_from_proto(request.filter, request.page_size, request.page_token)
        page = await self._audit.refusals(caller_of(context), query)
        return audit_pb2.ListRecordsResponse(
            entries=[entry_to_proto(e) for e in page.entries],
            next_page_token=page.next_cursor or "",
        )

    async def GetIssuance(self, request: Any, context: Context) -> Any:
        entry = await self._audit.get(caller_of(context), **_oneof(request, "key"))
        return entry_to_proto(entry)

    async def Export(self, request: Any, context: Context) -> AsyncIterator[Any]:
        caller = caller_of(context)
        if request.leaf_order:
            async for entry in self._audit.leaves(caller, request.start_leaf):
                yield entry_to_proto(entry)
            return
        query = query_from_proto(request.filter, 1000)
        async for entry in self._audit.export(caller, query):
            yield entry_to_proto(entry)

    async def GetSignedTreeHead(self, request: Any, context: Context) -> Any:
        signed = await self._audit.signed_tree_head(caller_of(context), fresh=request.fresh)
        return head_to_proto(signed)

    async def GetInclusionProof(self, request: Any, context: Context) -> Any:
        entry, proof, head = await self._audit.inclusion_proof(
            caller_of(context), tree_size=request.tree_size, **_oneof(request, "leaf")
        )
        return audit_pb2.InclusionProof(
            leaf_index=proof.leaf_index,
            tree_size=proof.tree_size,
            path=list(proof.path),
            entry=entry_to_proto(entry),
            head=head_to_proto(head) if head is not None else None,
        )

    async def GetConsistencyProof(self, request: Any, context: Context) -> Any:
        proof = await self._audit.consistency_proof(
            caller_of(context), request.old_size, request.new_size
        )
        return consistency_to_proto(proof)

    async def GetLogInfo(self, request: Any, context: Context) -> Any:
        state: LogState = await self._audit.state(caller_of(context))
        return audit_pb2.LogInfo(
            tree_size=state.tree_size,
            pruned_below=state.pruned_below,
            frontier=list(state.frontier),
            public_key=self._public_key_der,
        )


def public_key_der(key: Any) -> bytes:
    """DER SubjectPublicKeyInfo of a public key."""
    der: bytes = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return der
