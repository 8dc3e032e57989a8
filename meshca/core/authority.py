"""Signing authorities: the certificate and signer that issue leaves, and how to make them.

Keys are inputs: callers generate or load them (a KeyManager), and pass the signer in.
The signer may be any cryptography private-key object, including one backed by an HSM or
Vault that never exposes key bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from meshca.core.leaf_der import LeafTemplate
from meshca.core.spiffe import TrustDomain

__all__ = [
    "Authority",
    "SignerKey",
    "authority_key_identifier",
    "build_intermediate",
    "build_root",
    "hash_for",
    "trust_domain_ids",
]

SignerKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def trust_domain_ids(cert: x509.Certificate) -> list[str]:
    """The ``spiffe://`` URIs a CA certificate names (none for most organisation roots)."""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        u
        for u in names.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith("spiffe://")
    ]


def hash_for(key: SignerKey) -> hashes.SHA256 | hashes.SHA384 | None:
    """The digest to sign with: SHA-384 for P-384 keys, none for Ed25519, else SHA-256."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


@dataclass(frozen=True)
class Authority:
    """An issuing CA: its certificate, its signer, the chain up to a root, and the roots.

    ``chain`` holds the intermediates from the issuer up to (excluding) the root, issuer
    first; ``roots`` is the trust bundle that relying parties verify against.
    """

    certificate: x509.Certificate
    signer: SignerKey
    chain: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]

    # Derived once per authority, not once per certificate: issuance is the hot path.
    # (cached_property writes the instance dict directly, which a frozen dataclass allows.)

    @cached_property
    def not_before(self) -> datetime:
        return self.certificate.not_valid_before_utc

    @cached_property
    def not_after(self) -> datetime:
        """The end of the issuer's usable life: the earliest expiry on its chain."""
        return min(c.not_valid_after_utc for c in (self.certificate, *self.chain))

    @cached_property
    def key_identifier(self) -> x509.AuthorityKeyIdentifier:
        """The AKI of every certificate this authority signs."""
        return authority_key_identifier(self.certificate, self.signer)

    @cached_property
    def signature_hash(self) -> hashes.SHA256 | hashes.SHA384 | None:
        return hash_for(self.signer)

    @cached_property
    def subject_der(self) -> bytes:
        """The issuer name of every certificate this authority signs, DER."""
        return self.certificate.subject.public_bytes()

    @cached_property
    def leaf_template(self) -> LeafTemplate | None:
        """The DER template of this authority's leaves; None for a key it does not cover."""
        return LeafTemplate.for_issuer(
            self.signer, self.signature_hash, self.subject_der, self.key_identifier.public_bytes()
        )

    @cached_property
    def anchor(self) -> x509.Certificate | None:
        """The root that ``chain`` ends under (the first root when none names it)."""
        top = self.chain[-1] if self.chain else self.certificate
        named = [r for r in self.roots if r.subject == top.issuer]
        candidates = named or list(self.roots)
        return candidates[0] if candidates else None

    @cached_property
    def chain_pems(self) -> tuple[str, ...]:
        """PEM of the issuer and its intermediates up to the root, issuer first."""
        return tuple(c.public_bytes(Encoding.PEM).decode() for c in (self.certificate, *self.chain))

    @cached_property
    def roots_pems(self) -> tuple[str, ...]:
        return tuple(c.public_bytes(Encoding.PEM).decode() for c in self.roots)

    @cached_property
    def anchor_pem(self) -> str | None:
        return None if self.anchor is None else self.anchor.public_bytes(Encoding.PEM).decode()

    def chain_pem(self) -> list[str]:
        return list(self.chain_pems)

    def roots_pem(self) -> list[str]:
        return list(self.roots_pems)


def authority_key_identifier(
    issuer: x509.Certificate, issuer_key: SignerKey
) -> x509.AuthorityKeyIdentifier:
    """The AKI for certificates ``issuer`` signs: a copy of the issuer's own SKI.

    RFC 5280 lets a CA derive its SKI by any method, and path builders (OpenSSL,
    BoringSSL) skip an issuer whose SKI differs from the child's AKI; recomputing the
    key ID from the public key only matches issuers that used RFC 5280 method 1.
    """
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _ca_extensions(
    builder: x509.CertificateBuilder,
    subject_key: object,
    trust_domain: TrustDomain,
    path_length: int | None,
) -> x509.CertificateBuilder:
    assert isinstance(
        subject_key,
        ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey,
    )
    return (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), False)
        # A signing certificate may carry its trust domain's SPIFFE ID, never a path.
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(trust_domain.id)]),
            False,
        )
    )


def _ca_name(trust_domain: TrustDomain, role: str, serial: int) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshca"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain.name[:64]),
            # The serial's prefix keeps names unique across rotations.
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshca {role} {serial:x}"[:64]),
        ]
    )


def build_root(
    key: SignerKey, trust_domain: TrustDomain, now: datetime, ttl: timedelta, serial: int
) -> x509.Certificate:
    """A self-signed root valid from ``now`` for ``ttl``."""
    name = _ca_name(trust_domain, "root", serial)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + ttl)
    )
    builder = _ca_extensions(builder, key.public_key(), trust_domain, None)
    return builder.sign(key, hash_for(key))


def build_intermediate(
    subject_public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey,
    issuer: x509.Certificate,
    issuer_key: SignerKey,
    trust_domain: TrustDomain,
    now: datetime,
    ttl: timedelta,
    serial: int,
) -> x509.Certificate:
    """An intermediate under ``issuer``, never outliving it, that may sign only leaves."""
    not_after = min(now + ttl, issuer.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_ca_name(trust_domain, "intermediate", serial))
        .issuer_name(issuer.subject)
        .public_key(subject_public_key)
        .serial_number(serial)
        .not_valid_before(max(now, issuer.not_valid_before_utc))
        .not_valid_after(not_after)
        .add_extension(authority_key_identifier(issuer, issuer_key), False)
    )
    builder = _ca_extensions(builder, subject_public_key, trust_domain, 0)
    return builder.sign(issuer_key, hash_for(issuer_key))
