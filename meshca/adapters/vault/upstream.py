"""Vault's PKI engine as meshca's upstream CA: its roots, and signing our intermediates.

Roots are the mount's self-signed issuers. meshca asks a specific issuer
(``<mount>/issuer/<id>/sign-intermediate``) rather than the mount's default, so that a
root rotated in Vault signs nothing of ours until meshca has published it for the
propagation delay.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshca.adapters.vault.client import VaultClient
from meshca.core.errors import BackendUnavailable
from meshca.core.ports import SignedIntermediate, UpstreamRoot
from meshca.core.spiffe import TrustDomain

__all__ = ["VaultUpstream"]


class VaultUpstream:
    """``UpstreamAuthority`` over a PKI mount."""

    def __init__(self, client: VaultClient, mount: str, trust_domain: TrustDomain) -> None:
        self._client = client
        self._mount = mount
        self._trust_domain = trust_domain

    def roots(self) -> Sequence[UpstreamRoot]:
        def read(_c: Any) -> list[UpstreamRoot]:
            listed = self._client.list(f"{self._mount}/issuers") or {}
            ids = list((listed.get("data") or {}).get("keys") or [])
            config = self._client.get(f"{self._mount}/config/issuers") or {}
            default = (config.get("data") or {}).get("default")
            found = []
            for issuer_id in ids:
                data = (self._client.get(f"{self._mount}/issuer/{issuer_id}") or {})["data"]
                cert = x509.load_pem_x509_certificate(str(data["certificate"]).encode())
                if cert.subject == cert.issuer:
                    found.append(UpstreamRoot(str(issuer_id), cert, issuer_id == default))
            return found

        return self._client.call(read, what=f"listing the roots of {self._mount}")

    def sign_intermediate(
        self, root_ref: str, csr: x509.CertificateSigningRequest, ttl: timedelta
    ) -> SignedIntermediate:
        payload = {
            "csr": csr.public_bytes(Encoding.PEM).decode(),
            "common_name": f"meshca intermediate {self._trust_domain.name}"[:64],
            "uri_sans": self._trust_domain.id,
            "ttl": f"{max(60, int(ttl.total_seconds()))}s",
            "max_path_length": 0,
            "use_csr_values": False,
            "format": "pem",
        }
        answer = self._client.call(
            lambda _c: self._client.post(
                f"{self._mount}/issuer/{root_ref}/sign-intermediate", payload
            ),
            what=f"signing meshca's intermediate with issuer {root_ref}",
        )
        data = answer["data"]
        certificate = x509.load_pem_x509_certificate(str(data["certificate"]).encode())
        chain_pems = data.get("ca_chain") or [data.get("issuing_ca")]
        chain = [x509.load_pem_x509_certificate(str(p).encode()) for p in chain_pems if p]
        # Keep the issuers between ours and the root; the root comes from the bundle.
        between = tuple(c for c in chain if c.subject != c.issuer and c != certificate)
        if certificate.public_key() != csr.public_key():
            raise BackendUnavailable("Vault returned a certificate for another key")
        return SignedIntermediate(certificate, between)
