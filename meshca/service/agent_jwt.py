"""The agent's JWT-SVID use cases: fetch one through the server (with a small cache),
and validate one locally against the JWT bundle the agent follows.

Fetching: the audiences are checked here first (the server's rules: 1..16, each 1..255
bytes), so a hostile workload cannot make the agent call the server with junk; a
``spiffe_id`` asked for must be the pod's own. The token is re-read from its file for
every call to the server. A token is handed out again while it has more than half its
lifetime left (``core.agent_jwt.jwt_reusable``); the cache holds at most ``cache_size``
audience sets, the least recently used leaving first.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import datetime

from meshca.core.agent import TrustBundleView
from meshca.core.agent_jwt import (
    AgentJwtSvid,
    JwtBundleKeys,
    JwtUpstream,
    ValidatedJwtSvid,
    jwt_reusable,
    parse_jwks,
    validate_jwt_svid,
)
from meshca.core.errors import AuthorityNotReady, InvalidRequest, NotAuthorized
from meshca.core.jwt_svid import check_audiences
from meshca.core.ports import Clock
from meshca.core.spiffe import SpiffeId
from meshca.service.agent import AgentState

__all__ = ["DEFAULT_JWT_CACHE_SIZE", "AgentJwt"]

log = logging.getLogger("meshca.agent.jwt")

#: Distinct (audiences, SPIFFE ID) requests whose tokens are kept for reuse.
DEFAULT_JWT_CACHE_SIZE = 128

_CacheKey = tuple[tuple[str, ...], str]


class AgentJwt:
    """FetchJWTSVID and ValidateJWTSVID over the agent's state and the server."""

    def __init__(
        self,
        state: AgentState,
        upstream: JwtUpstream,
        *,
        read_token: Callable[[], str],
        clock: Clock,
        cache_size: int = DEFAULT_JWT_CACHE_SIZE,
    ) -> None:
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self._state = state
        self._upstream = upstream
        self._read_token = read_token
        self._clock = clock
        self._cache_size = cache_size
        self._cache: OrderedDict[_CacheKey, AgentJwtSvid] = OrderedDict()
        self._parsed: tuple[bytes, JwtBundleKeys] | None = None
        self.server_calls = 0

    @property
    def cached(self) -> int:
        return len(self._cache)

    async def fetch(self, audiences: tuple[str, ...], spiffe_id: str = "") -> AgentJwtSvid:
        """A JWT-SVID of the pod's identity for ``audiences``.

        ``InvalidRequest`` for bad audiences or a malformed ``spiffe_id``;
        ``NotAuthorized`` for a SPIFFE ID other than the pod's; the server's refusals
        and outages as ``meshca.core.agent_jwt.JwtUpstream`` says.
        """
        wanted = check_audiences(audiences)
        if spiffe_id:
            SpiffeId.parse(spiffe_id)  # InvalidSpiffeId (an InvalidRequest) if malformed
            held = self._state.current.svid
            if held is not None and held.spiffe_id != spiffe_id:
                raise NotAuthorized(
                    f"{spiffe_id[:256]} is not this workload's identity ({held.spiffe_id})",
                    reason="jwt-spiffe-id-not-ours",
                )
        key: _CacheKey = (tuple(sorted(wanted)), spiffe_id)
        now = self._clock.now()
        cached = self._cache.get(key)
        if cached is not None:
            if jwt_reusable(cached, now):
                self._cache.move_to_end(key)
                return cached
            del self._cache[key]
        token = self._read_token()
        self.server_calls += 1
        svid = await self._upstream.sign_jwt(token, wanted, spiffe_id)
        if spiffe_id and svid.spiffe_id != spiffe_id:
            raise NotAuthorized(
                f"the server signed for {svid.spiffe_id}, not {spiffe_id[:256]}",
                reason="jwt-spiffe-id-not-ours",
            )
        if self._cache_size:
            self._cache[key] = svid
            self._cache.move_to_end(key)
            self._prune(self._clock.now())  # not `now`: the new token came after it
        return svid

    def _prune(self, now: datetime) -> None:
        for stale in [k for k, v in self._cache.items() if not jwt_reusable(v, now)]:
            del self._cache[stale]
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def bundle_keys(self) -> Mapping[str, JwtBundleKeys]:
        """The JWT keys the agent trusts, by trust-domain name (parsed once per bundle)."""
        bundle: TrustBundleView | None = self._state.current.bundle
        if bundle is None:
            raise AuthorityNotReady(
                "the agent has no trust bundle from the server yet", reason="no-bundle-yet"
            )
        if self._parsed is None or self._parsed[0] != bundle.jwt_bundle:
            self._parsed = (bundle.jwt_bundle, parse_jwks(bundle.jwt_bundle))
        return {bundle.trust_domain: self._parsed[1]}

    def validate(self, token: str, audience: str) -> ValidatedJwtSvid:
        """``token`` checked for ``audience`` against the agent's JWT bundle now."""
        if not audience:
            raise InvalidRequest("an audience is required", reason="jwt-audience-missing")
        if not token:
            raise InvalidRequest("a JWT-SVID is required", reason="jwt-missing")
        return validate_jwt_svid(token, audience, self.bundle_keys(), self._clock.now())
