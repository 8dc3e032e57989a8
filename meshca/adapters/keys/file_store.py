"""The CA files of a data directory from before the authority journal (files 0600).

meshca now keeps its authorities in the journal (``service.authority``) and their keys
under ``ca/keys``; on first start the files here are adopted into the journal
(``FileCaStore.adopt``). ``load_or_create`` is the old behaviour, kept for tools that
still read this layout.

On first start it creates an ECDSA P-256 root and an intermediate under it, and reuses
them on later starts. Creation holds a lock so concurrent starters make one CA, and
files are written atomically so a crash never leaves half a CA behind.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.core.authority import (
    Authority,
    SignerKey,
    build_intermediate,
    build_root,
    trust_domain_ids,
)
from meshca.core.rotation import (
    AuthorityEntry,
    AuthorityKind,
    AuthoritySource,
    AuthorityState,
    entry_id,
)
from meshca.core.spiffe import TrustDomain

__all__ = ["FileCaStore", "new_serial", "write_atomically", "write_private"]

#: Key references of the pre-journal layout, relative to the ``ca`` directory.
LEGACY_ROOT_KEY = "file:root.key"
LEGACY_INTERMEDIATE_KEY = "file:intermediate.key"


def new_serial() -> int:
    """A positive 127-bit serial: a leading 1, the current millisecond, 80 random bits.

    Serials sort by issue time, so the issuance record's serial index grows at its end
    instead of at random pages, whose number grows with the log. 80 bits from the CSPRNG
    are more than the 64 RFC 5280 profiles ask for; the leading bit fixes the length
    (and the hex width, so text order is number order) until the year 4200.
    """
    return 1 << 126 | (time.time_ns() // 1_000_000) << 80 | secrets.randbits(80)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600."""
    write_atomically(path, data, 0o600)


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode`` (not narrowed by the umask): a temporary
    file in the same directory, fsync, rename, so a reader sees the old file or the new."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class FileCaStore:
    """The CA files under ``<data_dir>/ca``."""

    def __init__(self, data_dir: Path) -> None:
        self.directory = data_dir / "ca"

    @property
    def root_path(self) -> Path:
        return self.directory / "root.pem"

    @property
    def intermediate_path(self) -> Path:
        return self.directory / "intermediate.pem"

    @property
    def _root_key_path(self) -> Path:
        return self.directory / "root.key"

    @property
    def _intermediate_key_path(self) -> Path:
        return self.directory / "intermediate.key"

    def exists(self) -> bool:
        return self.root_path.exists() and self.intermediate_path.exists()

    def load_roots(self) -> tuple[x509.Certificate, ...]:
        """The roots of the trust bundle, without touching private keys."""
        return tuple(x509.load_pem_x509_certificates(self.root_path.read_bytes()))

    def load_or_create(
        self,
        trust_domain: TrustDomain,
        now: datetime,
        root_ttl: timedelta,
        intermediate_ttl: timedelta,
    ) -> Authority:
        """Load the CA, creating it first if absent or renewing an intermediate past half-life.

        A root from another trust domain is refused rather than silently replaced.
        """
        with self._locked():
            if not self._root_key_path.exists():
                self._create_root(trust_domain, now, root_ttl)
            root = x509.load_pem_x509_certificate(self.root_path.read_bytes())
            root_key = self._load_key(self._root_key_path)
            self._check_trust_domain(root, trust_domain)
            if self._intermediate_needs_renewal(now):
                self._create_intermediate(root, root_key, trust_domain, now, intermediate_ttl)
            intermediate = x509.load_pem_x509_certificate(self.intermediate_path.read_bytes())
            return Authority(
                certificate=intermediate,
                signer=self._load_key(self._intermediate_key_path),
                chain=(),
                roots=(root,),
            )

    def adopt(self, trust_domain: TrustDomain, now: datetime) -> list[AuthorityEntry]:
        """Journal entries (active, ``adopted``) for a CA made before the journal existed.

        Empty when there is no such CA. An intermediate whose key does not match (a
        crash in the middle of an old renewal) is left out: a new one is made at once.
        Raises ``ValueError`` for a root of another trust domain.
        """
        if not (self.root_path.exists() and self._root_key_path.exists()):
            return []
        root = x509.load_pem_x509_certificate(self.root_path.read_bytes())
        self._check_trust_domain(root, trust_domain)
        entries = [
            AuthorityEntry(
                id=entry_id(root),
                kind=AuthorityKind.ROOT,
                state=AuthorityState.ACTIVE,
                source=AuthoritySource.ADOPTED,
                certificate=root,
                parent_id=None,
                key_ref=LEGACY_ROOT_KEY,
                prepared_at=root.not_valid_before_utc,
                activated_at=now,
            )
        ]
        if self.intermediate_path.exists() and self._intermediate_key_path.exists():
            cert = x509.load_pem_x509_certificate(self.intermediate_path.read_bytes())
            key = self._load_key(self._intermediate_key_path)
            if cert.public_key() == key.public_key() and cert.issuer == root.subject:
                entries.append(
                    AuthorityEntry(
                        id=entry_id(cert),
                        kind=AuthorityKind.INTERMEDIATE,
                        state=AuthorityState.ACTIVE,
                        source=AuthoritySource.ADOPTED,
                        certificate=cert,
                        parent_id=entries[0].id,
                        key_ref=LEGACY_INTERMEDIATE_KEY,
                        prepared_at=cert.not_valid_before_utc,
                        activated_at=now,
                    )
                )
        return entries

    def _check_trust_domain(self, root: x509.Certificate, trust_domain: TrustDomain) -> None:
        named = trust_domain_ids(root)
        if trust_domain.id not in named:
            raise ValueError(
                f"the CA in {self.directory} belongs to another trust domain "
                f"({', '.join(named)}); use a fresh --data-dir for {trust_domain.id}"
            )

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        with open(self.directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _intermediate_needs_renewal(self, now: datetime) -> bool:
        if not (self.intermediate_path.exists() and self._intermediate_key_path.exists()):
            return True
        cert = x509.load_pem_x509_certificate(self.intermediate_path.read_bytes())
        key = self._load_key(self._intermediate_key_path)
        if cert.public_key() != key.public_key():
            return True  # a crash between writing the new key and its certificate
        half_life = (
            cert.not_valid_before_utc + (cert.not_valid_after_utc - cert.not_valid_before_utc) / 2
        )
        return now >= half_life

    def _create_root(self, trust_domain: TrustDomain, now: datetime, ttl: timedelta) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = build_root(key, trust_domain, now, ttl, new_serial())
        # Key first: a root certificate without its key would be unusable.
        write_private(self._root_key_path, _key_pem(key))
        write_private(self.root_path, cert.public_bytes(serialization.Encoding.PEM))

    def _create_intermediate(
        self,
        root: x509.Certificate,
        root_key: SignerKey,
        trust_domain: TrustDomain,
        now: datetime,
        ttl: timedelta,
    ) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = build_intermediate(
            key.public_key(), root, root_key, trust_domain, now, ttl, new_serial()
        )
        write_private(self._intermediate_key_path, _key_pem(key))
        write_private(self.intermediate_path, cert.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _load_key(path: Path) -> SignerKey:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, SignerKey)
        return key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
