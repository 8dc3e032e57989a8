"""The agent's JWT-SVID use cases: audience and SPIFFE ID checks before the server is
asked, the bounded reuse cache, the token re-read per server call, local validation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.core.agent import AgentSvid, TrustBundleView
from meshca.core.agent_jwt import AgentJwtSvid
from meshca.core.errors import (
    AuthorityNotReady,
    BackendUnavailable,
    InvalidRequest,
    InvalidSpiffeId,
    NotAuthorized,
)
from meshca.core.jwt_svid import public_jwk
from meshca.service.agent import AgentState
from meshca.service.agent_jwt import AgentJwt
from tests.fakes import FakeClock

WEB = "spiffe://example.org/ns/shop/sa/web"
KEY = ec.generate_private_key(ec.SECP256R1())


@dataclass
class FakeJwtUpstream:
    """The server's SignJwtSvid: a token for WEB valid ``ttl``; ``fail`` injects an outage."""

    clock: FakeClock
    ttl: timedelta = timedelta(minutes=5)
    calls: list[tuple[str, tuple[str, ...], str]] = field(default_factory=list)
    fail: bool = False

    async def sign_jwt(
        self, token: str, audiences: tuple[str, ...], spiffe_id: str
    ) -> AgentJwtSvid:
        self.calls.append((token, audiences, spiffe_id))
        if self.fail:
            raise BackendUnavailable("server down")
        self.clock.advance(timedelta(milliseconds=5))  # the server takes a moment
        now = self.clock.now()
        claims = {"sub": WEB, "aud": list(audiences), "exp": int((now + self.ttl).timestamp())}
        signed = jwt.encode(claims, KEY, algorithm="ES256", headers={"kid": "k1"})
        return AgentJwtSvid(WEB, signed, now, now + self.ttl)


@dataclass
class Tokens:
    reads: int = 0

    def __call__(self) -> str:
        self.reads += 1
        return f"pod-token-{self.reads}"


async def _agent(cache_size: int = 4) -> tuple[AgentJwt, FakeJwtUpstream, Tokens, FakeClock]:
    clock = FakeClock()
    state = AgentState()
    now = clock.now()
    svid = AgentSvid(WEB, (b"leaf",), b"key", now, now + timedelta(hours=1), "1")
    await state.set_svid(svid, (b"root",))
    jwks = json.dumps({"keys": [public_jwk(KEY.public_key(), "k1")]}).encode()
    await state.set_bundle(TrustBundleView("example.org", (b"root",), 1, jwt_bundle=jwks))
    upstream = FakeJwtUpstream(clock)
    tokens = Tokens()
    agent = AgentJwt(state, upstream, read_token=tokens, clock=clock, cache_size=cache_size)
    return agent, upstream, tokens, clock


async def test_a_token_is_reused_until_half_its_life_then_fetched_again() -> None:
    agent, upstream, tokens, clock = await _agent()
    first = await agent.fetch(("db", "cache"))
    assert await agent.fetch(("cache", "db", "db")) == first, "same audience set"
    clock.advance(timedelta(minutes=2, seconds=29))
    assert await agent.fetch(("db", "cache")) == first
    assert len(upstream.calls) == 1
    clock.advance(timedelta(seconds=1))
    second = await agent.fetch(("db", "cache"))
    assert second != first and len(upstream.calls) == 2
    assert [c[0] for c in upstream.calls] == ["pod-token-1", "pod-token-2"], "token re-read"
    assert tokens.reads == 2


async def test_the_cache_is_bounded() -> None:
    agent, upstream, _tokens, _clock = await _agent(cache_size=4)
    for n in range(10):
        await agent.fetch((f"aud-{n}",))
    assert agent.cached == 4
    await agent.fetch(("aud-9",))
    assert len(upstream.calls) == 10, "the most recent stays"
    await agent.fetch(("aud-0",))
    assert len(upstream.calls) == 11, "the oldest left"


@pytest.mark.parametrize(
    ("audiences", "spiffe_id", "error", "reason"),
    [
        pytest.param((), "", InvalidRequest, "jwt-audience-missing", id="fail/no-audience"),
        pytest.param(
            tuple(f"a{n}" for n in range(1000)),
            "",
            InvalidRequest,
            "jwt-too-many-audiences",
            id="fail/1000-audiences",
        ),
        pytest.param(("",), "", InvalidRequest, "jwt-audience-invalid", id="fail/empty-audience"),
        pytest.param(
            ("db",),
            "spiffe://example.org/ns/shop/sa/admin",
            NotAuthorized,
            "jwt-spiffe-id-not-ours",
            id="fail/another-spiffe-id",
        ),
        pytest.param(("db",), "not-a-spiffe-id", InvalidSpiffeId, None, id="fail/bad-spiffe-id"),
    ],
)
async def test_bad_requests_never_reach_the_server(
    audiences: tuple[str, ...], spiffe_id: str, error: type[Exception], reason: str | None
) -> None:
    agent, upstream, tokens, _clock = await _agent()
    with pytest.raises(error) as caught:
        await agent.fetch(audiences, spiffe_id)
    if reason is not None:
        assert getattr(caught.value, "reason", None) == reason
    assert upstream.calls == [] and tokens.reads == 0


async def test_its_own_spiffe_id_may_be_named_and_outages_are_not_cached() -> None:
    agent, upstream, _tokens, _clock = await _agent()
    upstream.fail = True
    with pytest.raises(BackendUnavailable):
        await agent.fetch(("db",), WEB)
    upstream.fail = False
    svid = await agent.fetch(("db",), WEB)
    assert svid.spiffe_id == WEB and upstream.calls[-1][2] == WEB


async def test_validate_checks_against_the_bundle_held() -> None:
    agent, _upstream, _tokens, clock = await _agent()
    svid = await agent.fetch(("db",))
    assert agent.validate(svid.token, "db").spiffe_id == WEB
    with pytest.raises(InvalidRequest) as caught:
        agent.validate(svid.token, "other")
    assert caught.value.reason == "jwt-audience-mismatch"
    clock.advance(timedelta(minutes=5))
    with pytest.raises(InvalidRequest) as caught:
        agent.validate(svid.token, "db")
    assert caught.value.reason == "jwt-expired"


async def test_validate_without_a_bundle_is_not_ready() -> None:
    clock = FakeClock()
    agent = AgentJwt(AgentState(), FakeJwtUpstream(clock), read_token=Tokens(), clock=clock)
    with pytest.raises(AuthorityNotReady):
        agent.validate("a.b.c", "db")


async def test_a_jwt_key_change_alone_is_a_bundle_change_and_survives_a_new_root() -> None:
    state = AgentState()
    await state.set_bundle(TrustBundleView("example.org", (b"r1",), 1, jwt_bundle=b'{"keys": [1]}'))
    before = state.current.version
    await state.set_bundle(TrustBundleView("example.org", (b"r1",), 2, jwt_bundle=b'{"keys": [1]}'))
    assert state.current.version == before, "nothing changed"
    await state.set_bundle(TrustBundleView("example.org", (b"r1",), 3, jwt_bundle=b'{"keys": [2]}'))
    assert state.current.version == before + 1, "the JWT keys changed: streams must push"
    now = FakeClock().now()
    svid = AgentSvid(WEB, (b"leaf",), b"key", now, now + timedelta(hours=1), "1")
    await state.set_svid(svid, (b"r2", b"r1"))  # a root the watch has not shown yet
    bundle = state.current.bundle
    assert bundle is not None and bundle.roots_der == (b"r2", b"r1")
    assert bundle.jwt_bundle == b'{"keys": [2]}', "the JWT keys are kept"
