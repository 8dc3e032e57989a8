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
from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from meshca.adapters.keys.files import FileKeyManager
from meshca.adapters.storage.engine import error_summary
from meshca.adapters.storage.tables import SealedKeyRow
from meshca.core.authority import SignerKey
from meshca.core.errors import BackendUnavailable

__all__ = ["LOG_KEY_REF", "KeyEncryptionKey", "KeyRing", "SealedKeyManager", "SealedKeys"]

_PREFIX = "sealed:"
LOG_KEY_REF = "log:signing"


class KeyEncryptionKey:
    """The 32-byte AES key that seals private keys; ``id`` names it without revealing it."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError(f"a key-encryption key is 32 bytes, not {len(key)}")
        self._aead = AESGCM(key)
        self.id = hashlib.sha256(b"meshca key-encryption key\0" + key).hexdigest()[:16]

    def seal(self, ref: str, plaintext: bytes) -> tuple[bytes, bytes]:
        nonce = secrets.token_bytes(12)
        return nonce, self._aead.encrypt(nonce, plaintext, ref.encode())

    def open(self, ref: str, nonce: bytes, ciphertext: bytes) -> bytes:
        return self._aead.decrypt(nonce, ciphertext, ref.encode())


class KeyRing:
    """The key-encryption keys a replica has: the first seals, any of them opens.

    A key-encryption-key file holds one base64 key per line. To replace the key, put the
    new one first and the old one after it on every replica, run ``meshca ca reseal-keys``,
    then drop the old line.
    """

    def __init__(self, keys: Sequence[KeyEncryptionKey]) -> None:
        if not keys:
            raise ValueError("a key ring needs at least one key-encryption key")
        self.sealing = keys[0]
        self._by_id = {k.id: k for k in keys}

    @property
    def ids(self) -> list[str]:
        return list(self._by_id)

    def get(self, kek_id: str) -> KeyEncryptionKey | None:
        return self._by_id.get(kek_id)

    @classmethod
    def from_file(cls, path: Path) -> KeyRing:
        """Read base64 lines (``head -c 32 /dev/urandom | base64``); ``ValueError`` if bad."""
        hint = "(make one with: head -c 32 /dev/urandom | base64)"
        try:
            lines = path.read_bytes().splitlines()
        except OSError as error:
            raise ValueError(
                f"cannot read key-encryption-key-file {path}: {error.strerror}"
            ) from None
        keys = []
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith(b"#"):
                continue
            try:
                key = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(
                    f"key-encryption-key-file {path} line {number} is not base64 {hint}"
                ) from None
            if len(key) != 32:
                raise ValueError(
                    f"key-encryption-key-file {path} line {number} holds {len(key)} bytes, "
                    f"not 32 {hint}"
                )
            keys.append(KeyEncryptionKey(key))
        if not keys:
            raise ValueError(f"key-encryption-key-file {path} holds no key {hint}")
        return cls(keys)


class SealedKeys:
    """Sealed private keys by reference, in the ``sealed_key`` table. Blocking."""

    def __init__(self, engine: Engine, ring: KeyRing | None) -> None:
        self._engine = engine
        self._ring = ring

    def put(self, ref: str, key: SignerKey) -> bool:
        """Store ``key`` as ``ref``; False (and nothing written) if ``ref`` is taken."""
        kek = self._need_ring(ref).sealing
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
        return None if row is None else self._open(ref, row.kek_id, row.nonce, row.ciphertext)

    @property
    def sealing_id(self) -> str:
        """The id of the key-encryption key new keys are sealed with."""
        return self._need_ring("new keys").sealing.id

    def reseal(self) -> tuple[int, int]:
        """Seal every key under the ring's first key: ``(re-sealed, already so)``.

        Each row is replaced only if it is still as read (compare-and-set on its nonce),
        so replicas storing keys meanwhile lose nothing; a rerun finishes what is left.
        """
        ring = self._need_ring("every key")
        moved = kept = 0
        try:
            with self._engine.connect() as connection:
                rows = connection.execute(
                    select(
                        SealedKeyRow.ref,
                        SealedKeyRow.kek_id,
                        SealedKeyRow.nonce,
                        SealedKeyRow.ciphertext,
                    )
                ).all()
            for ref, kek_id, nonce, ciphertext in rows:
                if kek_id == ring.sealing.id:
                    kept += 1
                    continue
                new_nonce, new_ciphertext = ring.sealing.seal(
                    ref, self._open_der(ref, kek_id, nonce, ciphertext)
                )
                with self._engine.begin() as connection:
                    connection.execute(
                        update(SealedKeyRow)
                        .where(SealedKeyRow.ref == ref, SealedKeyRow.nonce == nonce)
                        .values(kek_id=ring.sealing.id, nonce=new_nonce, ciphertext=new_ciphertext)
                    )
                moved += 1
        except SQLAlchemyError as error:
            raise BackendUnavailable(f"cannot re-seal keys: {error_summary(error)}") from error
        return moved, kept

    def _open(self, ref: str, kek_id: str, nonce: bytes, ciphertext: bytes) -> SignerKey:
        key = serialization.load_der_private_key(
            self._open_der(ref, kek_id, nonce, ciphertext), password=None
        )
        assert isinstance(key, SignerKey)
        return key

    def _open_der(self, ref: str, kek_id: str, nonce: bytes, ciphertext: bytes) -> bytes:
        ring = self._need_ring(ref)
        kek = ring.get(kek_id)
        if kek is None:
            raise BackendUnavailable(
                f"key {ref} is sealed with key-encryption key {kek_id}, and this replica "
                f"has {', '.join(ring.ids)}: give every replica the same "
                "--key-encryption-key-file"
            )
        try:
            return kek.open(ref, nonce, ciphertext)
        except InvalidTag:
            raise BackendUnavailable(
                f"key {ref} does not decrypt: its row was altered or moved"
            ) from None

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

    def _need_ring(self, ref: str) -> KeyRing:
        if self._ring is None:
            raise BackendUnavailable(
                f"key {ref} is sealed in the database: this replica needs "
                "--key-encryption-key-file to use it"
            )
        return self._ring


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
