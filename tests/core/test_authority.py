"""Roots and intermediates: X509-SVID signing-certificate rules, windows, key IDs, lint."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtensionOID

from meshca.core.authority import (
    Authority,
    SignerKey,
    authority_key_identifier,
    build_intermediate,
    build_root,
    hash_for,
)
from meshca.core.spiffe import SpiffeId
from tests.core.builders import NOW, TRUST_DOMAIN, build_pki, lint_findings, signer_key

ISSUER_KINDS = ("ec-p256", "ec-p384", "rsa-2048", "rsa-4096", "ed25519")
URI_FALSE_POSITIVE = frozenset({"pkix.invalid_uri_syntax"})


def _ext(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_oid(oid)


def _assert_signing_certificate(cert: x509.Certificate, path_length: int | None) -> None:
    """X509-SVID §4.1, §4.3 and §3.2 for signing certificates."""
    bc = _ext(cert, ExtensionOID.BASIC_CONSTRAINTS)
    assert bc.critical
    assert bc.value == x509.BasicConstraints(ca=True, path_length=path_length)
    ku = _ext(cert, ExtensionOID.KEY_USAGE)
    assert ku.critical
    assert isinstance(ku.value, x509.KeyUsage)
    assert ku.value.key_cert_sign
    assert ku.value.crl_sign
    assert not ku.value.digital_signature
    ski = _ext(cert, ExtensionOID.SUBJECT_KEY_IDENTIFIER).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    san = _ext(cert, ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert isinstance(san, x509.SubjectAlternativeName)
    (uri,) = san.get_values_for_type(x509.UniformResourceIdentifier)
    # A signing certificate's SPIFFE ID is its trust domain's, never a workload path.
    assert uri == TRUST_DOMAIN.id
    assert not SpiffeId.parse(uri).is_workload
    assert len(cert.subject) > 0


@pytest.mark.parametrize("kind", ISSUER_KINDS)
def test_root(kind: str) -> None:
    key = signer_key(kind, 1)
    root = build_root(key, TRUST_DOMAIN, NOW, timedelta(days=365), serial=0xABCDEF0123456789)
    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)
    assert root.serial_number == 0xABCDEF0123456789
    assert root.not_valid_before_utc == NOW
    assert root.not_valid_after_utc == NOW + timedelta(days=365)
    assert root.public_key() == key.public_key()
    _assert_signing_certificate(root, path_length=None)


def test_root_names_are_unique_per_serial() -> None:
    key = signer_key("ec-p256", 1)
    first = build_root(key, TRUST_DOMAIN, NOW, timedelta(days=1), serial=2**70 + 1)
    second = build_root(key, TRUST_DOMAIN, NOW, timedelta(days=1), serial=2**70 + 2)
    assert first.subject != second.subject


@pytest.mark.parametrize("root_kind", ["ec-p384", "rsa-2048"])
@pytest.mark.parametrize("kind", ISSUER_KINDS)
def test_intermediate(kind: str, root_kind: str) -> None:
    pki = build_pki(root_kind=root_kind, intermediate_kind=kind)
    inter = pki.intermediate
    inter.verify_directly_issued_by(pki.root)
    assert inter.issuer == pki.root.subject
    assert inter.subject != pki.root.subject
    assert inter.public_key() == pki.intermediate_key.public_key()
    _assert_signing_certificate(inter, path_length=0)
    aki = _ext(inter, ExtensionOID.AUTHORITY_KEY_IDENTIFIER).value
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    root_ski = _ext(pki.root, ExtensionOID.SUBJECT_KEY_IDENTIFIER).value
    assert isinstance(root_ski, x509.SubjectKeyIdentifier)
    assert aki.key_identifier == root_ski.digest


@pytest.mark.parametrize(
    ("start", "ttl", "expected_start", "expected_end"),
    [
        pytest.param(NOW, timedelta(days=30), NOW, NOW + timedelta(days=30), id="ok/inside-root"),
        pytest.param(
            NOW + timedelta(days=360),
            timedelta(days=30),
            NOW + timedelta(days=360),
            NOW + timedelta(days=365),
            id="ok/capped-to-root-expiry",
        ),
        pytest.param(
            NOW - timedelta(hours=1),
            timedelta(days=1),
            NOW,
            NOW + timedelta(days=1) - timedelta(hours=1),
            id="ok/never-before-root",
        ),
    ],
)
def test_intermediate_window_stays_inside_the_root(
    start: datetime, ttl: timedelta, expected_start: datetime, expected_end: datetime
) -> None:
    root_key = signer_key("ec-p384", 1)
    root = build_root(root_key, TRUST_DOMAIN, NOW, timedelta(days=365), serial=2**64 + 1)
    inter = build_intermediate(
        signer_key("ec-p256", 2).public_key(),
        root,
        root_key,
        TRUST_DOMAIN,
        start,
        ttl,
        serial=2**64 + 2,
    )
    assert inter.not_valid_before_utc == expected_start
    assert inter.not_valid_after_utc == expected_end


def _with_ski(cert: x509.Certificate, signer: SignerKey, ski: bytes) -> x509.Certificate:
    """``cert`` re-signed by ``signer`` with its SKI replaced by ``ski``."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())  # type: ignore[arg-type]
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for ext in cert.extensions:
        value = ext.value
        if isinstance(value, x509.SubjectKeyIdentifier):
            value = x509.SubjectKeyIdentifier(ski)
        builder = builder.add_extension(value, ext.critical)
    return builder.sign(signer, hash_for(signer))


