"""Keys, CSRs, authorities and hand-made certificates for the core tests.

Keys are generated once per ``(kind, instance)`` and cached for the whole run, so RSA and
DSA generation stays out of every test's hot path. Times are whole seconds because X.509
encodes no fractions: a value with microseconds would not survive a round trip.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pkilint import loader
from pkilint.pkix import certificate, extension, name
from pkilint.validation import ValidationFindingSeverity, ValidatorContainer

from meshca.core.authority import Authority, SignerKey, build_intermediate, build_root
from meshca.core.spiffe import SpiffeId, TrustDomain

__all__ = [
    "ACCEPTED_KEY_KINDS",
    "ALL_KEY_KINDS",
    "NOW",
    "TRUST_DOMAIN",
    "WEAK_KEY_KINDS",
    "WORKLOAD_ID",
    "Pki",
    "PrivateKey",
    "build_csr",
    "build_pki",
    "csr_der",
    "csr_pem",
    "custom_leaf",
    "flip_byte",
    "key_usage",
    "leaf_extensions",
    "lint_findings",
    "private_key",
    "replace_once",
    "signer_key",
    "tamper_body",
    "tamper_signature",
]

PrivateKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)

#: Keys our CSR policy accepts: ECDSA P-256/P-384, Ed25519, RSA >= 2048 with e = 65537.
ACCEPTED_KEY_KINDS = ("ec-p256", "ec-p384", "ed25519", "rsa-2048", "rsa-4096")
#: Keys it refuses with WeakKey: other curves, Ed448, DSA, short RSA, RSA with e = 3.
WEAK_KEY_KINDS = ("ec-p521", "ec-secp256k1", "ed448", "rsa-1024", "rsa-2048-e3", "dsa-2048")
ALL_KEY_KINDS = ACCEPTED_KEY_KINDS + WEAK_KEY_KINDS

TRUST_DOMAIN = TrustDomain("example.org")
WORKLOAD_ID = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")
NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)

#: Text placed in a CSR's subject so ``tamper_body`` can find a harmless byte to flip.
TAMPER_MARKER = "tamper-me"


@functools.cache
def private_key(kind: str, instance: int = 0) -> PrivateKey:
    """One key of ``kind`` per ``instance``, generated on first use and then reused."""
    match kind:
        case "ec-p256":
            return ec.generate_private_key(ec.SECP256R1())
        case "ec-p384":
            return ec.generate_private_key(ec.SECP384R1())
        case "ec-p521":
            return ec.generate_private_key(ec.SECP521R1())
        case "ec-secp256k1":
            return ec.generate_private_key(ec.SECP256K1())
        case "ed25519":
            return ed25519.Ed25519PrivateKey.generate()
        case "ed448":
            return ed448.Ed448PrivateKey.generate()
        case "rsa-1024":
            return rsa.generate_private_key(public_exponent=65537, key_size=1024)
        case "rsa-2048":
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        case "rsa-2048-e3":
            return rsa.generate_private_key(public_exponent=3, key_size=2048)
        case "rsa-4096":
            return rsa.generate_private_key(public_exponent=65537, key_size=4096)
        case "dsa-2048":
            return dsa.generate_private_key(key_size=2048)
        case _:
            raise ValueError(f"unknown key kind {kind!r}")


def signer_key(kind: str, instance: int) -> SignerKey:
    """A key a meshca authority can sign with (ECDSA, RSA or Ed25519)."""
    key = private_key(kind, instance)
    assert isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    )
    return key


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm | None:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def key_usage(
    *,
    digital_signature: bool = True,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def build_csr(
    key: PrivateKey | None = None,
    *,
    uris: Sequence[str] = (),
    dns: Sequence[str] = (),
    ca: bool | None = None,
    usage: x509.KeyUsage | None = None,
    subject: str | None = TAMPER_MARKER,
) -> x509.CertificateSigningRequest:
    """A CSR signed by ``key`` (default: a cached P-256 key) asking for the given names."""
    key = key if key is not None else private_key("ec-p256")
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, subject)] if subject else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    return builder.sign(key, _hash_for(key))


def csr_der(key: PrivateKey | None = None, **options: Any) -> bytes:
    return build_csr(key, **options).public_bytes(Encoding.DER)


def csr_pem(key: PrivateKey | None = None, **options: Any) -> bytes:
    return build_csr(key, **options).public_bytes(Encoding.PEM)


def flip_byte(data: bytes, index: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[index] ^= mask
    return bytes(out)


def replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    """Swap one occurrence of ``old`` for ``new``; the test is wrong if it is not unique."""
    assert data.count(old) == 1, f"{old.hex()} occurs {data.count(old)} times"
    return data.replace(old, new)


def tamper_signature(der: bytes) -> bytes:
    """Flip the last byte, which always lies inside the signature BIT STRING."""
    return flip_byte(der, len(der) - 1)


def tamper_body(der: bytes) -> bytes:
    """Change one letter of the subject: still well-formed DER, no longer what was signed."""
    at = der.index(TAMPER_MARKER.encode())
    return flip_byte(der, at)


@dataclass(frozen=True)
class Pki:
    """A root, an intermediate under it, and the intermediate as meshca's issuer."""

    root: x509.Certificate
    root_key: SignerKey
    intermediate: x509.Certificate
    intermediate_key: SignerKey
    authority: Authority


