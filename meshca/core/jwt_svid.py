"""JWT-SVIDs: what a request may ask for, the claims we sign, and the keys that sign them.

Follows the SPIFFE JWT-SVID standard: ``sub`` is the SPIFFE ID, ``aud`` is required
(one or more audiences), ``exp`` is required, the header names its key in ``kid`` and
says ``typ: JWT``; we sign with ES256 (P-256 keys) or ES384 (P-384), both allowed.

Pure: time, the token id and the keys are inputs.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from meshca.core.authority import SignerKey, hash_for
from meshca.core.errors import AuthorityNotReady, InternalError, InvalidRequest
from meshca.core.spiffe import TrustDomain

__all__ = [
    "DEFAULT_JWT_SVID_TTL",
    "MAX_AUDIENCES",
    "MAX_AUDIENCE_BYTES",
    "JwtKey",
    "algorithm_for",
    "build_jwt_key_certificate",
    "check_audiences",
    "jwt_lifetime",
    "jwt_svid_claims",
    "public_jwk",
]

#: The lifetime of a JWT-SVID when the caller asks for none.
DEFAULT_JWT_SVID_TTL = timedelta(minutes=5)
#: Most audiences one JWT-SVID may name.
MAX_AUDIENCES = 16
#: Longest audience, in UTF-8 bytes.
MAX_AUDIENCE_BYTES = 255

_CURVES = {"secp256r1": ("P-256", "ES256"), "secp384r1": ("P-384", "ES384")}


def check_audiences(audiences: tuple[str, ...]) -> tuple[str, ...]:
    """The audiences, de-duplicated in order; ``InvalidRequest`` for none, too many,
    empty, oversized or control-character ones."""
    if not audiences:
        raise InvalidRequest(
            "a JWT-SVID needs at least one audience", reason="jwt-audience-missing"
        )
    if len(audiences) > MAX_AUDIENCES:
        raise InvalidRequest(
            f"{len(audiences)} audiences asked; the limit is {MAX_AUDIENCES}",
            reason="jwt-too-many-audiences",
        )
    seen: dict[str, None] = {}
    for audience in audiences:
        size = len(audience.encode("utf-8", "surrogatepass"))
        if size == 0:
            raise InvalidRequest("an audience is empty", reason="jwt-audience-invalid")
        if size > MAX_AUDIENCE_BYTES:
            raise InvalidRequest(
                f"an audience is {size} bytes; the limit is {MAX_AUDIENCE_BYTES}",
                reason="jwt-audience-too-large",
            )
        if any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) < 0xE000 for c in audience):
            raise InvalidRequest(
                f"audience {audience[:64]!r} has a control character",
                reason="jwt-audience-invalid",
            )
        seen[audience] = None
    return tuple(seen)


def jwt_lifetime(
    now: datetime,
    requested: timedelta | None,
    maximum: timedelta,
    key_not_after: datetime,
) -> tuple[datetime, datetime]:
    """``(iat, exp)`` in whole seconds: the requested TTL (default five minutes), capped to
    ``maximum`` and to the signing key's end. ``InvalidRequest`` for a TTL asked above the
    max; the default is capped to it (a caller that asks for none, like ``meshca agent``,
    gets a token under a short ``--max-jwt-svid-ttl`` too)."""
    ttl = min(DEFAULT_JWT_SVID_TTL, maximum) if requested is None else requested
    if ttl > maximum:
        raise InvalidRequest(
            f"a JWT-SVID lifetime of {int(ttl.total_seconds())}s was asked; the maximum is "
            f"{int(maximum.total_seconds())}s",
            reason="jwt-ttl-too-long",
        )
    issued_at = now.replace(microsecond=0)
    expires = min(issued_at + min(ttl, maximum), key_not_after.replace(microsecond=0))
    if expires <= issued_at:
        raise AuthorityNotReady(
            "the JWT-SVID signing key has expired and no successor is active yet",
            reason="jwt-key-expired",
        )
    return issued_at, expires


def jwt_svid_claims(
    *,
    spiffe_id: str,
    audiences: tuple[str, ...],
    issued_at: datetime,
    expires: datetime,
    jti: str,
    issuer: str | None,
) -> dict[str, Any]:
    """The claims of one JWT-SVID. ``aud`` is a string for one audience, else a list."""
    claims: dict[str, Any] = {
        "sub": spiffe_id,
        "aud": audiences[0] if len(audiences) == 1 else list(audiences),
        "exp": int(expires.timestamp()),
        "iat": int(issued_at.timestamp()),
        "jti": jti,
    }
    if issuer:
        claims["iss"] = issuer
    return claims


def algorithm_for(key: SignerKey | ec.EllipticCurvePublicKey) -> str:
    """The JWS algorithm of a JWT key: ES256 for P-256, ES384 for P-384."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        found = _CURVES.get(key.curve.name)
        if found is not None:
            return found[1]
    raise InternalError(f"a {type(key).__name__} cannot sign JWT-SVIDs (P-256 or P-384 only)")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key: object, kid: str) -> dict[str, Any]:
    """The JWK (RFC 7517) of a JWT-SVID public key, ``use: jwt-svid`` as SPIFFE bundles say."""
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _CURVES:
        raise InternalError(f"a {type(key).__name__} is not a JWT-SVID key")
    numbers = key.public_numbers()
    size = (key.curve.key_size + 7) // 8
    return {
        "kty": "EC",
        "use": "jwt-svid",
        "kid": kid,
        "crv": _CURVES[key.curve.name][0],
        "x": _b64url(numbers.x.to_bytes(size, "big")),
        "y": _b64url(numbers.y.to_bytes(size, "big")),
    }


@dataclass(frozen=True, slots=True)
class JwtKey:
    """A JWT-SVID key as verifiers see it: its ``kid``, public key and end."""

    kid: str
    public_key: ec.EllipticCurvePublicKey
    not_after: datetime

    def jwk(self) -> dict[str, Any]:
        return public_jwk(self.public_key, self.kid)

    @classmethod
    def from_certificate(cls, kid: str, certificate: x509.Certificate) -> JwtKey:
        key = certificate.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise InternalError(f"JWT key {kid} is not an EC key")
        return cls(kid, key, certificate.not_valid_after_utc)

    def public_der(self) -> bytes:
        return self.public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def build_jwt_key_certificate(
    key: SignerKey, trust_domain: TrustDomain, now: datetime, ttl: timedelta, serial: int
) -> x509.Certificate:
    """A self-signed certificate that holds a JWT key's public key and lifetime in the journal.

    It is never part of an X.509 bundle and cannot sign certificates (CA false, key usage
    digitalSignature only); it only lets the key share the CA authorities' journal.
    """
    algorithm_for(key)  # refuse a key type JWT-SVIDs cannot use before storing anything
    public = key.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshca"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain.name[:64]),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshca jwt-svid key {serial:x}"[:64]),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .sign(key, hash_for(key))
    )
