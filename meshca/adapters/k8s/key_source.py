"""The public keys a Kubernetes API server signs service-account tokens with.

``JwksKeySource`` loads a JSON Web Key Set from a file, a URL, or the issuer's OIDC
discovery document, keeps it in memory and refreshes it when asked. Fetching runs in a
worker thread. Refreshes are serialised: callers that miss at the same time share one
fetch, and unknown-key refreshes happen at most once per ``min_refresh_interval``, so a
stream of forged key ids cannot turn meshca into a load generator against the issuer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.exceptions import PyJWTError

from meshca.adapters.k8s._http import DEFAULT_MAX_BYTES, HttpClient, check_http_url
from meshca.core.errors import BackendUnavailable

__all__ = ["ALLOWED_ALGORITHMS", "JwksKeySource", "KeySet", "VerificationKey", "parse_jwks"]

log = logging.getLogger(__name__)

_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHM_BY_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
#: Only asymmetric signatures: "none" and HMAC (whose "key" would be public) never pass.
ALLOWED_ALGORITHMS = _RSA_ALGORITHMS | frozenset(_EC_ALGORITHM_BY_CURVE.values())
_MIN_RSA_BITS = 2048
_DEFAULT_TIMEOUT = 5.0

VerifyingKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One usable public key and the algorithms it may verify."""

    kid: str | None
    algorithms: frozenset[str]
    public_key: VerifyingKey


@dataclass(frozen=True, slots=True)
class KeySet:
    """The usable keys of one JWKS document, in document order."""

    keys: tuple[VerificationKey, ...]

    def with_kid(self, kid: str | None) -> tuple[VerificationKey, ...]:
        """Keys named ``kid``; for a token without a kid, every key."""
        if kid is None:
            return self.keys
        return tuple(key for key in self.keys if key.kid == kid)


def _public_key(jwk: Mapping[str, Any]) -> tuple[VerifyingKey, frozenset[str]] | None:
    """The key and the algorithms its type allows, or None if we do not accept it."""
    # Only public members are passed on, so a careless JWKS that includes private
    # parameters costs nothing and leaks nothing further.
    kty = jwk.get("kty")
    if kty == "RSA":
        rsa_key = RSAAlgorithm.from_jwk({"kty": "RSA", "n": jwk.get("n"), "e": jwk.get("e")})
        if isinstance(rsa_key, rsa.RSAPublicKey) and rsa_key.key_size >= _MIN_RSA_BITS:
            return rsa_key, _RSA_ALGORITHMS
    elif kty == "EC":
        crv = jwk.get("crv")
        members = {"kty": "EC", "crv": crv, "x": jwk.get("x"), "y": jwk.get("y")}
        ec_key = ECAlgorithm.from_jwk(members)
        if isinstance(ec_key, ec.EllipticCurvePublicKey) and crv in _EC_ALGORITHM_BY_CURVE:
            return ec_key, frozenset({_EC_ALGORITHM_BY_CURVE[crv]})
    return None


def _verification_key(jwk: Mapping[str, Any]) -> VerificationKey | None:
    """The signing key in ``jwk``, or None when it is not one we accept."""
    kid = jwk.get("kid")
    if (kid is not None and not isinstance(kid, str)) or jwk.get("use", "sig") != "sig":
        return None
    try:
        found = _public_key(jwk)
    except (PyJWTError, ValueError, TypeError, KeyError):
        return None
    if found is None:
        return None
    public, algorithms = found
    alg = jwk.get("alg")
    if alg is not None:
        if alg not in algorithms:
            return None
        algorithms = frozenset({alg})
    return VerificationKey(kid=kid, algorithms=algorithms, public_key=public)


def parse_jwks(document: bytes, source: str) -> KeySet:
    """Parse a JWKS document; unusable keys are skipped, a broken document is an error.

    Raises ``BackendUnavailable``: a source that serves garbage cannot vouch for anyone.
    """
    try:
        parsed = json.loads(document)
    except (ValueError, RecursionError):
        raise BackendUnavailable(f"JWKS from {source} is not valid JSON") from None
    entries = parsed.get("keys") if isinstance(parsed, dict) else None
    if not isinstance(entries, list):
        raise BackendUnavailable(f"JWKS from {source} has no 'keys' list")
    keys = tuple(
        key
        for key in (_verification_key(e) for e in entries if isinstance(e, dict))
        if key is not None
    )
    if len(keys) < len(entries):
        log.info("JWKS from %s: skipped %d unusable keys", source, len(entries) - len(keys))
    return KeySet(keys)


