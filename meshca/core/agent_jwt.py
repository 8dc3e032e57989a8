"""JWT-SVIDs in ``meshca agent``: checking a JWT-SVID against the JWT bundle, reading
that bundle (a JWKS), and when a token fetched earlier may be handed out again.

Validation follows the SPIFFE JWT-SVID standard: the header's ``alg`` is one of the
asymmetric algorithms it allows (never ``none``, never HMAC), its ``kid`` names a key in
the bundle of the subject's trust domain, ``typ`` (if set) is JWT or JOSE, ``sub`` is a
SPIFFE ID, ``aud`` names the
audience asked for and ``exp`` has not passed. Every way a token can be wrong raises
``InvalidRequest`` with a ``reason``; nothing else escapes for any input string.

Pure: ``now`` is an argument; no I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from meshca.core.errors import InvalidRequest, InvalidSpiffeId
from meshca.core.spiffe import SpiffeId

__all__ = [
    "ALLOWED_ALGORITHMS",
    "MAX_JWT_BYTES",
    "AgentJwtSvid",
    "JwtBundleKeys",
    "JwtUpstream",
    "ValidatedJwtSvid",
    "jwt_reusable",
    "parse_jwks",
    "validate_jwt_svid",
]

#: Longest token ValidateJWTSVID looks at; a JWT-SVID of ours is well under 1 KiB.
MAX_JWT_BYTES = 16 * 1024

_EC = {
    "ES256": ("secp256r1", hashes.SHA256()),
    "ES384": ("secp384r1", hashes.SHA384()),
    "ES512": ("secp521r1", hashes.SHA512()),
}
_RSA = {
    "RS256": hashes.SHA256(),
    "RS384": hashes.SHA384(),
    "RS512": hashes.SHA512(),
    "PS256": hashes.SHA256(),
    "PS384": hashes.SHA384(),
    "PS512": hashes.SHA512(),
}
#: The JWT-SVID standard's list (section 3): asymmetric only.
ALLOWED_ALGORITHMS = frozenset(_EC) | frozenset(_RSA)
_CURVES = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
#: One trust domain's JWT keys by ``kid``.
JwtBundleKeys = Mapping[str, PublicKey]


@dataclass(frozen=True, slots=True)
class AgentJwtSvid:
    """A JWT-SVID as the agent got it from the server."""

    spiffe_id: str
    token: str
    fetched_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class ValidatedJwtSvid:
    """What ValidateJWTSVID answers: the subject and all the token's claims."""

    spiffe_id: str
    claims: Mapping[str, Any]


class JwtUpstream(Protocol):
    """The server's JWT-SVID signer as the agent sees it.

    Raises ``AuthenticationFailed``/``NotAuthorized``/``InvalidRequest`` when the server
    refuses, ``Unavailable`` when it cannot be reached.
    """

    async def sign_jwt(
        self, token: str, audiences: tuple[str, ...], spiffe_id: str
    ) -> AgentJwtSvid: ...


def jwt_reusable(svid: AgentJwtSvid, now: datetime) -> bool:
    """Whether a cached JWT-SVID may still be handed out: more than half its life left."""
    life = svid.expires_at - svid.fetched_at
    return svid.fetched_at <= now and now < svid.fetched_at + life / 2


def _b64(part: str, what: str) -> bytes:
    if not part or len(part) % 4 == 1 or part.strip("=") != part:
        raise InvalidRequest(f"the JWT-SVID's {what} is not base64url", reason="jwt-malformed")
    try:
        return base64.b64decode(part + "=" * (-len(part) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(
            f"the JWT-SVID's {what} is not base64url", reason="jwt-malformed"
        ) from exc


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"the JWT-SVID's {what} is not JSON", reason="jwt-malformed") from exc
    if not isinstance(value, dict):
        raise InvalidRequest(f"the JWT-SVID's {what} is not a JSON object", reason="jwt-malformed")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _b64_int(value: object) -> int:
    if not isinstance(value, str):
        raise ValueError("not a base64url string")
    raw = base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=True)
    return int.from_bytes(raw, "big")


def _jwk_key(jwk: Mapping[str, Any]) -> PublicKey:
    kty = jwk.get("kty")
    if kty == "EC":
        curve = _CURVES.get(str(jwk.get("crv")))
        if curve is None:
            raise ValueError(f"curve {jwk.get('crv')!r} is not supported")
        return ec.EllipticCurvePublicNumbers(
            _b64_int(jwk.get("x")), _b64_int(jwk.get("y")), curve
        ).public_key()
    if kty == "RSA":
        return rsa.RSAPublicNumbers(_b64_int(jwk.get("e")), _b64_int(jwk.get("n"))).public_key()
    raise ValueError(f"key type {kty!r} is not supported")


def parse_jwks(document: bytes) -> dict[str, PublicKey]:
    """The keys of a JWKS (RFC 7517) by ``kid``: those meant for JWT-SVIDs (``use``
    ``jwt-svid``, which SPIFFE bundles require), with a ``kid``, of a type JWT-SVIDs
    allow. Keys that fail those checks are left out; a document that is not a JWKS at
    all is ``InvalidRequest``."""
    try:
        value = json.loads(document or b'{"keys": []}')
    except ValueError as exc:
        raise InvalidRequest("the JWT bundle is not JSON", reason="jwt-bundle-invalid") from exc
    keys = value.get("keys") if isinstance(value, dict) else None
    if not isinstance(keys, list):
        raise InvalidRequest("the JWT bundle has no 'keys' list", reason="jwt-bundle-invalid")
    found: dict[str, PublicKey] = {}
    for jwk in keys:
        if not isinstance(jwk, dict) or jwk.get("use") != "jwt-svid":
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            continue
        try:
            found[kid] = _jwk_key(jwk)
        except (ValueError, TypeError, binascii.Error):
            continue
    return found


