"""JWT-SVID rules: audiences, lifetimes, claims, JWKs and the key certificate."""

from __future__ import annotations

from datetime import timedelta

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from meshca.core.errors import AuthorityNotReady, InternalError, InvalidRequest
from meshca.core.jwt_svid import (
    DEFAULT_JWT_SVID_TTL,
    MAX_AUDIENCE_BYTES,
    MAX_AUDIENCES,
    JwtKey,
    algorithm_for,
    build_jwt_key_certificate,
    check_audiences,
    jwt_lifetime,
    jwt_svid_claims,
    public_jwk,
)
from tests.core.builders import NOW, TRUST_DOMAIN

HOUR = timedelta(hours=1)


@pytest.mark.parametrize(
    ("audiences", "reason"),
    [
        pytest.param((), "jwt-audience-missing", id="fail/no-audience"),
        pytest.param(("a",) * (MAX_AUDIENCES + 1), "jwt-too-many-audiences", id="fail/17"),
        pytest.param(tuple(f"a{i}" for i in range(1000)), "jwt-too-many-audiences", id="fail/1000"),
        pytest.param(("",), "jwt-audience-invalid", id="fail/empty"),
        pytest.param(("x" * (MAX_AUDIENCE_BYTES + 1),), "jwt-audience-too-large", id="fail/256B"),
        pytest.param(("é" * 128,), "jwt-audience-too-large", id="fail/256B-utf8"),
        pytest.param(("x" * 1_000_000,), "jwt-audience-too-large", id="fail/1MB"),
        pytest.param(("a\nb",), "jwt-audience-invalid", id="fail/newline"),
        pytest.param(("a\x00",), "jwt-audience-invalid", id="fail/nul"),
        pytest.param(("\ud800",), "jwt-audience-invalid", id="fail/lone-surrogate"),
    ],
)
def test_bad_audiences_are_refused(audiences: tuple[str, ...], reason: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_audiences(audiences)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("audiences", "expected"),
    [
        pytest.param(("spiffe://example.org/db",), ("spiffe://example.org/db",), id="ok/one"),
        pytest.param(("b", "a", "b"), ("b", "a"), id="ok/deduplicated-in-order"),
        pytest.param(("x" * MAX_AUDIENCE_BYTES,), ("x" * MAX_AUDIENCE_BYTES,), id="ok/255B"),
        pytest.param(
            tuple(str(i) for i in range(MAX_AUDIENCES)),
            tuple(str(i) for i in range(MAX_AUDIENCES)),
            id="ok/16",
        ),
    ],
)
def test_good_audiences(audiences: tuple[str, ...], expected: tuple[str, ...]) -> None:
    assert check_audiences(audiences) == expected


@given(st.lists(st.text(max_size=300), max_size=40))
def test_check_audiences_accepts_or_raises_invalid_request_only(audiences: list[str]) -> None:
    try:
        result = check_audiences(tuple(audiences))
    except InvalidRequest:
        return
    assert 1 <= len(result) <= MAX_AUDIENCES
    assert all(0 < len(a.encode()) <= MAX_AUDIENCE_BYTES for a in result)
    assert set(result) == set(audiences)


def test_lifetime_default_requested_and_capped_to_the_key() -> None:
    key_end = NOW + timedelta(days=1)
    assert jwt_lifetime(NOW, None, HOUR, key_end) == (NOW, NOW + DEFAULT_JWT_SVID_TTL)
    assert jwt_lifetime(NOW, HOUR, HOUR, key_end) == (NOW, NOW + HOUR)
    now = NOW + timedelta(microseconds=700)
    assert jwt_lifetime(now, timedelta(seconds=30), HOUR, key_end) == (
        NOW,
        NOW + timedelta(seconds=30),
    ), "whole seconds, as the claims hold"
    assert jwt_lifetime(NOW, HOUR, HOUR, NOW + timedelta(minutes=2))[1] == NOW + timedelta(
        minutes=2
    ), "never past the signing key's end"


def test_the_default_lifetime_is_capped_to_a_shorter_maximum() -> None:
    short = timedelta(seconds=20)
    assert jwt_lifetime(NOW, None, short, NOW + timedelta(days=1)) == (NOW, NOW + short)
    with pytest.raises(InvalidRequest):
        jwt_lifetime(NOW, DEFAULT_JWT_SVID_TTL, short, NOW + timedelta(days=1))


def test_lifetime_above_the_maximum_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        jwt_lifetime(NOW, HOUR + timedelta(seconds=1), HOUR, NOW + timedelta(days=1))
    assert caught.value.reason == "jwt-ttl-too-long"
    with pytest.raises(AuthorityNotReady):
        jwt_lifetime(NOW, None, HOUR, NOW)


def test_claims_follow_the_jwt_svid_standard() -> None:
    claims = jwt_svid_claims(
        spiffe_id="spiffe://example.org/ns/a/sa/b",
        audiences=("x",),
        issued_at=NOW,
        expires=NOW + HOUR,
        jti="ab",
        issuer=None,
    )
    assert claims == {
        "sub": "spiffe://example.org/ns/a/sa/b",
        "aud": "x",
        "exp": int((NOW + HOUR).timestamp()),
        "iat": int(NOW.timestamp()),
        "jti": "ab",
    }
    two = jwt_svid_claims(
        spiffe_id="spiffe://example.org/w",
        audiences=("x", "y"),
        issued_at=NOW,
        expires=NOW + HOUR,
        jti="ab",
        issuer="https://issuer.example.org",
    )
    assert two["aud"] == ["x", "y"] and two["iss"] == "https://issuer.example.org"


@pytest.mark.parametrize(
    ("curve", "algorithm", "crv"),
    [(ec.SECP256R1(), "ES256", "P-256"), (ec.SECP384R1(), "ES384", "P-384")],
)
def test_jwk_verifies_what_the_key_signs(curve: ec.EllipticCurve, algorithm: str, crv: str) -> None:
    key = ec.generate_private_key(curve)
    assert algorithm_for(key) == algorithm
    jwk = public_jwk(key.public_key(), "kid-1")
    assert jwk["use"] == "jwt-svid" and jwk["kid"] == "kid-1" and jwk["crv"] == crv
    token = jwt.encode({"sub": "s", "aud": "a"}, key, algorithm=algorithm)
    verifier = jwt.PyJWK(jwk, algorithm=algorithm)
    assert jwt.decode(token, verifier, algorithms=[algorithm], audience="a")["sub"] == "s"


def test_other_keys_cannot_be_jwt_keys() -> None:
    with pytest.raises(InternalError):
        algorithm_for(ec.generate_private_key(ec.SECP521R1()))
    with pytest.raises(InternalError):
        public_jwk(ec.generate_private_key(ec.SECP521R1()).public_key(), "k")


def test_key_certificate_holds_the_key_and_lifetime_and_signs_nothing() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build_jwt_key_certificate(key, TRUST_DOMAIN, NOW, timedelta(days=30), 0x1234)
    assert cert.public_key() == key.public_key()
    assert cert.not_valid_before_utc == NOW
    assert cert.not_valid_after_utc == NOW + timedelta(days=30)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    public = JwtKey.from_certificate("kid", cert)
    assert public.not_after == cert.not_valid_after_utc and public.jwk()["kid"] == "kid"