class JwksKeySource:
    """A cached JWKS with serialised, rate-limited refreshes.

    ``fetch`` is blocking and returns the document bytes (raising ``BackendUnavailable``);
    it runs in a worker thread. ``max_age``, if set, makes ``current()`` refresh a key set
    older than that, so removed (revoked) keys stop verifying; if that refresh fails the
    old set stays in use. ``monotonic`` is injectable for tests.
    """

    def __init__(
        self,
        fetch: Callable[[], bytes],
        *,
        source: str,
        min_refresh_interval: timedelta = timedelta(seconds=30),
        max_age: timedelta | None = timedelta(minutes=10),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self.source = source
        self._min_interval = min_refresh_interval.total_seconds()
        self._max_age = max_age.total_seconds() if max_age is not None else None
        self._monotonic = monotonic
        self._lock = asyncio.Lock()
        self._keys: KeySet | None = None
        self._loaded_at = 0.0
        self._attempted_at: float | None = None
        # Bumped when a fetch attempt ends; a waiter that sees it moved knows its question
        # was answered while it queued.
        self._attempts = 0
        self._last_error: BackendUnavailable | None = None

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        min_refresh_interval: timedelta = timedelta(seconds=30),
        max_age: timedelta | None = timedelta(minutes=10),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> JwksKeySource:
        """Keys from a JWKS file, e.g. ``kubectl get --raw /openid/v1/jwks`` output."""
        file = Path(path)

        def fetch() -> bytes:
            try:
                with file.open("rb") as stream:
                    data = stream.read(DEFAULT_MAX_BYTES + 1)
            except OSError as error:
                raise BackendUnavailable(f"cannot read JWKS file {file}: {error}") from None
            if len(data) > DEFAULT_MAX_BYTES:
                raise BackendUnavailable(f"JWKS file {file} is over {DEFAULT_MAX_BYTES} bytes")
            return data

        return cls(
            fetch,
            source=str(file),
            min_refresh_interval=min_refresh_interval,
            max_age=max_age,
            monotonic=monotonic,
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        ca_file: str | None = None,
        *,
        timeout: float = _DEFAULT_TIMEOUT,
        min_refresh_interval: timedelta = timedelta(seconds=30),
        max_age: timedelta | None = timedelta(minutes=10),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> JwksKeySource:
        """Keys from a JWKS URL such as ``https://<api-server>/openid/v1/jwks``."""
        url = check_http_url(url, "JWKS URL")
        client = HttpClient(ca_file=ca_file, timeout=timeout)
        return cls(
            lambda: _get_ok(client, url, "JWKS endpoint"),
            source=url,
            min_refresh_interval=min_refresh_interval,
            max_age=max_age,
            monotonic=monotonic,
        )

    @classmethod
    def from_discovery(
        cls,
        issuer_url: str,
        ca_file: str | None = None,
        *,
        timeout: float = _DEFAULT_TIMEOUT,
        min_refresh_interval: timedelta = timedelta(seconds=30),
        max_age: timedelta | None = timedelta(minutes=10),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> JwksKeySource:
        """Keys found through ``<issuer>/.well-known/openid-configuration``.

        The discovery document must name exactly ``issuer_url`` as its issuer; its
        ``jwks_uri`` is looked up on first use and kept once found.
        """
        check_http_url(issuer_url, "issuer URL")
        discovery_url = issuer_url.rstrip("/") + "/.well-known/openid-configuration"
        client = HttpClient(ca_file=ca_file, timeout=timeout)
        found: list[str] = []

        def fetch() -> bytes:
            # Only one fetch runs at a time (the source's lock), so `found` needs no lock.
            if not found:
                found.append(_jwks_uri(client, discovery_url, issuer_url))
            return _get_ok(client, found[0], "JWKS endpoint")

        return cls(
            fetch,
            source=discovery_url,
            min_refresh_interval=min_refresh_interval,
            max_age=max_age,
            monotonic=monotonic,
        )

    async def current(self) -> KeySet:
        """The key set, loading it on first use and refreshing it once it is too old.

        Raises ``BackendUnavailable`` only when no key set was ever loaded.
        """
        keys = self._keys
        if keys is None:
            return await self._load(self._attempts)
        if self._max_age is not None and self._monotonic() - self._loaded_at >= self._max_age:
            if self._refresh_allowed():
                try:
                    return await self._load(self._attempts)
                except BackendUnavailable as error:
                    log.warning("keeping the old key set: %s", error.message)
                    return self._keys or keys
        return keys

    async def refresh(self) -> KeySet:
        """Fetch again because a token named a key we lack, unless that happened lately.

        A fetch already in flight is awaited and shared. Raises ``BackendUnavailable`` if
        the fetch fails.
        """
        seen = self._attempts
        if self._keys is not None and not self._lock.locked() and not self._refresh_allowed():
            return self._keys
        return await self._load(seen)

    def _refresh_allowed(self) -> bool:
        return (
            self._attempted_at is None
            or self._monotonic() - self._attempted_at >= self._min_interval
        )

    async def _load(self, attempts_seen: int) -> KeySet:
        async with self._lock:
            if self._attempts != attempts_seen:
                # A fetch finished while we queued; share its answer.
                if self._last_error is not None:
                    raise BackendUnavailable(self._last_error.message)
                if self._keys is not None:
                    return self._keys
            self._attempted_at = self._monotonic()
            self._last_error = None
            try:
                document = await asyncio.to_thread(self._fetch)
                keys = parse_jwks(document, self.source)
            except BackendUnavailable as error:
                self._last_error = error
                raise
            finally:
                # Counted only once finished, so callers queued behind it share it.
                self._attempts += 1
            self._keys = keys
            self._loaded_at = self._monotonic()
            log.info("loaded %d keys from %s", len(keys.keys), self.source)
            return keys


def _get_ok(client: HttpClient, url: str, what: str) -> bytes:
    response = client.request(url, what=what, headers={"Accept": "application/json"})
    if response.status != 200:
        raise BackendUnavailable(f"{what} at {url} answered HTTP {response.status}")
    return response.body


def _jwks_uri(client: HttpClient, discovery_url: str, issuer_url: str) -> str:
    body = _get_ok(client, discovery_url, "OIDC discovery endpoint")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        document = None
    if not isinstance(document, dict):
        raise BackendUnavailable(f"OIDC discovery document at {discovery_url} is not JSON")
    if document.get("issuer") != issuer_url:
        raise BackendUnavailable(
            f"OIDC discovery at {discovery_url} names issuer {str(document.get('issuer'))[:200]!r}"
            f", not the configured {issuer_url!r}"
        )
    jwks_uri = document.get("jwks_uri")
    try:
        return check_http_url(jwks_uri if isinstance(jwks_uri, str) else "", "jwks_uri")
    except ValueError:
        raise BackendUnavailable(
            f"OIDC discovery at {discovery_url} has no usable http(s) jwks_uri"
        ) from None
