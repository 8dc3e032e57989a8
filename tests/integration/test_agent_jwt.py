"""JWT-SVIDs through ``meshca agent``'s socket, with outside clients: py-spiffe's
``WorkloadApiClient`` and ``JwtSource`` fetch, validate and read bundles; pyjwt verifies
against the server's OIDC discovery JWKS; hostile requests are refused cleanly; after a
JWT key rotation the agent's bundle carries the new key and older tokens still validate."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spiffe import JwtSource, SpiffeId, TrustDomain, WorkloadApiClient
from spiffe._proto import workload_pb2, workload_pb2_grpc
from spiffe.svid.jwt_svid import JwtSvid
from spiffe.workloadapi.errors import FetchJwtSvidError, ValidateJwtSvidError

from tests.integration.agent_harness import AgentProcess, launch_agent, short_dir
from tests.integration.server_harness import TRUST_DOMAIN, RunningServer, running_server

pytestmark = pytest.mark.integration

WEB = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/web"
GOOD = (("workload.spiffe.io", "true"),)
AUDIENCE = "https://db.example.org"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _jwt_settings(**extra: Any) -> dict[str, Any]:
    port = _free_port()
    return {
        "journal_poll": timedelta(seconds=0.1),
        "bundle_endpoint": "127.0.0.1:0",
        "oidc_discovery": f"127.0.0.1:{port}",
        "jwt_issuer": f"http://127.0.0.1:{port}",
        **extra,
    }


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async for running in running_server(tmp_path, **_jwt_settings()):
        yield running


@pytest.fixture
def sockets() -> Iterator[Path]:
    directory = short_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def agent(server: RunningServer, sockets: Path) -> AsyncIterator[AgentProcess]:
    running = await asyncio.to_thread(launch_agent, server, sockets)
    try:
        await asyncio.to_thread(running.wait_health, "SERVING")
        yield running
    finally:
        await asyncio.to_thread(running.stop)


def _kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def _oidc_verify(token: str, issuer: str, audience: str) -> dict[str, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(issuer + "/.well-known/openid-configuration", timeout=5) as response:
        config = json.loads(response.read())
    client = jwt.PyJWKClient(config["jwks_uri"], cache_keys=False)
    key = client.get_signing_key_from_jwt(token)
    claims: dict[str, Any] = jwt.decode(
        token, key.key, algorithms=["ES256", "ES384"], audience=audience, issuer=issuer
    )
    return claims


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


async def test_py_spiffe_fetches_validates_and_reads_jwt_bundles(
    server: RunningServer, agent: AgentProcess
) -> None:
    def run() -> dict[str, Any]:
        found: dict[str, Any] = {}
        with WorkloadApiClient(socket_path=agent.endpoint, default_timeout=20) as client:
            svid = client.fetch_jwt_svid({AUDIENCE, "aws"})
            found["svid"] = svid
            found["again"] = client.fetch_jwt_svid({"aws", AUDIENCE})
            found["own"] = client.fetch_jwt_svid({AUDIENCE}, subject=SpiffeId(WEB))
            bundles = client.fetch_jwt_bundles()
            found["bundle"] = bundles.get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN))
            found["validated"] = client.validate_jwt_svid(svid.token, AUDIENCE)
            for name, token, audience in (
                ("wrong-audience", svid.token, "https://elsewhere.example.org"),
                ("tampered", _tamper(svid.token), AUDIENCE),
            ):
                try:
                    client.validate_jwt_svid(token, audience)
                    found[name] = "accepted"
                except ValidateJwtSvidError as exc:
                    found[name] = str(exc)
            try:
                client.fetch_jwt_svid({AUDIENCE}, subject=SpiffeId(f"spiffe://{TRUST_DOMAIN}/x"))
                found["other-id"] = "issued"
            except FetchJwtSvidError as exc:
                found["other-id"] = str(exc)
        with JwtSource(socket_path=agent.endpoint, timeout_in_seconds=20) as source:
            found["source-svid"] = source.fetch_svid({"https://api.example.org"})
            found["source-bundle"] = source.get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN))
        return found

    found = await asyncio.to_thread(run)
    svid = found["svid"]
    assert str(svid.spiffe_id) == WEB and set(svid.audience) == {AUDIENCE, "aws"}
    assert found["again"].token == svid.token, "served from the agent's cache"
    assert str(found["own"].spiffe_id) == WEB
    bundle = found["bundle"]
    assert bundle is not None and _kid(svid.token) in bundle.jwt_authorities
    # py-spiffe's own validator, with the bundle the agent served: an outside check.
    checked = JwtSvid.parse_and_validate(svid.token, bundle, {AUDIENCE})
    assert str(checked.spiffe_id) == WEB
    assert str(found["validated"].spiffe_id) == WEB
    assert found["wrong-audience"] != "accepted" and "INVALID_ARGUMENT" in found["wrong-audience"]
    assert found["tampered"] != "accepted" and "INVALID_ARGUMENT" in found["tampered"]
    assert "PERMISSION_DENIED" in found["other-id"]
    assert str(found["source-svid"].spiffe_id) == WEB
    assert _kid(found["source-svid"].token) in found["source-bundle"].jwt_authorities
    # An outside OIDC relying party accepts the agent's token.
    issuer = server.settings.jwt_issuer
    assert issuer is not None
    claims = await asyncio.to_thread(_oidc_verify, svid.token, issuer, "aws")
    assert claims["sub"] == WEB
    log = agent.log(400)
    assert "reason=jwt-audience-mismatch" in log and "reason=jwt-bad-signature" in log
    assert "reason=jwt-spiffe-id-not-ours" in log


def _unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return ".".join(
        (b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(signature))
    )


async def test_hostile_jwt_requests_are_refused_and_the_agent_keeps_serving(
    agent: AgentProcess,
) -> None:
    def run() -> dict[str, grpc.StatusCode]:
        codes: dict[str, grpc.StatusCode] = {}
        with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            good = stub.FetchJWTSVID(
                workload_pb2.JWTSVIDRequest(audience=["db"]), metadata=GOOD, timeout=20
            ).svids[0]
            claims = jwt.decode(good.svid, options={"verify_signature": False})
            stranger = ec.generate_private_key(ec.SECP256R1())
            forged = jwt.encode(
                claims, stranger, algorithm="ES256", headers={"kid": _kid(good.svid)}
            )
            unknown = jwt.encode(claims, stranger, algorithm="ES256", headers={"kid": "strange"})
            cases: dict[str, Any] = {
                "fetch/no-audience": lambda: stub.FetchJWTSVID(
                    workload_pb2.JWTSVIDRequest(), metadata=GOOD, timeout=5
                ),
                "fetch/1000-audiences": lambda: stub.FetchJWTSVID(
                    workload_pb2.JWTSVIDRequest(audience=[f"a{n}" for n in range(1000)]),
                    metadata=GOOD,
                    timeout=5,
                ),
                "fetch/another-id": lambda: stub.FetchJWTSVID(
                    workload_pb2.JWTSVIDRequest(
                        audience=["db"], spiffe_id=f"spiffe://{TRUST_DOMAIN}/ns/default/sa/api"
                    ),
                    metadata=GOOD,
                    timeout=5,
                ),
                "fetch/malformed-id": lambda: stub.FetchJWTSVID(
                    workload_pb2.JWTSVIDRequest(audience=["db"], spiffe_id="spiffe://a/b?c"),
                    metadata=GOOD,
                    timeout=5,
                ),
                "fetch/no-header": lambda: stub.FetchJWTSVID(
                    workload_pb2.JWTSVIDRequest(audience=["db"]), timeout=5
                ),
                "validate/garbage": lambda: stub.ValidateJWTSVID(
                    workload_pb2.ValidateJWTSVIDRequest(audience="db", svid="\x00garbage"),
                    metadata=GOOD,
                    timeout=5,
                ),
                "validate/no-audience": lambda: stub.ValidateJWTSVID(
                    workload_pb2.ValidateJWTSVIDRequest(svid=good.svid), metadata=GOOD, timeout=5
                ),
                "validate/alg-none": lambda: stub.ValidateJWTSVID(
                    workload_pb2.ValidateJWTSVIDRequest(
                        audience="db",
                        svid=_unsigned({"alg": "none", "kid": _kid(good.svid)}, claims, b""),
                    ),
                    metadata=GOOD,
                    timeout=5,
                ),
                "validate/forged-same-kid": lambda: stub.ValidateJWTSVID(
                    workload_pb2.ValidateJWTSVIDRequest(audience="db", svid=forged),
                    metadata=GOOD,
                    timeout=5,
                ),
                "validate/key-not-in-bundle": lambda: stub.ValidateJWTSVID(
                    workload_pb2.ValidateJWTSVIDRequest(audience="db", svid=unknown),
                    metadata=GOOD,
                    timeout=5,
                ),
                "bundles/no-header": lambda: next(
                    stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), timeout=5)
                ),
            }
            for name, call in cases.items():
                try:
                    call()
                    codes[name] = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    codes[name] = exc.code()
            answer = stub.ValidateJWTSVID(
                workload_pb2.ValidateJWTSVIDRequest(audience="db", svid=good.svid),
                metadata=GOOD,
                timeout=5,
            )
            codes["validate/good"] = grpc.StatusCode.OK
            assert answer.spiffe_id == WEB
            assert answer.claims["sub"] == WEB and answer.claims["aud"] == "db"
        return codes

    codes = await asyncio.to_thread(run)
    bad = grpc.StatusCode.INVALID_ARGUMENT
    assert codes == {
        "fetch/no-audience": bad,
        "fetch/1000-audiences": bad,
        "fetch/another-id": grpc.StatusCode.PERMISSION_DENIED,
        "fetch/malformed-id": bad,
        "fetch/no-header": bad,
        "validate/garbage": bad,
        "validate/no-audience": bad,
        "validate/alg-none": bad,
        "validate/forged-same-kid": bad,
        "validate/key-not-in-bundle": bad,
        "bundles/no-header": bad,
        "validate/good": grpc.StatusCode.OK,
    }
    log = agent.log(400)
    for reason in (
        "jwt-audience-missing",
        "jwt-too-many-audiences",
        "jwt-spiffe-id-not-ours",
        "jwt-alg-not-allowed",
        "jwt-bad-signature",
        "jwt-unknown-key",
        "jwt-malformed",
    ):
        assert f"reason={reason}" in log, reason
    await asyncio.to_thread(agent.wait_health, "SERVING")


async def test_any_string_as_svid_is_answered_cleanly(agent: AgentProcess) -> None:
    def run() -> None:
        with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)

            @settings(
                max_examples=150,
                deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture],
            )
            @given(svid=st.text(max_size=400), audience=st.text(max_size=40))
            def check(svid: str, audience: str) -> None:
                try:
                    stub.ValidateJWTSVID(
                        workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=svid),
                        metadata=GOOD,
                        timeout=5,
                    )
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
                else:
                    raise AssertionError(f"{svid!r} was accepted")

            check()

    await asyncio.to_thread(run)
    assert agent.process.poll() is None
    assert "Traceback" not in agent.log(2000)


ROTATING = {
    "max_svid_ttl": timedelta(seconds=4),
    "svid_ttl": timedelta(seconds=4),
    "propagation_delay": timedelta(seconds=2),
    # JWT keys live as long as intermediates (here): the serving certificate needs an
    # intermediate of at least a minute, so the first JWT key rotates after ~33s.
    "intermediate_ttl": timedelta(seconds=64),
    "max_jwt_svid_ttl": timedelta(seconds=6),
}


async def test_after_a_jwt_key_rotation_the_agent_serves_the_new_key_and_old_tokens_validate(
    tmp_path: Path, sockets: Path
) -> None:
    async for server in running_server(tmp_path, **_jwt_settings(**ROTATING)):
        agent = await asyncio.to_thread(launch_agent, server, sockets)
        try:
            await asyncio.to_thread(agent.wait_health, "SERVING")
            await asyncio.to_thread(_watch_rotation, server, agent)
        finally:
            await asyncio.to_thread(agent.stop)


def _watch_rotation(server: RunningServer, agent: AgentProcess) -> None:
    issuer = server.settings.jwt_issuer
    assert issuer is not None
    with (
        WorkloadApiClient(socket_path=agent.endpoint, default_timeout=20) as client,
        JwtSource(socket_path=agent.endpoint, timeout_in_seconds=20) as source,
    ):
        pushed: list[set[str]] = []

        def on_update() -> None:
            bundle = source.get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN))
            pushed.append(set(bundle.jwt_authorities) if bundle is not None else set())

        source.subscribe_for_updates(on_update)
        first = client.fetch_jwt_svid({AUDIENCE})
        old_kid = _kid(first.token)
        last_old = first
        deadline = time.monotonic() + 70
        while time.monotonic() < deadline:
            svid = client.fetch_jwt_svid({AUDIENCE})
            if _kid(svid.token) == old_kid:
                last_old = svid
                time.sleep(0.2)
                continue
            # The new key signs: the agent's bundle already has it (it was published
            # before it signed anything) and still has the old one.
            bundle = client.fetch_jwt_bundles().get_bundle_for_trust_domain(
                TrustDomain(TRUST_DOMAIN)
            )
            assert bundle is not None
            assert {old_kid, _kid(svid.token)} <= set(bundle.jwt_authorities)
            assert str(client.validate_jwt_svid(svid.token, AUDIENCE).spiffe_id) == WEB
            assert str(client.validate_jwt_svid(last_old.token, AUDIENCE).spiffe_id) == WEB, (
                "a token of the retired key still validates while the key is in the bundle"
            )
            assert _oidc_verify(svid.token, issuer, AUDIENCE)["sub"] == WEB
            # FetchJWTBundles pushed the new key to a stream opened before it existed.
            assert any(_kid(svid.token) in keys for keys in pushed), pushed
            break
        else:
            raise AssertionError(f"no JWT key rotation seen:\n{agent.log()}")
        # The retired key leaves the agent's bundle once its tokens have expired.
        while time.monotonic() < deadline + 20:
            bundle = client.fetch_jwt_bundles().get_bundle_for_trust_domain(
                TrustDomain(TRUST_DOMAIN)
            )
            if bundle is not None and old_kid not in bundle.jwt_authorities:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the retired key {old_kid} never left the bundle")
        try:
            client.validate_jwt_svid(last_old.token, AUDIENCE)
            raise AssertionError("a token of a removed key validated")
        except ValidateJwtSvidError as exc:
            assert "INVALID_ARGUMENT" in str(exc)
