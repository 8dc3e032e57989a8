"""Private keys sealed in the database, so replicas on several hosts share them.

Each key is PKCS#8 DER encrypted with AES-256-GCM under the key-encryption key (KEK)
from ``--key-encryption-key-file``: the same Secret mounted on every replica, never
stored in the database. The key's reference is the GCM associated data, so a row copied
under another name does not decrypt. A CA key reference is ``sealed:<label>-<random>``;
the issuance log's signing key is ``log:signing``, outside the CA's inventory so
clean-up of unreferenced CA keys never touches it.

Keys made before sealing (``file:`` references in the data directory) still load from
that directory, so a single host can switch to sealing without a rotation; other hosts
cannot load those until they are rotated away (the error says so).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from meshca.adapters.keys.files import FileKeyManager
from meshca.adapters.storage.engine import error_summary
from meshca.adapters.storage.tables import SealedKeyRow
from meshca.core.authority import SignerKey
from meshca.core.errors import BackendUnavailable

__all__ = ["LOG_KEY_REF", "KeyEncryptionKey", "SealedKeyManager", "SealedKeys"]

_PREFIX = "sealed:"
LOG_KEY_REF = "log:signing"


class KeyEncryptionKey:
    """The 32-byte AES key that seals private keys; ``id`` names it without revealing it."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError(f"a key-encryption key is 32 bytes, not {len(key)}")
        self._aead = AESGCM(key)
        self.id = hashlib.sha256(b"meshca key-encryption key\0" + key).hexdigest()[:16]

    @classmethod
    def from_file(cls, path: Path) -> KeyEncryptionKey:
        """Read base64 text (``head -c 32 /dev/urandom | base64``); ``ValueError`` if bad."""
        try:
            text = path.read_bytes().strip()
        except OSError as error:
            raise ValueError(
                f"cannot read key-encryption-key-file {path}: {error.strerror}"
            ) from None
        try:
            key = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(
                f"key-encryption-key-file {path} is not base64 "
                "(make one with: head -c 32 /dev/urandom | base64)"
            ) from None
        if len(key) != 32:
            raise ValueError(
                f"key-encryption-key-file {path} holds {len(key)} bytes, not 32 "
                "(make one with: head -c 32 /dev/urandom | base64)"
            )
        return cls(key)

    def seal(self, ref: str, plaintext: bytes) -> tuple[bytes, bytes]:
        nonce = secrets.token_bytes(12)
        return nonce, self._aead.encrypt(nonce, plaintext, ref.encode())

    def open(self, ref: str, nonce: bytes, ciphertext: bytes) -> bytes:
        return self._aead.decrypt(nonce, ciphertext, ref.encode())


class SealedKeys:
    """Sealed private keys by reference, in the ``sealed_key`` table. Blocking."""

    def __init__(self, engine: Engine, kek: KeyEncryptionKey | None) -> None:
        self._engine = engine
        self._kek = kek

    def put(self, ref: str, key: SignerKey) -> bool:
        """Store ``key`` as ``ref``; False (and nothing written) if ``ref`` is taken."""
        kek = self._need_kek(ref)
        nonce, ciphertext = kek.seal(ref, _pkcs8(key))
        row = {
            "ref": ref,
            "kek_id": kek.id,
            "nonce": nonce,
            "ciphertext": ciphertext,
            "public_key_der": _public_der(key),
            "created_at": datetime.now(UTC),
        }
        try:
            with self._engine.begin() as connection:
                connection.execute(insert(SealedKeyRow), [row])
        except IntegrityError:
            return False
        except SQLAlchemyError as error:
            raise BackendUnavailable(f"cannot store key {ref}: {error_summary(error)}") from error
        return True

    def get(self, ref: str) -> SignerKey | None:
        """The key stored as ``ref``, or None when there is none."""
        row = self._row(ref)
        if row is None:
            return None
        kek = self._need_kek(ref)
        if row.kek_id != kek.id:
            raise BackendUnavailable(
                f"key {ref} is sealed with key-encryption key {row.kek_id}, and this replica "
                f"has {kek.id}: give every replica the same --key-encryption-key-file"
            )
        try:
            der = kek.open(ref, row.nonce, row.ciphertext)
        except InvalidTag:
            raise BackendUnavailable(
                f"key {ref} does not decrypt: its row was altered or moved"
            ) from None
        key = serialization.load_der_private_key(der, password=None)
        assert isinstance(key, SignerKey)
        return key

    def public_key_der(self, ref: str) -> bytes | None:
        """The public half of ``ref``, readable without the key-encryption key."""
        row = self._row(ref)
        return None if row is None else bytes(row.public_key_der)

    def delete(self, ref: str) -> None:
        try:
            with self._engine.begin() as connection:
                connection.execute(delete(SealedKeyRow).where(SealedKeyRow.ref == ref))
        except SQLAlchemyError as error:
            raise BackendUnavailable(f"cannot delete key {ref}: {error_summary(error)}") from error

    def refs(self, prefix: str) -> list[str]:
        try:
            with self._engine.connect() as connection:
                rows = connection.execute(
                    select(SealedKeyRow.ref).where(SealedKeyRow.ref.startswith(prefix))
                )
                return sorted(r for (r,) in rows)
        except SQLAlchemyError as error:
            raise BackendUnavailable(f"cannot list sealed keys: {error_summary(error)}") from error

    def _row(self, ref: str) -> Any:  # a Row of the columns below, or None
        try:
            with self._engine.connect() as connection:
                return connection.execute(
                    select(
                        SealedKeyRow.kek_id,
                        SealedKeyRow.nonce,
                        SealedKeyRow.ciphertext,
                        SealedKeyRow.public_key_der,
                    ).where(SealedKeyRow.ref == ref)
                ).first()
        except SQLAlchemyError as error:
            raise BackendUnavailable(f"cannot read key {ref}: {error_summary(error)}") from error

    def _need_kek(self, ref: str) -> KeyEncryptionKey:
        if self._kek is None:
            raise BackendUnavailable(
                f"key {ref} is sealed in the database: this replica needs "
                "--key-encryption-key-file to use it"
            )
        return self._kek


class SealedKeyManager:
    """``KeyManager``, ``KeyInventory`` and ``KeyImporter``: new keys sealed in the database.

    ``files`` still serves the ``file:`` keys of a CA made before sealing was turned on.
    """

    def __init__(self, keys: SealedKeys, files: FileKeyManager) -> None:
        self._keys = keys
        self._files = files

    def create(self, label: str) -> tuple[str, SignerKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        return self.store(label, key), key

    def store(self, label: str, key: SignerKey) -> str:
        while True:  # 48 random bits: a clash is a retry, not an overwrite
            ref = f"{_PREFIX}{label}-{secrets.token_hex(6)}"
            if self._keys.put(ref, key):
                return ref

    def load(self, key_ref: str) -> SignerKey:
        if not key_ref.startswith(_PREFIX):
            return self._files.load(key_ref)
        key = self._keys.get(key_ref)
        if key is None:
            raise BackendUnavailable(f"CA key {key_ref} is not in the database")
        return key

    def delete(self, key_ref: str) -> None:
        if key_ref.startswith(_PREFIX):
            self._keys.delete(key_ref)
        else:
            self._files.delete(key_ref)

    def key_refs(self) -> Sequence[str]:
        return [*self._keys.refs(_PREFIX), *self._files.key_refs()]


def _pkcs8(key: SignerKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_der(key: SignerKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
