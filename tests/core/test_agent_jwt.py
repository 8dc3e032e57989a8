"""Validating JWT-SVIDs against a JWT bundle (the agent's ValidateJWTSVID core).

Tokens are made with pyjwt, an implementation other than the one under test."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from meshca.core.agent_jwt import (
    AgentJwtSvid,
    jwt_reusable,
    parse_jwks,
    validate_jwt_svid,
)
from meshca.core.errors import InvalidRequest
from meshca.core.jwt_svid import public_jwk

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
TD = "example.org"
SUB = f"spiffe://{TD}/ns/shop/sa/web"
KEY = ec.generate_private_key(ec.SECP256R1())
OTHER = ec.generate_private_key(ec.SECP256R1())
P384 = ec.generate_private_key(ec.SECP384R1())
RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
JWKS = json.dumps(
    {"keys": [public_jwk(KEY.public_key(), "k1"), public_jwk(P384.public_key(), "k384")]}
).encode()
BUNDLES = {TD: parse_jwks(JWKS)}


def _claims(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "sub": SUB,
        "aud": ["db", "cache"],
        "exp": int((NOW + timedelta(minutes=5)).timestamp()),
        "iat": int(NOW.timestamp()),
        "jti": "abc",
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _token(claims: dict[str, Any] | None = None, key: Any = KEY, **header: Any) -> str:
    alg = header.pop("alg", "ES256")
    headers = {k: v for k, v in ({"kid": "k1", "typ": "JWT"} | header).items() if v is not None}
    return jwt.encode(claims or _claims(), key, algorithm=alg, headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join(
        (_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(signature))
    )


def _tampered() -> str:
    header, _payload, signature = _token().split(".")
    forged = _b64(json.dumps(_claims(sub=f"spiffe://{TD}/ns/shop/sa/admin")).encode())
    return f"{header}.{forged}.{signature}"


def test_a_valid_token_returns_its_subject_and_claims() -> None:
    valid = validate_jwt_svid(_token(), "cache", BUNDLES, NOW)
    assert valid.spiffe_id == SUB
    assert valid.claims["jti"] == "abc" and valid.claims["aud"] == ["db", "cache"]
    single = validate_jwt_svid(_token(_claims(aud="db")), "db", BUNDLES, NOW)
    assert single.spiffe_id == SUB
    assert validate_jwt_svid(_token(typ="JOSE"), "db", BUNDLES, NOW).spiffe_id == SUB
    assert validate_jwt_svid(_token(typ=None), "db", BUNDLES, NOW).spiffe_id == SUB
    p384 = _token(key=P384, alg="ES384", kid="k384")
    assert validate_jwt_svid(p384, "db", BUNDLES, NOW).spiffe_id == SUB


BAD = [
    pytest.param(lambda: _token(), "elsewhere", "jwt-audience-mismatch", id="fail/wrong-audience"),
    pytest.param(lambda: _token(_claims(aud=[])), "db", "jwt-audience-mismatch", id="fail/no-aud"),
    pytest.param(lambda: _token(_claims(aud=7)), "db", "jwt-audience-mismatch", id="fail/aud-int"),
    pytest.param(
        lambda: _token(_claims(exp=int(NOW.timestamp()))), "db", "jwt-expired", id="fail/expired"
    ),
    pytest.param(lambda: _token(_claims(exp=None)), "db", "jwt-malformed", id="fail/no-exp"),
    pytest.param(lambda: _token(_claims(exp="soon")), "db", "jwt-malformed", id="fail/exp-text"),
    pytest.param(
        lambda: _token(_claims(nbf=int(NOW.timestamp()) + 60)),
        "db",
        "jwt-not-yet-valid",
        id="fail/nbf-future",
    ),
    pytest.param(_tampered, "db", "jwt-bad-signature", id="fail/tampered-payload"),
    pytest.param(
        lambda: _token(key=OTHER), "db", "jwt-bad-signature", id="fail/other-key-same-kid"
    ),
    pytest.param(lambda: _token(kid="nope"), "db", "jwt-unknown-key", id="fail/unknown-kid"),
    pytest.param(lambda: _token(kid=None), "db", "jwt-kid-missing", id="fail/no-kid"),
    pytest.param(
        lambda: _unsigned({"alg": "none", "kid": "k1"}, _claims()),
        "db",
        "jwt-alg-not-allowed",
        id="fail/alg-none",
    ),
    pytest.param(
        lambda: _token(key="a-shared-secret-of-32-bytes-long!", alg="HS256"),
        "db",
        "jwt-alg-not-allowed",
        id="fail/hs256",
    ),
    pytest.param(
        lambda: _token(key=RSA, alg="RS256"), "db", "jwt-key-mismatch", id="fail/rs256-vs-ec-key"
    ),
    pytest.param(
        lambda: _token(key=P384, alg="ES384"), "db", "jwt-key-mismatch", id="fail/es384-vs-p256"
    ),
    pytest.param(
        lambda: _token(_claims(sub="spiffe://other.org/ns/a/sa/b")),
        "db",
        "jwt-untrusted-domain",
        id="fail/foreign-trust-domain",
    ),
    pytest.param(
        lambda: _token(_claims(sub="https://example.org/x")),
        "db",
        "jwt-subject-invalid",
        id="fail/sub-not-spiffe",
    ),
    pytest.param(lambda: _token(_claims(sub=None)), "db", "jwt-subject-invalid", id="fail/no-sub"),
    pytest.param(lambda: _token(crit=["exp"]), "db", "jwt-malformed", id="fail/crit"),
    pytest.param(lambda: _token(typ="at+jwt"), "db", "jwt-typ-not-allowed", id="fail/typ"),
    pytest.param(lambda: "a.b", "db", "jwt-malformed", id="fail/two-parts"),
    pytest.param(lambda: "x" * 20000, "db", "jwt-malformed", id="fail/oversized"),
    pytest.param(lambda: "é.é.é", "db", "jwt-malformed", id="fail/non-ascii"),
    pytest.param(lambda: "", "db", "jwt-missing", id="fail/empty"),
    pytest.param(lambda: _token(), "", "jwt-audience-missing", id="fail/no-audience-asked"),
    pytest.param(
        lambda: _unsigned({"alg": "ES256", "kid": "k1"}, _claims(), b"\x00" * 64),
        "db",
        "jwt-bad-signature",
        id="fail/zero-signature",
    ),
    pytest.param(
        lambda: _unsigned({"alg": "ES256", "kid": "k1"}, _claims(), b"\x01" * 63),
        "db",
        "jwt-bad-signature",
        id="fail/short-signature",
    ),
    pytest.param(
        lambda: _b64(b"[1]") + "." + _b64(b"{}") + ".AA",
        "db",
        "jwt-malformed",
        id="fail/header-list",
    ),
    pytest.param(
        lambda: _b64(b"{") + "." + _b64(b"{}") + ".AA", "db", "jwt-malformed", id="fail/header-json"
    ),
    pytest.param(
        lambda: _b64(b"[" * 100000) + ".e30.AA", "db", "jwt-malformed", id="fail/deep-nesting"
    ),
]


@pytest.mark.parametrize(("make", "audience", "reason"), BAD)
def test_bad_tokens_are_refused_with_a_reason(make: Any, audience: str, reason: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_jwt_svid(make(), audience, BUNDLES, NOW)
    assert caught.value.reason == reason


def test_a_huge_exp_is_compared_exactly() -> None:
    far = _token(_claims(exp=10**40))
    assert validate_jwt_svid(far, "db", BUNDLES, NOW).spiffe_id == SUB


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_any_string_is_a_clean_refusal(token: str) -> None:
    with pytest.raises(InvalidRequest):
        validate_jwt_svid(token, "db", BUNDLES, NOW)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    header=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit"]), JSONISH),
    claims=st.dictionaries(st.sampled_from(["sub", "aud", "exp", "nbf", "iat", "x"]), JSONISH),
)
def test_signed_garbage_claims_never_crash(header: dict[str, Any], claims: dict[str, Any]) -> None:
    """Well-signed tokens with arbitrary header and claim values: valid or InvalidRequest."""
    header = header | {"alg": "ES256", "kid": "k1"}
    try:
        token = jwt.encode(claims, KEY, algorithm="ES256", headers=header)
    except (TypeError, ValueError, jwt.PyJWTError):
        return  # pyjwt cannot encode it (NaN, say): nothing to test
    try:
        valid = validate_jwt_svid(token, "db", BUNDLES, NOW)
    except InvalidRequest:
        return
    assert valid.spiffe_id == SUB or valid.spiffe_id.startswith(f"spiffe://{TD}/")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_parse_jwks_takes_any_bytes(document: bytes) -> None:
    try:
        keys = parse_jwks(document)
    except InvalidRequest:
        return
    assert isinstance(keys, dict)


def test_parse_jwks_keeps_only_usable_jwt_svid_keys() -> None:
    good = public_jwk(KEY.public_key(), "good")
    document = {
        "keys": [
            good,
            good | {"kid": "x509", "use": "x509-svid"},
            {k: v for k, v in good.items() if k != "use"} | {"kid": "no-use"},
            good | {"kid": ""},
            good | {"kid": "bad-point", "x": good["y"]},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            "not a key",
        ]
    }
    assert list(parse_jwks(json.dumps(document).encode())) == ["good"]
    assert parse_jwks(b"") == {}
    for bad in (b"[]", b'{"keys": 1}', b"{"):
        with pytest.raises(InvalidRequest):
            parse_jwks(bad)


def test_a_cached_token_is_reused_only_in_its_first_half() -> None:
    svid = AgentJwtSvid(SUB, "t", NOW, NOW + timedelta(minutes=4))
    assert jwt_reusable(svid, NOW)
    assert jwt_reusable(svid, NOW + timedelta(minutes=2) - timedelta(seconds=1))
    assert not jwt_reusable(svid, NOW + timedelta(minutes=2))
    assert not jwt_reusable(svid, NOW - timedelta(seconds=1)), "the clock went back"