def _verify(key: PublicKey, alg: str, signature: bytes, signed: bytes) -> None:
    if alg in _EC:
        curve_name, digest = _EC[alg]
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != curve_name:
            raise InvalidRequest(
                f"the JWT-SVID's key does not fit alg {alg}", reason="jwt-key-mismatch"
            )
        size = (key.curve.key_size + 7) // 8
        if len(signature) != 2 * size:
            raise InvalidRequest(
                "the JWT-SVID's signature is malformed", reason="jwt-bad-signature"
            )
        r = int.from_bytes(signature[:size], "big")
        s = int.from_bytes(signature[size:], "big")
        key.verify(encode_dss_signature(r, s), signed, ec.ECDSA(digest))
        return
    rsa_digest = _RSA[alg]
    if not isinstance(key, rsa.RSAPublicKey):
        raise InvalidRequest(
            f"the JWT-SVID's key does not fit alg {alg}", reason="jwt-key-mismatch"
        )
    pad: padding.AsymmetricPadding = (
        padding.PKCS1v15()
        if alg.startswith("RS")
        else padding.PSS(mgf=padding.MGF1(rsa_digest), salt_length=rsa_digest.digest_size)
    )
    key.verify(signature, signed, pad, rsa_digest)


def _number(claims: Mapping[str, Any], name: str) -> int | float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # any size: compared exactly, never converted to a float
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise InvalidRequest(f"the JWT-SVID's {name} is not a number", reason="jwt-malformed")


def validate_jwt_svid(
    token: str,
    audience: str,
    bundles: Mapping[str, JwtBundleKeys],
    now: datetime,
) -> ValidatedJwtSvid:
    """Check ``token`` as a JWT-SVID for ``audience`` against ``bundles`` (trust-domain
    name -> keys by ``kid``) at ``now``.

    Returns the subject and claims, or raises ``InvalidRequest`` (its ``reason`` says
    which check failed). The signature is checked before any claim is trusted.
    """
    if not audience:
        raise InvalidRequest("an audience is required", reason="jwt-audience-missing")
    if not token:
        raise InvalidRequest("a JWT-SVID is required", reason="jwt-missing")
    if len(token) > MAX_JWT_BYTES or not token.isascii():
        raise InvalidRequest(
            f"the JWT-SVID is not a compact JWS of at most {MAX_JWT_BYTES} bytes",
            reason="jwt-malformed",
        )
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidRequest(
            "the JWT-SVID is not a compact JWS (header.payload.signature)", reason="jwt-malformed"
        )
    header = _json_object(_b64(parts[0], "header"), "header")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
        raise InvalidRequest(
            f"alg {str(alg)[:32]!r} is not allowed for JWT-SVIDs", reason="jwt-alg-not-allowed"
        )
    if header.get("typ", "JWT") not in ("JWT", "JOSE"):
        raise InvalidRequest(
            "the JWT-SVID's typ is neither JWT nor JOSE", reason="jwt-typ-not-allowed"
        )
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidRequest("the JWT-SVID's header has no kid", reason="jwt-kid-missing")
    if "crit" in header:
        raise InvalidRequest("the JWT-SVID has critical header parameters", reason="jwt-malformed")
    payload = _b64(parts[1], "payload")
    signature = _b64(parts[2], "signature")
    claims = _json_object(payload, "payload")
    subject = claims.get("sub")
    if not isinstance(subject, str):
        raise InvalidRequest("the JWT-SVID has no sub", reason="jwt-subject-invalid")
    try:
        spiffe_id = SpiffeId.parse(subject)
    except InvalidSpiffeId as exc:
        raise InvalidRequest(
            f"the JWT-SVID's sub is not a SPIFFE ID: {exc.message}", reason="jwt-subject-invalid"
        ) from exc
    keys = bundles.get(spiffe_id.trust_domain.name)
    if keys is None:
        raise InvalidRequest(
            f"no JWT bundle for trust domain {spiffe_id.trust_domain.name!r}",
            reason="jwt-untrusted-domain",
        )
    key = keys.get(kid)
    if key is None:
        raise InvalidRequest(
            f"key {kid[:64]!r} is not in the JWT bundle of {spiffe_id.trust_domain.name}",
            reason="jwt-unknown-key",
        )
    try:
        _verify(key, alg, signature, f"{parts[0]}.{parts[1]}".encode())
    except InvalidSignature as exc:
        raise InvalidRequest(
            "the JWT-SVID's signature does not verify", reason="jwt-bad-signature"
        ) from exc
    expires = _number(claims, "exp")
    if expires is None:
        raise InvalidRequest("the JWT-SVID has no exp", reason="jwt-malformed")
    if now.timestamp() >= expires:
        raise InvalidRequest("the JWT-SVID has expired", reason="jwt-expired")
    not_before = _number(claims, "nbf")
    if not_before is not None and now.timestamp() < not_before:
        raise InvalidRequest("the JWT-SVID is not valid yet", reason="jwt-not-yet-valid")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud
    if not isinstance(audiences, list) or audience not in audiences:
        raise InvalidRequest(
            f"the JWT-SVID is not for audience {audience[:64]!r}", reason="jwt-audience-mismatch"
        )
    return ValidatedJwtSvid(str(spiffe_id), claims)
