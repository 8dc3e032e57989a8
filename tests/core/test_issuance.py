"""Leaf issuance: the X509-SVID profile, lifetimes, CSR authorization, and outside checks.

Outside checks: cryptography's RFC 5280 path validation, pkilint's RFC 5280 lint, and the
reference SPIFFE library's X509-SVID parser all accept what meshca issues.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID
from cryptography.x509.verification import PolicyBuilder, Store
from hypothesis import given, settings
from hypothesis import strategies as st

from meshca.core.authority import Authority, build_root, hash_for
from meshca.core.csr import CsrRequest, parse_csr
from meshca.core.errors import AuthorityNotReady, NotAuthorized
from meshca.core.issuance import (
    CLOCK_SKEW_BACKDATE,
    MIN_LEAF_LIFETIME,
    IssuancePolicy,
    authorize_csr,
    issue_leaf,
    leaf_lifetime,
)
from meshca.core.spiffe import SpiffeId
from meshca.core.svid_rules import check_leaf_svid
from tests.core.builders import (
    ACCEPTED_KEY_KINDS,
    NOW,
    TRUST_DOMAIN,
    WORKLOAD_ID,
    Pki,
    build_pki,
    csr_der,
    lint_findings,
    private_key,
    signer_key,
)

SERIAL = 0x5F3A_9C1E_7B20_44D8_91  # 71 bits, as a 64-bit-or-more random serial would be
URI_FALSE_POSITIVE = frozenset({"pkix.invalid_uri_syntax"})
HOUR = timedelta(hours=1)


@pytest.fixture(scope="module")
def pki() -> Pki:
    """An issuer made a day before NOW, so leaves at NOW get the full clock-skew backdate."""
    return build_pki(now=NOW - timedelta(days=1))


def _issue(
    pki: Pki,
    kind: str = "ec-p256",
    *,
    now: datetime = NOW,
    requested: timedelta | None = None,
    spiffe_id: SpiffeId = WORKLOAD_ID,
    **csr_options: object,
) -> tuple[x509.Certificate, CsrRequest]:
    csr = parse_csr(csr_der(private_key(kind), **csr_options))
    authorize_csr(csr, spiffe_id)
    not_before, not_after = leaf_lifetime(now, requested, IssuancePolicy(), pki.authority)
    leaf = issue_leaf(csr, spiffe_id, pki.authority, not_before, not_after, SERIAL)
    return leaf, csr


def _ext(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_oid(oid)


def _root_authority(not_before: datetime, lifetime: timedelta) -> Authority:
    """A self-signed issuer valid over exactly ``[not_before, not_before + lifetime]``."""
    key = signer_key("ec-p256", 3)
    root = build_root(key, TRUST_DOMAIN, not_before, lifetime, serial=2**64 + 7)
    return Authority(certificate=root, signer=key, chain=(), roots=(root,))


# --- the leaf profile ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ACCEPTED_KEY_KINDS)
def test_leaf_profile(pki: Pki, kind: str) -> None:
    leaf, csr = _issue(pki, kind)
    leaf.verify_directly_issued_by(pki.intermediate)
    assert leaf.public_key() == csr.public_key
    assert leaf.issuer == pki.intermediate.subject
    assert leaf.serial_number == SERIAL
    assert SERIAL > 0 and SERIAL.bit_length() >= 64

    # X509-SVID §2 and §3.1: one URI SAN, a non-root path, critical with an empty subject.
    assert len(leaf.subject) == 0
    san = _ext(leaf, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    assert san.critical
    assert isinstance(san.value, x509.SubjectAlternativeName)
    assert list(san.value) == [x509.UniformResourceIdentifier(str(WORKLOAD_ID))]

    # §4.1: CA:false, and meshca marks basicConstraints critical.
    bc = _ext(leaf, ExtensionOID.BASIC_CONSTRAINTS)
    assert bc.critical
    assert bc.value == x509.BasicConstraints(ca=False, path_length=None)

    # §4.3: critical keyUsage, digitalSignature; keyEncipherment only where RSA can use it.
    ku = _ext(leaf, ExtensionOID.KEY_USAGE)
    assert ku.critical
    is_rsa = isinstance(csr.public_key, rsa.RSAPublicKey)
    assert ku.value == x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=is_rsa,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )

    # §4.4: serverAuth and clientAuth.
    eku = _ext(leaf, ExtensionOID.EXTENDED_KEY_USAGE).value
    assert isinstance(eku, x509.ExtendedKeyUsage)
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]

    # Key identifiers: SKI from the leaf key; AKI equal to the issuer's SKI.
    ski = _ext(leaf, ExtensionOID.SUBJECT_KEY_IDENTIFIER).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(csr.public_key)
    aki = _ext(leaf, ExtensionOID.AUTHORITY_KEY_IDENTIFIER).value
    issuer_ski = _ext(pki.intermediate, ExtensionOID.SUBJECT_KEY_IDENTIFIER).value
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    assert isinstance(issuer_ski, x509.SubjectKeyIdentifier)
    assert aki.key_identifier == issuer_ski.digest

    # Lifetime: backdated exactly the skew allowance, default TTL, inside the issuer.
    assert leaf.not_valid_before_utc == NOW - CLOCK_SKEW_BACKDATE
    assert leaf.not_valid_after_utc == NOW + IssuancePolicy().default_ttl
    assert leaf.not_valid_before_utc >= pki.intermediate.not_valid_before_utc
    assert leaf.not_valid_after_utc <= pki.authority.not_after

    check_leaf_svid(leaf, WORKLOAD_ID, pki.authority)


def test_csr_extras_are_ignored(pki: Pki) -> None:
    """Subject, DNS names, CA and key-usage wishes in the CSR never reach the leaf."""
    leaf, _ = _issue(
        pki, subject="admin", dns=["evil.example.com"], uris=[str(WORKLOAD_ID)], ca=False
    )
    assert len(leaf.subject) == 0
    san = _ext(leaf, ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert list(san) == [x509.UniformResourceIdentifier(str(WORKLOAD_ID))]


def test_leaf_aki_copies_an_issuer_ski_made_another_way(pki: Pki) -> None:
    """Regression: the leaf AKI was recomputed from the issuer key (RFC 5280 method 1).

    An intermediate signed by an upstream CA may carry an SKI derived another way; a leaf
    whose AKI differs from it is not chained by OpenSSL or BoringSSL.
    """
    odd_ski = bytes(range(20))
    builder = (
        x509.CertificateBuilder()
        .subject_name(pki.intermediate.subject)
        .issuer_name(pki.intermediate.issuer)
        .public_key(pki.intermediate_key.public_key())
        .serial_number(pki.intermediate.serial_number)
        .not_valid_before(pki.intermediate.not_valid_before_utc)
        .not_valid_after(pki.intermediate.not_valid_after_utc)
    )
    for ext in pki.intermediate.extensions:
        value = ext.value
        if isinstance(value, x509.SubjectKeyIdentifier):
            value = x509.SubjectKeyIdentifier(odd_ski)
        builder = builder.add_extension(value, ext.critical)
    intermediate = builder.sign(pki.root_key, hash_for(pki.root_key))
    authority = Authority(intermediate, pki.intermediate_key, (), (pki.root,))
    csr = parse_csr(csr_der())
    not_before, not_after = leaf_lifetime(NOW, None, IssuancePolicy(), authority)
    leaf = issue_leaf(csr, WORKLOAD_ID, authority, not_before, not_after, SERIAL)
    aki = _ext(leaf, ExtensionOID.AUTHORITY_KEY_IDENTIFIER).value
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    assert aki.key_identifier == odd_ski


# --- outside checks -----------------------------------------------------------------------

# cryptography's verifier follows the Web PKI profile, which has no Ed25519 CA keys.
VERIFIABLE_ISSUERS = [
    pytest.param("ec-p384", "ec-p256", id="root-p384/int-p256"),
    pytest.param("ec-p256", "ec-p384", id="root-p256/int-p384"),
    pytest.param("rsa-4096", "rsa-2048", id="root-rsa4096/int-rsa2048"),
    pytest.param("rsa-2048", "ec-p256", id="root-rsa2048/int-p256"),
]


@pytest.mark.parametrize(("root_kind", "intermediate_kind"), VERIFIABLE_ISSUERS)
@pytest.mark.parametrize("kind", ACCEPTED_KEY_KINDS)
def test_chain_verifies_as_a_client_certificate(
    kind: str, root_kind: str, intermediate_kind: str
) -> None:
    pki = build_pki(now=NOW - HOUR, root_kind=root_kind, intermediate_kind=intermediate_kind)
    leaf, _ = _issue(pki, kind)
    verifier = PolicyBuilder().store(Store([pki.root])).time(NOW + HOUR).build_client_verifier()
    verified = verifier.verify(leaf, [pki.intermediate])
    assert verified.chain == [leaf, pki.intermediate, pki.root]
    assert verified.subjects == [x509.UniformResourceIdentifier(str(WORKLOAD_ID))]


@pytest.mark.parametrize("kind", ACCEPTED_KEY_KINDS)
def test_leaf_passes_pkilint(pki: Pki, kind: str) -> None:
    leaf, _ = _issue(pki, kind)
    findings = lint_findings(leaf, ignore=URI_FALSE_POSITIVE)
    assert findings == [], "\n".join(findings)


@pytest.mark.parametrize("kind", ACCEPTED_KEY_KINDS)
def test_reference_library_parses_the_svid(pki: Pki, kind: str) -> None:
    leaf, _ = _issue(pki, kind)
    chain_der = b"".join(
        c.public_bytes(serialization.Encoding.DER) for c in (leaf, pki.intermediate)
    )
    key_der = private_key(kind).private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    svid = spiffe.X509Svid.parse_raw(chain_der, key_der)
    assert str(svid.spiffe_id) == str(WORKLOAD_ID)
    assert svid.spiffe_id == spiffe.SpiffeId(str(WORKLOAD_ID))
    assert svid.leaf == leaf
    assert svid.cert_chain == [leaf, pki.intermediate]


# --- lifetimes ----------------------------------------------------------------------------

POLICY = IssuancePolicy(default_ttl=timedelta(hours=24), max_ttl=timedelta(hours=48))


@pytest.mark.parametrize(
    ("issuer_start", "issuer_life", "requested", "expected"),
    [
        pytest.param(
            NOW - HOUR,
            timedelta(days=30),
            None,
            (NOW - CLOCK_SKEW_BACKDATE, NOW + 24 * HOUR),
            id="ok/default-ttl",
        ),
        pytest.param(
            NOW - HOUR,
            timedelta(days=30),
            2 * HOUR,
            (NOW - CLOCK_SKEW_BACKDATE, NOW + 2 * HOUR),
            id="ok/requested-shorter",
        ),
        pytest.param(
            NOW - HOUR,
            timedelta(days=30),
            timedelta(days=7),
            (NOW - CLOCK_SKEW_BACKDATE, NOW + 48 * HOUR),
            id="ok/requested-capped-to-max",
        ),
        pytest.param(
            NOW - HOUR,
            timedelta(days=30),
            timedelta(0),
            (NOW - CLOCK_SKEW_BACKDATE, NOW + 24 * HOUR),
            id="ok/zero-means-default",
        ),
        pytest.param(
            NOW - HOUR,
            timedelta(days=30),
            -HOUR,
            (NOW - CLOCK_SKEW_BACKDATE, NOW + 24 * HOUR),
            id="ok/negative-means-default",
        ),
        pytest.param(
            NOW - HOUR,
            3 * HOUR,
            None,
            (NOW - CLOCK_SKEW_BACKDATE, NOW + 2 * HOUR),
            id="ok/capped-to-issuer-expiry",
        ),
        pytest.param(
            NOW - timedelta(seconds=10),
            timedelta(days=30),
            None,
            (NOW - timedelta(seconds=10), NOW + 24 * HOUR),
            id="ok/never-before-issuer",
        ),
        pytest.param(
            NOW,
            timedelta(days=30),
            None,
            (NOW, NOW + 24 * HOUR),
            id="ok/issuer-valid-from-now",
        ),
        pytest.param(
            NOW - HOUR,
            HOUR + MIN_LEAF_LIFETIME,
            None,
            (NOW - CLOCK_SKEW_BACKDATE, NOW + MIN_LEAF_LIFETIME),
            id="ok/issuer-has-exactly-the-minimum-left",
        ),
        # Regression: a short requested TTL raised AuthorityNotReady, blaming the CA.
        pytest.param(
            NOW - HOUR,
            timedelta(days=30),
            timedelta(seconds=10),
            (NOW - CLOCK_SKEW_BACKDATE, NOW + timedelta(seconds=10)),
            id="ok/short-requested-ttl-honoured",
        ),
    ],
)
def test_leaf_lifetime(
    issuer_start: datetime,
    issuer_life: timedelta,
    requested: timedelta | None,
    expected: tuple[datetime, datetime],
) -> None:
    issuer = _root_authority(issuer_start, issuer_life)
    assert leaf_lifetime(NOW, requested, POLICY, issuer) == expected


@pytest.mark.parametrize(
    ("issuer_start", "issuer_life"),
    [
        pytest.param(NOW - HOUR, HOUR + timedelta(seconds=59), id="fail/issuer-expires-in-59s"),
        pytest.param(NOW - HOUR, HOUR, id="fail/issuer-expires-now"),
        pytest.param(NOW - 2 * HOUR, HOUR, id="fail/issuer-expired"),
        # Regression: the window [issuer start, now + ttl] came back inverted.
        pytest.param(NOW + 2 * HOUR, timedelta(days=30), id="fail/issuer-not-yet-valid"),
        pytest.param(NOW + timedelta(seconds=1), timedelta(days=30), id="fail/issuer-valid-in-1s"),
    ],
)
def test_issuer_not_ready(issuer_start: datetime, issuer_life: timedelta) -> None:
    issuer = _root_authority(issuer_start, issuer_life)
    with pytest.raises(AuthorityNotReady) as caught:
        leaf_lifetime(NOW, HOUR, POLICY, issuer)
    assert caught.value.reason == "authority-not-ready"


SECOND = timedelta(seconds=1)


@settings(max_examples=200, deadline=None)
@given(
    issuer_start=st.integers(-10 * 86400, 10 * 86400),
    issuer_life=st.integers(1, 60 * 86400),
    now_offset=st.integers(-2 * 86400, 62 * 86400),
    now_micros=st.integers(0, 999_999),
    requested=st.none() | st.integers(-3600, 90 * 86400),
    default_ttl=st.integers(1, 30 * 86400),
    max_ttl=st.integers(1, 30 * 86400),
)
def test_property_leaf_never_outlives_its_issuer(
    issuer_start: int,
    issuer_life: int,
    now_offset: int,
    now_micros: int,
    requested: int | None,
    default_ttl: int,
    max_ttl: int,
) -> None:
    issuer = _root_authority(NOW + issuer_start * SECOND, issuer_life * SECOND)
    now = issuer.not_before + now_offset * SECOND + timedelta(microseconds=now_micros)
    policy = IssuancePolicy(default_ttl=default_ttl * SECOND, max_ttl=max_ttl * SECOND)
    wanted = None if requested is None else requested * SECOND
    try:
        not_before, not_after = leaf_lifetime(now, wanted, policy, issuer)
    except AuthorityNotReady:
        assert now < issuer.not_before or issuer.not_after - now < min(
            MIN_LEAF_LIFETIME, policy.max_ttl
        )
        return
    assert not_after <= issuer.not_after
    assert not_after <= now + policy.max_ttl
    assert not_before >= issuer.not_before
    assert now - CLOCK_SKEW_BACKDATE <= not_before <= now < not_after

    # The signed leaf keeps those bounds once times are encoded to whole seconds.
    csr = parse_csr(csr_der())
    leaf = issue_leaf(csr, WORKLOAD_ID, issuer, not_before, not_after, SERIAL)
    assert leaf.not_valid_after_utc <= issuer.not_after
    assert leaf.not_valid_before_utc >= issuer.not_before
    check_leaf_svid(leaf, WORKLOAD_ID, issuer)


# --- authorize_csr ------------------------------------------------------------------------

OWN = str(WORKLOAD_ID)


@pytest.mark.parametrize(
    "uris",
    [
        pytest.param([], id="ok/no-uri"),
        pytest.param([OWN], id="ok/exact-id"),
    ],
)
def test_authorize_csr_allows(uris: list[str]) -> None:
    authorize_csr(parse_csr(csr_der(uris=uris, dns=["ignored.example"])), WORKLOAD_ID)


@pytest.mark.parametrize(
    "uris",
    [
        pytest.param(["spiffe://example.org/ns/default/sa/admin"], id="fail/other-sa"),
        pytest.param(["spiffe://example.org/ns/kube-system/sa/web"], id="fail/other-namespace"),
        pytest.param(["spiffe://evil.org/ns/default/sa/web"], id="fail/other-trust-domain"),
        pytest.param(["spiffe://example.org"], id="fail/trust-domain-id"),
        pytest.param(["spiffe://example.org/ns/default/sa/WEB"], id="fail/case-variant"),
        pytest.param(["spiffe://example.org/ns/default/sa/web/"], id="fail/trailing-slash"),
        pytest.param(["SPIFFE://example.org/ns/default/sa/web"], id="fail/scheme-case"),
        pytest.param(["https://example.org/ns/default/sa/web"], id="fail/not-spiffe"),
        pytest.param([OWN, "spiffe://example.org/ns/default/sa/admin"], id="fail/two-uris"),
        pytest.param(["spiffe://example.org/ns/default/sa/admin", OWN], id="fail/own-second"),
        pytest.param([OWN, OWN], id="fail/own-twice"),
    ],
)
def test_authorize_csr_refuses(uris: list[str]) -> None:
    with pytest.raises(NotAuthorized) as caught:
        authorize_csr(parse_csr(csr_der(uris=uris)), WORKLOAD_ID)
    assert caught.value.reason == "csr-identity-mismatch"