def _sha1_of_whole_spki(cert: x509.Certificate) -> bytes:
    """A key ID as some CAs derive it: SHA-1 over the whole SubjectPublicKeyInfo."""
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    # SHA-1 names a key here; nothing relies on its collision resistance.
    return hashlib.sha1(spki).digest()


def test_intermediate_aki_copies_a_root_ski_made_another_way() -> None:
    """Regression: the AKI was recomputed from the key, so it matched only method-1 SKIs.

    An upstream CA (Vault, a corporate PKI) may derive its SKI differently; OpenSSL and
    BoringSSL then refuse to chain a certificate whose AKI differs from its issuer's SKI.
    """
    pki = build_pki()
    odd_ski = _sha1_of_whole_spki(pki.root)
    root = _with_ski(pki.root, pki.root_key, odd_ski)
    inter = build_intermediate(
        pki.intermediate_key.public_key(),
        root,
        pki.root_key,
        TRUST_DOMAIN,
        NOW,
        timedelta(days=1),
        serial=2**64 + 3,
    )
    aki = _ext(inter, ExtensionOID.AUTHORITY_KEY_IDENTIFIER).value
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    assert aki.key_identifier == odd_ski
    assert authority_key_identifier(root, pki.root_key).key_identifier == odd_ski


def test_authority_key_identifier_without_issuer_ski_uses_the_key() -> None:
    key = signer_key("ec-p256", 1)
    bare = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    assert authority_key_identifier(
        bare, key
    ) == x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())


@pytest.mark.parametrize(
    ("kind", "algorithm"),
    [
        pytest.param("ec-p256", hashes.SHA256, id="ok/p256-sha256"),
        pytest.param("ec-p384", hashes.SHA384, id="ok/p384-sha384"),
        pytest.param("rsa-2048", hashes.SHA256, id="ok/rsa-sha256"),
        pytest.param("rsa-4096", hashes.SHA256, id="ok/rsa4096-sha256"),
        pytest.param("ed25519", None, id="ok/ed25519-pure"),
    ],
)
def test_hash_for(kind: str, algorithm: type[hashes.HashAlgorithm] | None) -> None:
    key = signer_key(kind, 1)
    chosen = hash_for(key)
    root = build_root(key, TRUST_DOMAIN, NOW, timedelta(days=1), serial=2**64)
    if algorithm is None:
        assert chosen is None
        assert root.signature_hash_algorithm is None
    else:
        assert isinstance(chosen, algorithm)
        assert isinstance(root.signature_hash_algorithm, algorithm)


def test_authority_window_is_the_earliest_expiry_on_its_chain() -> None:
    pki = build_pki(intermediate_ttl=timedelta(days=30))
    short = build_pki(now=NOW - timedelta(days=20), intermediate_ttl=timedelta(days=25))
    authority = Authority(
        certificate=pki.intermediate,
        signer=pki.intermediate_key,
        chain=(short.intermediate,),
        roots=(pki.root,),
    )
    assert authority.not_before == pki.intermediate.not_valid_before_utc
    assert authority.not_after == NOW + timedelta(days=5)
    assert authority.chain_pem() == [
        pki.intermediate.public_bytes(Encoding.PEM).decode(),
        short.intermediate.public_bytes(Encoding.PEM).decode(),
    ]
    assert authority.roots_pem() == [pki.root.public_bytes(Encoding.PEM).decode()]
    with pytest.raises(dataclasses.FrozenInstanceError):
        authority.chain = ()  # type: ignore[misc]


@pytest.mark.parametrize("kind", ISSUER_KINDS)
def test_root_and_intermediate_pass_pkilint(kind: str) -> None:
    """RFC 5280 lint, as ``lint_pkix_cert`` runs it; only the spiffe:// false positive goes.

    pkilint checks URIs with ``validators.url``, which knows only web schemes (http, ftp,
    ...), so every ``spiffe://`` URI is reported as ``pkix.invalid_uri_syntax`` (ERROR).
    """
    pki = build_pki(root_kind=kind, intermediate_kind=kind)
    for cert in (pki.root, pki.intermediate):
        findings = lint_findings(cert, ignore=URI_FALSE_POSITIVE)
        assert findings == [], "\n".join(findings)
