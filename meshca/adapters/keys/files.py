"""Authority keys as PEM files (0600) under ``<data_dir>/ca``: a KeyManager.

A key reference is ``file:<path relative to the ca directory>``. New keys are ECDSA
P-256, written atomically and fsynced before their reference is handed out.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.adapters.keys.file_store import write_private
from meshca.core.authority import SignerKey
from meshca.core.errors import BackendUnavailable

__all__ = ["FileKeyManager", "LeaderLock", "ca_lock"]

_PREFIX = "file:"
_LABEL = re.compile(r"[^a-z0-9-]+")


class FileKeyManager:
    """``KeyManager``, ``KeyInventory`` and ``KeyImporter`` over files in ``ca_dir``."""

    def __init__(self, ca_dir: Path) -> None:
        self.ca_dir = ca_dir

    @property
    def keys_dir(self) -> Path:
        return self.ca_dir / "keys"

    def create(self, label: str) -> tuple[str, SignerKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        return self.store(label, key), key

    def store(self, label: str, key: SignerKey) -> str:
        self.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{_LABEL.sub('-', label.lower())[:40]}-{secrets.token_hex(6)}.key"
        write_private(self.keys_dir / name, _pem(key))
        _fsync_dir(self.keys_dir)
        return f"{_PREFIX}keys/{name}"

    def load(self, key_ref: str) -> SignerKey:
        path = self._path(key_ref)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise BackendUnavailable(
                f"CA key {key_ref} is not in {self.ca_dir}: the journal in the database names "
                "a key another host made (or this data directory was emptied). Replicas on "
                "several hosts keep their keys sealed in the database: give each the same "
                "--key-encryption-key-file (or use --vault-transit); see docs/operations.md"
            ) from None
        except OSError as error:
            raise BackendUnavailable(f"cannot read CA key {key_ref}: {error.strerror}") from error
        assert isinstance(key, SignerKey)
        return key

    def delete(self, key_ref: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key_ref).unlink()

    def key_refs(self) -> Sequence[str]:
        if not self.keys_dir.is_dir():
            return []
        return sorted(f"{_PREFIX}keys/{p.name}" for p in self.keys_dir.glob("*.key"))

    def _path(self, key_ref: str) -> Path:
        if key_ref.startswith("sealed:"):
            raise BackendUnavailable(
                f"CA key {key_ref} is sealed in the database: this replica needs the "
                "--key-encryption-key-file the other replicas have"
            )
        if not key_ref.startswith(_PREFIX):
            raise BackendUnavailable(f"key {key_ref!r} is not kept in files")
        relative = Path(key_ref[len(_PREFIX) :])
        if relative.is_absolute() or ".." in relative.parts:
            raise BackendUnavailable(f"key reference {key_ref!r} leaves the CA directory")
        return self.ca_dir / relative


def _pem(key: SignerKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _fsync_dir(directory: Path) -> None:
    """Make a new file's name durable, not just its bytes."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def ca_lock(ca_dir: Path) -> Iterator[None]:
    """Hold the CA's step lock: one process at a time changes the journal and its keys.

    The same lock file as the pre-journal ``FileCaStore``, so an older meshca on the
    same data directory waits too.
    """
    ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(ca_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class LeaderLock:
    """Whoever holds this (non-blocking ``flock``, kept until exit) runs the rotator.

    ``held()`` tries to take it each time it is asked, so when the leader dies another
    process takes over on its next poll.
    """

    def __init__(self, ca_dir: Path) -> None:
        self._path = ca_dir / ".rotator.lock"
        self._fd: int | None = None

    def held(self) -> bool:
        if self._fd is not None:
            return True
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
