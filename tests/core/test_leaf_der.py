"""The DER leaf template: byte for byte what CertificateBuilder makes, for any input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshca.core.authority import Authority
from meshca.core.csr import parse_csr
from meshca.core.issuance import issue_leaf, issue_leaf_der
from meshca.core.leaf_der import LeafTemplate, certificate_pem, subject_key_identifier
from meshca.core.spiffe import SpiffeId
from meshca.core.svid_rules import check_leaf_svid
from tests.core.builders import ACCEPTED_KEY_KINDS, NOW, Pki, build_pki, csr_der, private_key

ISSUER_KINDS = ("ec-p256", "ec-p384", "rsa-2048", "ed25519")


@pytest.fixture(scope="module")
def issuers() -> dict[str, Pki]:
    # Valid 1950..2100, so any validity drawn below fits inside the issuer.
    start = datetime(1950, 1, 1, tzinfo=UTC)
    return {
        kind: build_pki(
            now=start,
            root_ttl=timedelta(days=365 * 151),
            intermediate_ttl=timedelta(days=365 * 151),
            intermediate_kind=kind,
        )
        for kind in ISSUER_KINDS
    }


def _verify(issuer: Authority, cert: x509.Certificate) -> None:
    """The certificate's signature is the issuer's, over its TBS bytes."""
    public = issuer.signer.public_key()
    signature, tbs = cert.signature, cert.tbs_certificate_bytes
    if isinstance(public, ec.EllipticCurvePublicKey):
        assert cert.signature_hash_algorithm is not None
        public.verify(signature, tbs, ec.ECDSA(cert.signature_hash_algorithm))
    elif isinstance(public, rsa.RSAPublicKey):
        assert cert.signature_hash_algorithm is not None
        public.verify(signature, tbs, padding.PKCS1v15(), cert.signature_hash_algorithm)
    else:
        assert isinstance(public, ed25519.Ed25519PublicKey)
        public.verify(signature, tbs)


times = st.datetimes(
    min_value=datetime(1950, 1, 1), max_value=datetime(2099, 12, 31), timezones=st.just(UTC)
)
segments = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._", min_size=1, max_size=60)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    issuer_kind=st.sampled_from(ISSUER_KINDS),
    key_kind=st.sampled_from(ACCEPTED_KEY_KINDS),
    serial=st.integers(min_value=1, max_value=2**159 - 1),
    first=times,
    second=times,
    path=st.lists(segments.filter(lambda s: s not in {".", ".."}), min_size=1, max_size=4),
)
def test_template_tbs_equals_certificate_builder(
    issuers: dict[str, Pki],
    issuer_kind: str,
    key_kind: str,
    serial: int,
    first: datetime,
    second: datetime,
    path: list[str],
) -> None:
    issuer = issuers[issuer_kind].authority
    csr = parse_csr(csr_der(private_key(key_kind)))
    spiffe_id = SpiffeId.parse("spiffe://example.org/" + "/".join(path))
    not_before, not_after = min(first, second), max(first, second)

    built = issue_leaf(csr, spiffe_id, issuer, not_before, not_after, serial)
    made = x509.load_der_x509_certificate(
        issue_leaf_der(csr, spiffe_id, issuer, not_before, not_after, serial)
    )

    assert made.tbs_certificate_bytes == built.tbs_certificate_bytes
    assert made.signature_algorithm_oid == built.signature_algorithm_oid
    _verify(issuer, made)


@pytest.mark.parametrize("issuer_kind", ISSUER_KINDS)
@pytest.mark.parametrize("key_kind", ACCEPTED_KEY_KINDS)
def test_template_leaves_pass_the_svid_rules(
    issuers: dict[str, Pki], issuer_kind: str, key_kind: str
) -> None:
    issuer = issuers[issuer_kind].authority
    csr = parse_csr(csr_der(private_key(key_kind)))
    spiffe_id = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")
    leaf = issue_leaf_der(csr, spiffe_id, issuer, NOW, NOW + timedelta(hours=1), 2**70 + 5)
    check_leaf_svid(leaf, spiffe_id, issuer)
    assert x509.load_der_x509_certificate(leaf).public_key() == csr.public_key


@pytest.mark.parametrize("kind", ACCEPTED_KEY_KINDS)
def test_subject_key_identifier_is_rfc5280_method_1(kind: str) -> None:
    public = private_key(kind).public_key()
    assert isinstance(
        public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    )
    spki = public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    expected = x509.SubjectKeyIdentifier.from_public_key(public).digest
    assert subject_key_identifier(spki) == expected


@pytest.mark.parametrize(
    ("signer_kind", "digest"),
    [
        pytest.param("ec-p256", None, id="none/ecdsa-without-digest"),
        pytest.param("ec-p256", hashes.SHA1(), id="none/ecdsa-sha1"),
        pytest.param("rsa-2048", hashes.MD5(), id="none/rsa-md5"),
        pytest.param("ed25519", hashes.SHA256(), id="none/ed25519-with-digest"),
        pytest.param("dsa-2048", hashes.SHA256(), id="none/dsa"),
    ],
)
def test_no_template_for_what_it_does_not_cover(
    signer_kind: str, digest: hashes.HashAlgorithm | None
) -> None:
    signer = private_key(signer_kind)
    assert LeafTemplate.for_issuer(signer, digest, b"\x30\x00", b"\x30\x00") is None


def test_pem_is_what_cryptography_writes(issuers: dict[str, Pki]) -> None:
    for pki in issuers.values():
        for cert in (pki.root, pki.intermediate):
            assert certificate_pem(cert.public_bytes(Encoding.DER)) == (
                cert.public_bytes(Encoding.PEM).decode()
            )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    issuer_kind=st.sampled_from(ISSUER_KINDS),
    names=st.lists(
        st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,80}[a-z0-9])?", fullmatch=True), max_size=3
    ),
)
def test_template_with_dns_names_equals_certificate_builder(
    issuers: dict[str, Pki], issuer_kind: str, names: list[str]
) -> None:
    issuer = issuers[issuer_kind].authority
    csr = parse_csr(csr_der())
    spiffe_id = SpiffeId.parse("spiffe://example.org/ns/emojivoto/sa/web")
    not_after = NOW + timedelta(hours=1)

    built = issue_leaf(
        csr, spiffe_id, issuer, NOW, not_after, 2**70, [x509.DNSName(n) for n in names]
    )
    made = issue_leaf_der(csr, spiffe_id, issuer, NOW, not_after, 2**70, names)

    assert x509.load_der_x509_certificate(made).tbs_certificate_bytes == built.tbs_certificate_bytes
    check_leaf_svid(made, spiffe_id, issuer, names)
