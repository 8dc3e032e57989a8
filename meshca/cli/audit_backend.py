"""Where ``meshca audit`` reads from: the database itself, or a server's AuditService.

Both give the same values (core types), so every command works the same either way.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.adapters.grpc._gen.meshca.v1 import audit_pb2, audit_pb2_grpc
from meshca.adapters.grpc.audit_convert import (
    consistency_from_proto,
    entry_from_proto,
    filter_to_proto,
    head_from_proto,
    inclusion_from_proto,
)
from meshca.adapters.keys.log_key import load_log_key, log_key_path
from meshca.adapters.keys.sealed import LOG_KEY_REF, SealedKeys
from meshca.adapters.storage.audit_query import SqlAuditReader
from meshca.adapters.storage.engine import make_engine, sqlite_url_for
from meshca.adapters.storage.transparency import SqlTransparencyLog
from meshca.core.audit import AuditPage, AuditQuery, LogEntry
from meshca.core.errors import BackendUnavailable, InvalidRequest
from meshca.core.log import ConsistencyProof, InclusionProof, SignedTreeHead
from meshca.core.log_audit import LogVerifier, VerificationReport

__all__ = ["AuditBackend", "NoRecord", "open_backend"]


class NoRecord(Exception):
    """The database or server has nothing to read; the message says what."""


class AuditBackend(Protocol):
    def query(self, query: AuditQuery) -> AuditPage: ...
    def export(self, query: AuditQuery) -> Iterator[LogEntry]: ...
    def get(self, *, serial: str | None = None, leaf_index: int | None = None) -> LogEntry: ...
    def head(self, *, fresh: bool = False) -> SignedTreeHead | None: ...
    def inclusion_proof(self, leaf_index: int, tree_size: int) -> InclusionProof: ...
    def consistency_proof(self, old_size: int, new_size: int) -> ConsistencyProof: ...
    def public_key(self) -> ec.EllipticCurvePublicKey | None: ...
    def verify_all(
        self, public_key: ec.EllipticCurvePublicKey | None, kept: list[SignedTreeHead]
    ) -> VerificationReport: ...
    def close(self) -> None: ...


class LocalBackend:
    """The database itself (``--data-dir``'s SQLite or ``--database-url``)."""

    def __init__(self, url: str, data_dir: Path | None) -> None:
        self._engine = make_engine(url)
        self._data_dir = data_dir
        key = None
        if data_dir is not None and log_key_path(data_dir).exists():
            key = load_log_key(data_dir)
        self._key = key
        # Replicas on several hosts share a log key sealed in the database; its public
        # half is readable without the key-encryption key.
        try:
            self._sealed_public = SealedKeys(self._engine, None).public_key_der(LOG_KEY_REF)
        except BackendUnavailable:
            self._sealed_public = None  # a schema from before sealed keys
        self._reader = SqlAuditReader(self._engine)
        self._log = SqlTransparencyLog(self._engine, key)

    def query(self, query: AuditQuery) -> AuditPage:
        return self._reader.query(query)

    def export(self, query: AuditQuery) -> Iterator[LogEntry]:
        return self._reader.export(query)

    def get(self, *, serial: str | None = None, leaf_index: int | None = None) -> LogEntry:
        entry = self._reader.get(serial=serial, leaf_index=leaf_index)
        if entry is None:
            raise InvalidRequest(f"no record for {serial or leaf_index}")
        return entry

    def head(self, *, fresh: bool = False) -> SignedTreeHead | None:
        if fresh:
            from datetime import UTC, datetime

            return self._log.sign_head(datetime.now(UTC))
        return self._log.latest_head()

    def inclusion_proof(self, leaf_index: int, tree_size: int) -> InclusionProof:
        return self._log.inclusion_proof(leaf_index, tree_size)

    def consistency_proof(self, old_size: int, new_size: int) -> ConsistencyProof:
        return self._log.consistency_proof(old_size, new_size)

    def public_key(self) -> ec.EllipticCurvePublicKey | None:
        if self._sealed_public is not None:
            public = serialization.load_der_public_key(self._sealed_public)
            assert isinstance(public, ec.EllipticCurvePublicKey)
            return public
        return None if self._key is None else self._key.public_key()

    def verify_all(
        self, public_key: ec.EllipticCurvePublicKey | None, kept: list[SignedTreeHead]
    ) -> VerificationReport:
        if not kept:
            return self._log.verify(public_key)
        state = self._log.state()
        verifier = LogVerifier(
            start=state.pruned_below,
            frontier=state.frontier,
            heads=[*self._log.heads(), *kept],
            public_key=public_key,
        )
        for leaf in self._log.leaves(state.pruned_below):
            verifier.feed(leaf.entry, leaf.stored_hash)
        return verifier.finish(state.tree_size)

    def prune(self, before: Any) -> int:
        return self._log.prune(before)

    def close(self) -> None:
        self._engine.dispose()


class RemoteBackend:
    """A running server's ``meshca.v1.AuditService``."""

    def __init__(self, channel: grpc.Channel, metadata: list[tuple[str, str]]) -> None:
        self._channel = channel
        self._stub = audit_pb2_grpc.AuditServiceStub(channel)
        self._metadata = metadata
        self._info: Any = None

    def _call(self, method: str, request: Any) -> Any:
        return getattr(self._stub, method)(request, metadata=self._metadata, timeout=60)

    def query(self, query: AuditQuery) -> AuditPage:
        response = self._call(
            "ListIssuances",
            audit_pb2.ListRecordsRequest(
                filter=filter_to_proto(query),
                page_size=query.limit,
                page_token=query.cursor or "",
            ),
        )
        return AuditPage(
            entries=tuple(entry_from_proto(e) for e in response.entries),
            next_cursor=response.next_page_token or None,
        )

    def export(self, query: AuditQuery) -> Iterator[LogEntry]:
        stream = self._stub.Export(
            audit_pb2.ExportRequest(filter=filter_to_proto(query)), metadata=self._metadata
        )
        for message in stream:
            yield entry_from_proto(message)

    def get(self, *, serial: str | None = None, leaf_index: int | None = None) -> LogEntry:
        request = (
            audit_pb2.GetIssuanceRequest(serial=serial)
            if serial is not None
            else audit_pb2.GetIssuanceRequest(leaf_index=leaf_index)
        )
        return entry_from_proto(self._call("GetIssuance", request))

    def head(self, *, fresh: bool = False) -> SignedTreeHead | None:
        message = self._call("GetSignedTreeHead", audit_pb2.GetSignedTreeHeadRequest(fresh=fresh))
        return head_from_proto(message)

    def inclusion_proof(self, leaf_index: int, tree_size: int) -> InclusionProof:
        message = self._call(
            "GetInclusionProof",
            audit_pb2.GetInclusionProofRequest(leaf_index=leaf_index, tree_size=tree_size),
        )
        return inclusion_from_proto(message)

    def consistency_proof(self, old_size: int, new_size: int) -> ConsistencyProof:
        message = self._call(
            "GetConsistencyProof",
            audit_pb2.GetConsistencyProofRequest(old_size=old_size, new_size=new_size),
        )
        return consistency_from_proto(message)

    def _log_info(self) -> Any:
        if self._info is None:
            self._info = self._call("GetLogInfo", audit_pb2.GetLogInfoRequest())
        return self._info

    def public_key(self) -> ec.EllipticCurvePublicKey | None:
        key = serialization.load_der_public_key(bytes(self._log_info().public_key))
        return key if isinstance(key, ec.EllipticCurvePublicKey) else None

    def verify_all(
        self, public_key: ec.EllipticCurvePublicKey | None, kept: list[SignedTreeHead]
    ) -> VerificationReport:
        info = self._log_info()
        latest = self.head()
        heads = [h for h in (latest, *kept) if h is not None]
        verifier = LogVerifier(
            start=info.pruned_below,
            frontier=[bytes(f) for f in info.frontier],
            heads=heads,
            public_key=public_key,
        )
        stream = self._stub.Export(
            audit_pb2.ExportRequest(leaf_order=True, start_leaf=info.pruned_below),
            metadata=self._metadata,
        )
        for message in stream:
            verifier.feed(entry_from_proto(message))
        return verifier.finish(max([info.tree_size, *(h.head.size for h in heads)]))

    def close(self) -> None:
        self._channel.close()


def _read(path: str | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def open_backend(args: argparse.Namespace) -> AuditBackend:
    """The backend the flags name: ``--server`` (gRPC), else the local database."""
    if getattr(args, "server", None):
        metadata = []
        if args.token_file:
            token = Path(args.token_file).read_text().strip()
            metadata.append(("authorization", f"Bearer {token}"))
        if args.plaintext:
            channel = grpc.insecure_channel(args.server)
        else:
            roots = _read(args.ca_file)
            if roots is None:
                bundle = Path(args.data_dir) / "ca" / "root.pem"
                roots = bundle.read_bytes() if bundle.exists() else None
            credentials = grpc.ssl_channel_credentials(roots, _read(args.key), _read(args.cert))
            options = [("grpc.ssl_target_name_override", args.server_name)]
            channel = grpc.secure_channel(args.server, credentials, options)
        return RemoteBackend(channel, metadata)
    data_dir = Path(args.data_dir)
    if args.database_url:
        return LocalBackend(args.database_url, data_dir if data_dir.exists() else None)
    if not (data_dir / "meshca.db").exists():
        raise NoRecord(f"no issuance record in {args.data_dir}")
    return LocalBackend(sqlite_url_for(data_dir.resolve()), data_dir)