def build_pki(
    *,
    now: datetime = NOW,
    root_ttl: timedelta = timedelta(days=365),
    intermediate_ttl: timedelta = timedelta(days=30),
    root_kind: str = "ec-p384",
    intermediate_kind: str = "ec-p256",
    trust_domain: TrustDomain = TRUST_DOMAIN,
) -> Pki:
    root_key = signer_key(root_kind, 1)
    intermediate_key = signer_key(intermediate_kind, 2)
    root = build_root(root_key, trust_domain, now, root_ttl, serial=0x1000_0000_0000_0001)
    intermediate = build_intermediate(
        intermediate_key.public_key(),
        root,
        root_key,
        trust_domain,
        now,
        intermediate_ttl,
        serial=0x2000_0000_0000_0002,
    )
    authority = Authority(
        certificate=intermediate, signer=intermediate_key, chain=(), roots=(root,)
    )
    return Pki(root, root_key, intermediate, intermediate_key, authority)


def leaf_extensions(
    spiffe_id: str = str(WORKLOAD_ID),
) -> list[tuple[x509.ExtensionType, bool]]:
    """The extensions of a correct leaf SVID; tests drop or replace one at a time."""
    return [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (key_usage(), True),
        (
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            False,
        ),
        (x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), True),
    ]


def custom_leaf(
    issuer: Authority,
    *,
    extensions: Iterable[tuple[x509.ExtensionType, bool]] | None = None,
    subject: x509.Name | None = None,
    issuer_name: x509.Name | None = None,
    serial: int = 0x7A3F_19C2_55D0_8E41_B6,
    not_before: datetime = NOW - timedelta(seconds=60),
    not_after: datetime = NOW + timedelta(hours=1),
) -> x509.Certificate:
    """A leaf signed by ``issuer`` exactly as described, right or wrong."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject if subject is not None else x509.Name([]))
        .issuer_name(issuer_name if issuer_name is not None else issuer.certificate.subject)
        .public_key(signer_key("ec-p256", 0).public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for ext, critical in extensions if extensions is not None else leaf_extensions():
        builder = builder.add_extension(ext, critical)
    return builder.sign(issuer.signer, _hash_for(issuer.signer))


@functools.cache
def _pkix_validator() -> ValidatorContainer:
    """pkilint's RFC 5280 certificate validator, built as its ``lint_pkix_cert`` CLI does."""
    return certificate.create_pkix_certificate_validator_container(
        certificate.create_decoding_validators(
            name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS
        ),
        [
            certificate.create_issuer_validator_container([]),
            certificate.create_validity_validator_container(),
            certificate.create_subject_validator_container([]),
            certificate.create_extensions_validator_container([]),
            certificate.create_spki_validator_container([]),
        ],
    )


def lint_findings(
    cert: x509.Certificate,
    *,
    ignore: frozenset[str] = frozenset(),
    threshold: ValidationFindingSeverity = ValidationFindingSeverity.WARNING,
) -> list[str]:
    """pkilint findings at ``threshold`` or worse, as ``"SEVERITY code: message"`` lines."""
    document = loader.RFC5280CertificateDocumentLoader().load_der_document(
        cert.public_bytes(Encoding.DER), "certificate"
    )
    lines = []
    for result in _pkix_validator().validate(document.root):
        for description in result.finding_descriptions:
            finding = description.finding
            if finding.severity <= threshold and finding.code not in ignore:
                lines.append(
                    f"{finding.severity.name} {finding.code} at {result.node.path}: "
                    f"{description.message or ''}"
                )
    return lines
