"""The log key: signs the issuance log's tree heads. ``<data_dir>/log/log-key.pem`` (0600).

A key of its own rather than the CA's: CA keys sign certificates only and rotate, while
auditors pin the log key to check heads for as long as they keep them. Replicas on
several hosts share one log key sealed in the database (``load_or_create_shared_log_key``):
a data directory's key, if there is one, becomes the shared key, so pinned keys stay valid.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.adapters.keys.file_store import write_private
from meshca.adapters.keys.sealed import LOG_KEY_REF, SealedKeys

__all__ = [
    "load_log_key",
    "load_or_create_log_key",
    "load_or_create_shared_log_key",
    "log_key_path",
    "public_key_pem",
]


def log_key_path(data_dir: Path) -> Path:
    return data_dir / "log" / "log-key.pem"


def load_log_key(data_dir: Path) -> ec.EllipticCurvePrivateKey:
    """The existing log key; ``FileNotFoundError`` if there is none yet."""
    key = serialization.load_pem_private_key(log_key_path(data_dir).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{log_key_path(data_dir)} is not an EC private key")
    return key


def load_or_create_log_key(data_dir: Path) -> ec.EllipticCurvePrivateKey:
    """The log key, made (EC P-256) on first use; concurrent callers make one key."""
    path = log_key_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    with open(path.parent / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not path.exists():
                key = ec.generate_private_key(ec.SECP256R1())
                write_private(
                    path,
                    key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    ),
                )
            return load_log_key(data_dir)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load_or_create_shared_log_key(keys: SealedKeys, data_dir: Path) -> ec.EllipticCurvePrivateKey:
    """The log key every replica uses: sealed in the database, made once by the first.

    A replica's existing file key is offered first, so a single host that starts sealing
    keeps the key its auditors pinned; when several offer at once, the first one stored wins.
    """
    key = keys.get(LOG_KEY_REF)
    if key is None:
        offered = (
            load_log_key(data_dir)
            if log_key_path(data_dir).exists()
            else ec.generate_private_key(ec.SECP256R1())
        )
        keys.put(LOG_KEY_REF, offered)
        key = keys.get(LOG_KEY_REF)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"the database's {LOG_KEY_REF} is not an EC private key")
    return key


def public_key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
