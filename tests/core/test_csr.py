"""parse_csr: key policy, tampering, CA requests, size limits, and a known-bad corpus.

Whatever bytes arrive, parse_csr returns a CsrRequest or raises one of the request
errors (MalformedCsr, WeakKey, InvalidRequest "csr-requests-ca", RequestTooLarge); any
other exception would surface as an INTERNAL error for what is really a bad request.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshca.core.csr import MAX_CSR_BYTES, CsrRequest, parse_csr
from meshca.core.errors import (
    InvalidRequest,
    MalformedCsr,
    MeshcaError,
    RequestTooLarge,
    WeakKey,
)
from tests.core.builders import (
    ACCEPTED_KEY_KINDS,
    WEAK_KEY_KINDS,
    WORKLOAD_ID,
    build_csr,
    build_pki,
    csr_der,
    csr_pem,
    flip_byte,
    key_usage,
    private_key,
    replace_once,
    tamper_body,
    tamper_signature,
)

KEY_DESCRIPTIONS = {
    "ec-p256": "ECDSA secp256r1",
    "ec-p384": "ECDSA secp384r1",
    "ed25519": "Ed25519",
    "rsa-2048": "RSA 2048",
    "rsa-4096": "RSA 4096",
}
PUBLIC_KEY_TYPES = {
    "ec-p256": ec.EllipticCurvePublicKey,
    "ec-p384": ec.EllipticCurvePublicKey,
    "ed25519": ed25519.Ed25519PublicKey,
    "rsa-2048": rsa.RSAPublicKey,
    "rsa-4096": rsa.RSAPublicKey,
}

# DER fragments of a P-256 SubjectPublicKeyInfo and of the CSR's version field.
ID_EC_PUBLIC_KEY = bytes.fromhex("06072a8648ce3d0201")
PRIME256V1 = bytes.fromhex("06082a8648ce3d030107")
VERSION_0 = bytes.fromhex("020100")


def _spiffe_uri(path: str) -> str:
    return f"spiffe://example.org{path}"


# --- accepted -----------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["der", "pem"])
@pytest.mark.parametrize("kind", ACCEPTED_KEY_KINDS)
def test_accepted_key_types(kind: str, encoding: str) -> None:
    key = private_key(kind)
    data = csr_der(key) if encoding == "der" else csr_pem(key)
    request = parse_csr(data)
    assert isinstance(request, CsrRequest)
    assert isinstance(request.public_key, PUBLIC_KEY_TYPES[kind])
    assert request.public_key == key.public_key()
    assert request.key_description == KEY_DESCRIPTIONS[kind]
    assert request.uri_sans == ()


def test_pem_and_der_give_the_same_request() -> None:
    csr = build_csr(uris=[str(WORKLOAD_ID)])
    der = csr.public_bytes(Encoding.DER)
    from_der = parse_csr(der)
    from_pem = parse_csr(csr.public_bytes(Encoding.PEM))
    assert from_der == from_pem
    assert from_der.sha256 == hashlib.sha256(der).hexdigest()


@pytest.mark.parametrize(
    ("options", "uri_sans"),
    [
        pytest.param({}, (), id="ok/minimal-csr"),
        pytest.param({"subject": None}, (), id="ok/empty-subject"),
        pytest.param({"uris": [str(WORKLOAD_ID)]}, (str(WORKLOAD_ID),), id="ok/uri-san"),
        pytest.param(
            {"uris": [str(WORKLOAD_ID), _spiffe_uri("/other")]},
            (str(WORKLOAD_ID), _spiffe_uri("/other")),
            id="ok/several-uri-sans-reported-for-authorize",
        ),
        pytest.param(
            {"uris": ["https://example.com/x"]},
            ("https://example.com/x",),
            id="ok/non-spiffe-uri-reported-for-authorize",
        ),
        pytest.param({"dns": ["web.example.org", "a.b"]}, (), id="ok/dns-sans-ignored"),
        pytest.param(
            {"dns": ["web.example.org"], "uris": [str(WORKLOAD_ID)]},
            (str(WORKLOAD_ID),),
            id="ok/dns-and-uri",
        ),
        pytest.param({"ca": False}, (), id="ok/ca-false"),
        pytest.param({"usage": key_usage()}, (), id="ok/digital-signature-usage"),
        pytest.param(
            {"usage": key_usage(key_encipherment=True)}, (), id="ok/key-encipherment-usage"
        ),
    ],
)
def test_accepted_requests(options: dict[str, object], uri_sans: tuple[str, ...]) -> None:
    assert parse_csr(csr_der(**options)).uri_sans == uri_sans


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\n\n  " + csr_pem() + b"\r\n\t ", id="ok/pem-surrounded-by-whitespace"),
        pytest.param(
            csr_pem().replace(b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST"),
            id="ok/pem-legacy-label",
        ),
        pytest.param(csr_pem().replace(b"\n", b"\r\n"), id="ok/pem-crlf-lines"),
        pytest.param(
            csr_pem().ljust(MAX_CSR_BYTES, b"\n"),
            id="ok/exactly-16-kib-with-padding",
        ),
    ],
)
def test_accepted_encodings(data: bytes) -> None:
    assert len(data) <= MAX_CSR_BYTES
    parse_csr(data)


# --- refused: weak keys -------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["der", "pem"])
@pytest.mark.parametrize("kind", WEAK_KEY_KINDS)
def test_weak_keys_are_refused(kind: str, encoding: str) -> None:
    """Policy: ECDSA only on P-256/P-384; no Ed448, DSA, RSA < 2048 or e != 65537."""
    key = private_key(kind)
    data = csr_der(key) if encoding == "der" else csr_pem(key)
    with pytest.raises(WeakKey) as caught:
        parse_csr(data)
    assert caught.value.reason == "weak-key"
    assert isinstance(caught.value, InvalidRequest)


# --- refused: tampering -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ACCEPTED_KEY_KINDS + WEAK_KEY_KINDS)
@pytest.mark.parametrize("tamper", [tamper_signature, tamper_body], ids=["signature", "body"])
def test_tampered_csrs_are_refused(kind: str, tamper: Callable[[bytes], bytes]) -> None:
    """The signature is checked before the key: a forged CSR never reaches key policy."""
    with pytest.raises(MalformedCsr) as caught:
        parse_csr(tamper(csr_der(private_key(kind), uris=[str(WORKLOAD_ID)])))
    assert caught.value.reason == "csr-bad-signature"


def test_tampered_uri_san_is_refused() -> None:
    """Swapping the asked-for identity after signing is the attack that matters most."""
    der = csr_der(uris=[_spiffe_uri("/ns/default/sa/web")])
    forged = replace_once(der, b"sa/web", b"sa/adm")
    with pytest.raises(MalformedCsr, match="signature"):
        parse_csr(forged)


# --- refused: CA requests -----------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"ca": True}, id="fail/ca-true"),
        pytest.param({"usage": key_usage(key_cert_sign=True)}, id="fail/key-cert-sign"),
        pytest.param({"usage": key_usage(crl_sign=True)}, id="fail/crl-sign"),
        pytest.param(
            {"ca": True, "usage": key_usage(key_cert_sign=True), "uris": [str(WORKLOAD_ID)]},
            id="fail/full-ca-request",
        ),
    ],
)
def test_ca_requests_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_csr(csr_der(**options))
    assert type(caught.value) is InvalidRequest
    assert caught.value.reason == "csr-requests-ca"


# --- refused: size ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"0" * (MAX_CSR_BYTES + 1), id="fail/16-kib-plus-one-garbage"),
        pytest.param(csr_pem().ljust(MAX_CSR_BYTES + 1, b"\n"), id="fail/valid-pem-padded"),
        pytest.param(b"\x30" * (10 * MAX_CSR_BYTES), id="fail/much-too-large"),
    ],
)
def test_oversized_input_is_refused_before_parsing(data: bytes) -> None:
    with pytest.raises(RequestTooLarge) as caught:
        parse_csr(data)
    assert caught.value.reason == "request-too-large"


# --- the known-bad corpus -----------------------------------------------------------------

_P256 = csr_der()
_CERTIFICATE = build_pki().intermediate.public_bytes(Encoding.DER)

KNOWN_BAD = [
    pytest.param(b"", id="fail/empty"),
    pytest.param(b" \r\n\t", id="fail/whitespace-only"),
    pytest.param(b"\x00", id="fail/nul"),
    pytest.param(b"hello world", id="fail/text"),
    pytest.param(b"\x30", id="fail/lone-sequence-tag"),
    pytest.param(b"\x30\x00", id="fail/empty-sequence"),
    pytest.param(b"\x30\x84\xff\xff\xff\xff", id="fail/huge-length"),
    pytest.param(_P256[: len(_P256) // 2], id="fail/truncated-der"),
    pytest.param(_P256[:-1], id="fail/der-missing-last-byte"),
    pytest.param(_P256 + b"\x00", id="fail/der-trailing-byte"),
    pytest.param(_P256 + _P256, id="fail/two-csrs"),
    pytest.param(b"\n" + _P256, id="fail/der-with-leading-newline"),
    pytest.param(flip_byte(_P256, 1, 0xFF), id="fail/der-corrupt-length"),
    pytest.param(_CERTIFICATE, id="fail/certificate-not-csr"),
    pytest.param(build_pki().intermediate.public_bytes(Encoding.PEM), id="fail/pem-certificate"),
    pytest.param(
        b"-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n",
        id="fail/pem-bad-base64",
    ),
    pytest.param(
        b"-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n",
        id="fail/pem-empty-body",
    ),
    pytest.param(csr_pem()[:-40], id="fail/pem-truncated"),
    pytest.param(b"-----BEGIN", id="fail/pem-header-only"),
    # Regressions: these leaked cryptography exceptions (UnsupportedAlgorithm,
    # InvalidVersion) that would have become INTERNAL errors.
    pytest.param(
        replace_once(_P256, ID_EC_PUBLIC_KEY, ID_EC_PUBLIC_KEY[:-1] + b"\x09"),
        id="fail/unknown-key-algorithm",
    ),
    pytest.param(
        replace_once(_P256, PRIME256V1, PRIME256V1[:-1] + b"\x3f"), id="fail/unknown-curve"
    ),
    pytest.param(
        replace_once(_P256[:20], VERSION_0, b"\x02\x01\x05") + _P256[20:],
        id="fail/csr-version-5",
    ),
]


@pytest.mark.parametrize("data", KNOWN_BAD)
def test_known_bad_inputs_are_malformed(data: bytes) -> None:
    with pytest.raises(MalformedCsr) as caught:
        parse_csr(data)
    assert len(caught.value.message) < 300


def test_flipping_the_key_bits_is_refused() -> None:
    """A corrupted public key point fails as malformed, however the library notices."""
    der = csr_der(private_key("ec-p256"))
    point_at = der.index(PRIME256V1) + len(PRIME256V1) + 3 + 10
    with pytest.raises(MalformedCsr):
        parse_csr(flip_byte(der, point_at))


# --- properties ---------------------------------------------------------------------------

ALLOWED = (MalformedCsr, WeakKey, RequestTooLarge, InvalidRequest)

SEEDS = [
    csr_der(private_key(kind), uris=[str(WORKLOAD_ID)], dns=["web.example.org"])
    for kind in ("ec-p256", "ec-p384", "ed25519", "rsa-2048", "rsa-1024", "ed448", "dsa-2048")
] + [csr_der(ca=True), csr_der(usage=key_usage(key_cert_sign=True))]


def _parse_or_refuse(data: bytes) -> CsrRequest | MeshcaError:
    try:
        return parse_csr(data)
    except ALLOWED as error:
        if type(error) is InvalidRequest:
            assert error.reason == "csr-requests-ca"
        return error


@st.composite
def mutated_csrs(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data) - 1))
        match draw(st.sampled_from(["set", "flip", "insert", "delete", "truncate"])):
            case "set":
                data[at] = draw(st.integers(0, 255))
            case "flip":
                data[at] ^= 1 << draw(st.integers(0, 7))
            case "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
            case "delete":
                del data[at : at + draw(st.integers(1, 8))]
            case _:
                del data[at:]
        if not data:
            break
    return bytes(data)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_property_random_bytes_raise_only_request_errors(data: bytes) -> None:
    result = _parse_or_refuse(data)
    assert not isinstance(result, CsrRequest)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_property_random_pem_bodies_raise_only_request_errors(body: bytes) -> None:
    pem = (
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(body)
        + b"-----END CERTIFICATE REQUEST-----\n"
    )
    assert not isinstance(_parse_or_refuse(pem), CsrRequest)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_csrs())
def test_property_mutated_csrs_raise_only_request_errors(data: bytes) -> None:
    result = _parse_or_refuse(data)
    if isinstance(result, CsrRequest):
        # Whatever survives mutation is still self-consistent and within policy.
        assert (
            result.sha256
            == hashlib.sha256(x509.load_der_x509_csr(data).public_bytes(Encoding.DER)).hexdigest()
        )
        assert result.key_description in KEY_DESCRIPTIONS.values()


def test_seed_outcomes() -> None:
    """The mutation seeds cover every outcome, so mutations start from each branch."""
    outcomes = {type(_parse_or_refuse(seed)).__name__ for seed in SEEDS}
    assert outcomes == {"CsrRequest", "WeakKey", "InvalidRequest"}


def test_rsa_pss_signed_csr_is_accepted() -> None:
    key = private_key("rsa-2048")
    assert isinstance(key, rsa.RSAPrivateKey)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256(), rsa_padding=pss)
    )
    parsed = parse_csr(csr.public_bytes(Encoding.DER))
    assert parsed.public_key == key.public_key()


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param(
            "2a8648ce3d040302", "2a8648ce3d040303", id="fail/ecdsa-sha256-claimed-as-sha384"
        ),
        pytest.param(
            "2a8648ce3d040302", "2a864886f70d0101", id="fail/ecdsa-claimed-as-rsa"
        ),
    ],
)
def test_signature_algorithm_swapped_after_signing_is_refused(old: str, new: str) -> None:
    """The algorithm named outside the signed part is not trusted to say how to verify."""
    forged = replace_once(csr_der(private_key("ec-p256")), bytes.fromhex(old), bytes.fromhex(new))
    with pytest.raises(MalformedCsr) as caught:
        parse_csr(forged)
    assert caught.value.reason in {"csr-bad-signature", "malformed-csr"}
