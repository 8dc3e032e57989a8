"""``--out-dir``: the SVID and bundle as PEM files, for applications that read files.

``key.pem`` (mode 0600), ``chain.pem`` (leaf first) and ``bundle.pem`` are each replaced
atomically (write a temporary file in the same directory, fsync, rename), so a reader sees
the old file or the new one, never half of one. The key is written before the chain, so
a reader that sees a new chain finds its key already there.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.adapters.keys.file_store import write_atomically
from meshca.service.agent import AgentSnapshot

__all__ = ["write_snapshot"]


def _pem_certs(ders: tuple[bytes, ...]) -> bytes:
    return b"".join(
        x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM) for d in ders
    )


def write_snapshot(out_dir: Path, snapshot: AgentSnapshot) -> list[str]:
    """Write what ``snapshot`` holds; returns the names of the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if snapshot.svid is not None:
        key = serialization.load_der_private_key(snapshot.svid.key_der, password=None)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_atomically(out_dir / "key.pem", key_pem, 0o600)
        write_atomically(out_dir / "chain.pem", _pem_certs(snapshot.svid.chain_der), 0o644)
        written += ["key.pem", "chain.pem"]
    if snapshot.bundle is not None:
        write_atomically(out_dir / "bundle.pem", _pem_certs(snapshot.bundle.roots_der), 0o644)
        written.append("bundle.pem")
    return written
