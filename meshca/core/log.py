"""Signed tree heads and proofs of the verifiable issuance log. Pure: keys are inputs.

A tree head commits to the first ``size`` leaves of the log (``meshca.core.merkle``). The
log key signs ``tree_head_message``:

    b"meshca-tree-head-v1\\x00" || key_id (32) || size (8, big-endian)
        || timestamp (8, big-endian milliseconds since the Unix epoch) || root_hash (32)

with ECDSA P-256 over SHA-256 (DER signature). ``key_id`` is SHA-256 of the log public
key's DER SubjectPublicKeyInfo, so a signature cannot be replayed as another log's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.core.merkle import HASH_SIZE

__all__ = [
    "ConsistencyProof",
    "InclusionProof",
    "LogState",
    "SignedTreeHead",
    "TreeHead",
    "key_id_of",
    "sign_tree_head",
    "tree_head_message",
    "verify_tree_head",
]

_DOMAIN = b"meshca-tree-head-v1\x00"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class TreeHead:
    """The log's first ``size`` leaves have root ``root_hash``, as of ``timestamp``.

    ``timestamp`` is whole milliseconds, UTC.
    """

    size: int
    root_hash: bytes
    timestamp: datetime

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"tree size {self.size} is negative")
        if len(self.root_hash) != HASH_SIZE:
            raise ValueError(f"root hash is {len(self.root_hash)} bytes, not {HASH_SIZE}")
        if self.timestamp.utcoffset() is None:
            raise ValueError("tree head timestamp must be timezone-aware")

    @property
    def timestamp_ms(self) -> int:
        return (self.timestamp - _EPOCH) // timedelta(milliseconds=1)

    @staticmethod
    def time_from_ms(milliseconds: int) -> datetime:
        return _EPOCH + timedelta(milliseconds=milliseconds)


@dataclass(frozen=True, slots=True)
class SignedTreeHead:
    """A tree head, the log key's signature over it and that key's id."""

    head: TreeHead
    key_id: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class LogState:
    """``tree_size`` leaves so far; those below ``pruned_below`` were removed by retention.

    ``frontier`` holds the hashes of ``merkle.subtrees_of(0, pruned_below)``: with them a
    recomputation can start at the first leaf still stored.
    """

    tree_size: int
    pruned_below: int = 0
    frontier: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class InclusionProof:
    """Leaf ``leaf_index`` is in the tree of ``tree_size`` leaves (RFC 9162 audit path)."""

    leaf_index: int
    tree_size: int
    path: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ConsistencyProof:
    """The tree of ``old_size`` leaves is a prefix of the tree of ``new_size`` leaves."""

    old_size: int
    new_size: int
    path: tuple[bytes, ...]


def key_id_of(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """SHA-256 of the DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def tree_head_message(head: TreeHead, key_id: bytes) -> bytes:
    """The bytes the log key signs for ``head`` (see the module docstring)."""
    return (
        _DOMAIN
        + key_id
        + head.size.to_bytes(8, "big")
        + head.timestamp_ms.to_bytes(8, "big")
        + head.root_hash
    )


def sign_tree_head(key: ec.EllipticCurvePrivateKey, head: TreeHead) -> SignedTreeHead:
    """Sign ``head`` with the log key."""
    key_id = key_id_of(key.public_key())
    signature = key.sign(tree_head_message(head, key_id), ec.ECDSA(hashes.SHA256()))
    return SignedTreeHead(head=head, key_id=key_id, signature=signature)


def verify_tree_head(public_key: ec.EllipticCurvePublicKey, signed: SignedTreeHead) -> bool:
    """True if ``signed`` carries this key's id and a valid signature by it."""
    key_id = key_id_of(public_key)
    if signed.key_id != key_id:
        return False
    try:
        public_key.verify(
            signed.signature, tree_head_message(signed.head, key_id), ec.ECDSA(hashes.SHA256())
        )
    except InvalidSignature:
        return False
    return True
