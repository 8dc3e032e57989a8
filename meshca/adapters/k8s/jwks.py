"""Offline attestation: verify a service-account token against the issuer's public keys.

No call to the API server per token, so it keeps working while the API server is busy,
but it cannot notice a deleted pod or service account before the token expires (keep
token lifetimes short, or use ``TokenReviewAttestor``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import jwt
from jwt.exceptions import PyJWTError

from meshca.adapters.k8s.claims import (
    LEGACY_ISSUER,
    decode_unverified,
    identity_from_claims,
    is_legacy_token,
    numeric_date,
    shown,
)
from meshca.adapters.k8s.key_source import (
    ALLOWED_ALGORITHMS,
    JwksKeySource,
    KeySet,
    VerificationKey,
)
from meshca.core.errors import AuthenticationFailed
from meshca.core.identity import KubernetesIdentity
from meshca.core.ports import Clock

__all__ = ["ALLOWED_ALGORITHMS", "JwksAttestor", "JwksKeySource", "KeySet"]


class JwksAttestor:
    """An ``Attestor`` that validates tokens offline.

    A token passes only if: its ``alg`` is RS/PS/ES 256/384/512 and fits the key; its
    signature verifies under a key from ``keys`` (an unknown ``kid`` triggers one
    rate-limited refresh); ``iss`` equals ``issuer``; ``aud`` includes one of
    ``audiences``; by ``clock`` and within ``leeway`` it is not expired, not before its
    ``nbf``, and not issued in the future; and its Kubernetes claims are complete and
    agree with ``sub``. Legacy tokens (issuer ``kubernetes/serviceaccount``, no ``aud``,
    no ``exp``) pass only with ``allow_legacy_tokens``, and then with no audience check.
    """

    def __init__(
        self,
        *,
        issuer: str,
        audiences: Sequence[str],
        keys: JwksKeySource,
        clock: Clock,
        allow_legacy_tokens: bool = False,
        leeway: timedelta = timedelta(seconds=30),
    ) -> None:
        if not audiences:
            raise ValueError("at least one audience is required")
        self._issuer = issuer
        self._audiences = frozenset(audiences)
        self._keys = keys
        self._clock = clock
        self._allow_legacy = allow_legacy_tokens
        self._leeway = leeway.total_seconds()
        # Enforcing minimum key lengths keeps pyjwt from warning (an error under test).
        self._jws = jwt.PyJWS(
            algorithms=sorted(ALLOWED_ALGORITHMS), options={"enforce_minimum_key_length": True}
        )

    def with_audiences(self, audiences: Sequence[str]) -> JwksAttestor:
        """This attestor (same issuer, keys and key refreshes) accepting other audiences.

        For a second door whose tokens are minted for another audience (Linkerd's).
        """
        if not audiences:
            raise ValueError("at least one audience is required")
        other = copy.copy(self)
        other._audiences = frozenset(audiences)
        return other

    async def attest(self, token: str) -> KubernetesIdentity:
        header, claims = decode_unverified(token)
        alg, kid = _algorithm_and_kid(header)
        candidates = await self._keys_for(kid, alg)
        self._verify_signature(token, alg, candidates)
        # From here on the claims are the issuer's own words.
        legacy = is_legacy_token(claims)
        if legacy and not self._allow_legacy:
            raise AuthenticationFailed(
                "token is a legacy or non-expiring service-account token; use a projected token",
                reason="token-legacy",
            )
        self._check_issuer(claims, legacy)
        self._check_audience(claims, legacy)
        self._check_times(claims)
        return identity_from_claims(claims, allow_legacy_tokens=self._allow_legacy)

    async def _keys_for(self, kid: str | None, alg: str) -> tuple[VerificationKey, ...]:
        matching = (await self._keys.current()).with_kid(kid)
        if not matching and kid is not None:
            # Maybe the issuer rotated keys since we last looked.
            matching = (await self._keys.refresh()).with_kid(kid)
        if not matching:
            raise AuthenticationFailed(
                f"token is signed with unknown key id {shown(kid)}", reason="token-unknown-key"
            )
        usable = tuple(key for key in matching if alg in key.algorithms)
        if not usable:
            raise AuthenticationFailed(
                f"token algorithm {alg} does not fit key {shown(kid)}",
                reason="token-bad-algorithm",
            )
        return usable

    def _verify_signature(
        self, token: str, alg: str, candidates: Sequence[VerificationKey]
    ) -> None:
        for key in candidates:
            try:
                self._jws.decode(token, key=key.public_key, algorithms=[alg])
            except (PyJWTError, ValueError):
                continue
            return
        raise AuthenticationFailed("token signature does not verify", reason="token-bad-signature")

    def _check_issuer(self, claims: Mapping[str, Any], legacy: bool) -> None:
        issuer = claims.get("iss")
        if issuer == self._issuer or (legacy and issuer == LEGACY_ISSUER):
            return
        raise AuthenticationFailed(
            f"token issuer {shown(issuer)} is not {self._issuer!r}", reason="token-wrong-issuer"
        )

    def _check_audience(self, claims: Mapping[str, Any], legacy: bool) -> None:
        audience = claims.get("aud")
        if audience is None and legacy:
            return  # legacy tokens have no audience; allowing them accepts that
        listed = [audience] if isinstance(audience, str) else audience
        if isinstance(listed, list) and self._audiences.intersection(
            a for a in listed if isinstance(a, str)
        ):
            return
        raise AuthenticationFailed(
            f"token audience {shown(audience)} includes none of {sorted(self._audiences)}",
            reason="token-wrong-audience",
        )

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now = self._clock.now().timestamp()
        expires = numeric_date(claims, "exp")
        if expires is not None and now - self._leeway >= expires:
            raise AuthenticationFailed("token has expired", reason="token-expired")
        not_before = numeric_date(claims, "nbf")
        if not_before is not None and now + self._leeway < not_before:
            raise AuthenticationFailed("token is not valid yet", reason="token-not-yet-valid")
        issued = numeric_date(claims, "iat")
        if issued is not None and now + self._leeway < issued:
            raise AuthenticationFailed(
                "token is issued in the future", reason="token-not-yet-valid"
            )


def _algorithm_and_kid(header: Mapping[str, Any]) -> tuple[str, str | None]:
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
        raise AuthenticationFailed(
            f"token algorithm {shown(alg)} is not allowed; expected one of "
            f"{', '.join(sorted(ALLOWED_ALGORITHMS))}",
            reason="token-bad-algorithm",
        )
    if "crit" in header:
        # Kubernetes never sets critical extensions; we understand none.
        raise AuthenticationFailed(
            "token header declares critical extensions", reason="token-malformed"
        )
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise AuthenticationFailed("token header 'kid' is not a string", reason="token-malformed")
    return alg, kid
