"""JWT-SVIDs through the real server: signed over gRPC, verified by pyjwt the way outside
verifiers do (the SPIFFE bundle endpoint's JWKS, and OIDC discovery), refused on hostile
input with the right status, and recorded in the verifiable log."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import ssl
import urllib.request
from collections.abc import AsyncIterator
from contextlib import redirect_stderr, redirect_stdout
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshca.adapters.grpc._gen.meshca.v1 import ca_pb2, ca_pb2_grpc, jwt_pb2, jwt_pb2_grpc
from meshca.adapters.vault.transit_key import TransitSigningKey
from meshca.cli import main as meshca_main
from meshca.cli.ca_cmd import load_bundle
from tests.fixtures_vault import OpenBao, vault_overrides
from tests.integration.serve_process import launch
from tests.integration.server_harness import (
    RunningServer,
    TokenMinter,
    running_server,
    serve_command,
)

pytestmark = pytest.mark.integration

WEB_ID = "spiffe://example.org/ns/shop/sa/web"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    # The issuer is the URL outside verifiers reach discovery at: known before start.
    port = _free_port()
    async for running in running_server(
        tmp_path,
        bundle_endpoint="127.0.0.1:0",
        oidc_discovery=f"127.0.0.1:{port}",
        jwt_issuer=f"http://127.0.0.1:{port}",
        max_jwt_svid_ttl=timedelta(minutes=30),
    ):
        yield running


async def _sign(server: RunningServer, token: str | None = None, **fields: Any) -> Any:
    request = jwt_pb2.SignJwtSvidRequest(**({"audiences": ["https://db.example.org"]} | fields))
    token = server.minter.mint("shop", "web") if token is None else token
    async with server.channel() as channel:
        stub = jwt_pb2_grpc.JwtSvidServiceStub(channel)
        return await stub.SignJwtSvid(request, metadata=[("authorization", f"Bearer {token}")])


def _get(url: str, context: ssl.SSLContext | None = None) -> bytes:
    handlers: list[Any] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    with urllib.request.build_opener(*handlers).open(url, timeout=5) as response:
        body: bytes = response.read()
    return body


def _spiffe_bundle(server: RunningServer) -> dict[str, Any]:
    roots = load_bundle(server.settings.data_dir)
    context = ssl.create_default_context(
        cadata="".join(r.public_bytes(Encoding.PEM).decode() for r in roots)
    )
    port = server.worker.bundle_port
    document: dict[str, Any] = json.loads(_get(f"https://127.0.0.1:{port}/", context))
    return document


def _verify_with_spiffe_bundle(token: str, bundle: dict[str, Any], audience: str) -> Any:
    """What a SPIFFE verifier does: the key named by ``kid`` among the jwt-svid entries."""
    keys = {k["kid"]: k for k in bundle["keys"] if k["use"] == "jwt-svid"}
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256" and header["typ"] == "JWT"
    key = jwt.PyJWK(keys[header["kid"]], algorithm="ES256")
    return jwt.decode(token, key, algorithms=["ES256"], audience=audience)


def _verify_with_oidc_discovery(token: str, issuer: str, audience: str) -> Any:
    """What an outside OIDC relying party does: discovery, then its jwks_uri."""
    config = json.loads(_get(issuer + "/.well-known/openid-configuration"))
    assert config["issuer"] == issuer
    client = jwt.PyJWKClient(config["jwks_uri"], cache_keys=False)
    key = client.get_signing_key_from_jwt(token)
    return jwt.decode(
        token,
        key.key,
        algorithms=config["id_token_signing_alg_values_supported"],
        audience=audience,
        issuer=issuer,
    )


async def test_a_jwt_svid_verifies_against_the_bundle_endpoint_and_oidc_discovery(
    server: RunningServer,
) -> None:
    signed = await _sign(server, audiences=["https://db.example.org", "aws"], ttl_seconds=120)
    assert signed.spiffe_id == WEB_ID
    issuer = server.settings.jwt_issuer
    assert issuer is not None

    bundle = await asyncio.to_thread(_spiffe_bundle, server)
    claims = _verify_with_spiffe_bundle(signed.token, bundle, "aws")
    assert claims["sub"] == WEB_ID and claims["jti"] == signed.jti
    assert claims["exp"] - claims["iat"] == 120 == signed.expires_at.seconds - claims["iat"]
    assert claims["iss"] == issuer
    assert [k["use"] for k in bundle["keys"]] == ["x509-svid", "jwt-svid"]

    claims = await asyncio.to_thread(
        _verify_with_oidc_discovery, signed.token, issuer, "https://db.example.org"
    )
    assert claims["sub"] == WEB_ID

    # The same keys come with the trust bundle over gRPC, as the agent will use them.
    async with server.channel() as channel:
        trust = await ca_pb2_grpc.CertificateServiceStub(channel).GetTrustBundle(
            ca_pb2.GetTrustBundleRequest()
        )
    grpc_keys = json.loads(trust.jwt_bundle)["keys"]
    assert [k["kid"] for k in grpc_keys] == [signed.kid]
    assert (
        jwt.decode(
            signed.token,
            jwt.PyJWK(grpc_keys[0], algorithm="ES256"),
            algorithms=["ES256"],
            audience="aws",
        )["sub"]
        == WEB_ID
    )

    # A token for one audience does not verify for another, nor with a foreign key.
    with pytest.raises(jwt.InvalidAudienceError):
        _verify_with_spiffe_bundle(signed.token, bundle, "https://elsewhere.example.org")
    forged = signed.token[:-8] + ("A" * 8 if not signed.token.endswith("A" * 8) else "B" * 8)
    with pytest.raises(jwt.InvalidSignatureError):
        _verify_with_spiffe_bundle(forged, bundle, "aws")


async def test_default_lifetime_is_five_minutes(server: RunningServer) -> None:
    signed = await _sign(server)
    claims = jwt.decode(signed.token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 300
    assert claims["aud"] == "https://db.example.org"


@pytest.mark.parametrize(
    ("fields", "token", "code"),
    [
        pytest.param({"audiences": []}, None, grpc.StatusCode.INVALID_ARGUMENT, id="no-audience"),
        pytest.param(
            {"audiences": [f"aud-{i}" for i in range(1000)]},
            None,
            grpc.StatusCode.INVALID_ARGUMENT,
            id="1000-audiences",
        ),
        pytest.param(
            {"audiences": ["a" * 10_000]}, None, grpc.StatusCode.INVALID_ARGUMENT, id="huge-aud"
        ),
        pytest.param(
            {"audiences": ["a" * 50_000]},
            None,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            id="over-the-api-cap",
        ),
        pytest.param(
            {"spiffe_id": "spiffe://example.org/ns/shop/sa/db"},
            None,
            grpc.StatusCode.PERMISSION_DENIED,
            id="other-spiffe-id",
        ),
        pytest.param(
            {"spiffe_id": "spiffe://example.org/ns/shop/sa/web?x=1"},
            None,
            grpc.StatusCode.INVALID_ARGUMENT,
            id="malformed-spiffe-id",
        ),
        pytest.param({}, "not-a-token", grpc.StatusCode.UNAUTHENTICATED, id="bad-token"),
        pytest.param({"ttl_seconds": 1801}, None, grpc.StatusCode.INVALID_ARGUMENT, id="ttl"),
        pytest.param(
            {"ttl_seconds": 2**62}, None, grpc.StatusCode.INVALID_ARGUMENT, id="ttl-overflow"
        ),
    ],
)
async def test_hostile_requests_are_refused_with_a_record(
    server: RunningServer, fields: dict[str, Any], token: str | None, code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _sign(server, token, **fields)
    assert caught.value.code() == code
    assert "Traceback" not in (caught.value.details() or "")
    records = await _records(server)
    assert [r["outcome"] for r in records] == ["refused"]
    assert records[0]["api"] == "meshca.v1.SignJwtSvid"
    # Still serving afterwards.
    assert (await _sign(server)).spiffe_id == WEB_ID


async def test_an_oversized_message_is_stopped_by_the_transport(server: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _sign(server, audiences=["a" * 100_000])
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def _cli(*args: str) -> tuple[int, str, str]:
    def run() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = meshca_main(list(args))
        return code, out.getvalue(), err.getvalue()

    # In a thread: the server under test runs on this event loop.
    return await asyncio.to_thread(run)


async def _records(server: RunningServer) -> list[dict[str, Any]]:
    code, out, err = await _cli(
        "audit",
        "query",
        "--data-dir",
        str(server.settings.data_dir),
        "--api",
        "meshca.v1.SignJwtSvid",
        "--format",
        "json",
        "--limit",
        "0",
    )
    assert code == 0, err
    records: list[dict[str, Any]] = json.loads(out)
    return records


async def test_issued_jwt_svids_are_in_the_verifiable_log(server: RunningServer) -> None:
    signed = await _sign(server, audiences=["b", "a"])
    with pytest.raises(grpc.aio.AioRpcError):
        await _sign(server, audiences=[])
    data_dir = ["--data-dir", str(server.settings.data_dir)]
    refused, issued = await _records(server)
    assert issued["outcome"] == "issued" and issued["serial"] == signed.jti
    assert issued["spiffe_id"] == WEB_ID and issued["detail"] == 'aud=["b", "a"]'
    assert issued["namespace"] == "shop" and issued["service_account"] == "web"
    assert refused["reason"] == "jwt-audience-missing" and refused["serial"] is None
    signature = signed.token.rsplit(".", 1)[1]
    code, out, _ = await _cli("audit", "query", *data_dir, "--format", "csv", "--limit", "0")
    assert code == 0 and signed.jti in out and signature not in out, "never the token"

    code, out, err = await _cli("audit", "verify", *data_dir, "--serial", signed.jti)
    assert code == 0, out + err
    assert f"serial {signed.jti}" in out and "is in the tree head" in out
    code, out, err = await _cli("audit", "verify", *data_dir)
    assert code == 0, out + err

    code, out, _ = await _cli("audit", "list", *data_dir, "--serial", signed.jti)
    assert code == 0 and "meshca.v1.SignJwtSvid" in out and WEB_ID in out

    code, out, _ = await _cli(
        "ca", "status", *data_dir, "--trust-domain", server.settings.trust_domain
    )
    assert code == 0 and "jwt-key" in out and signed.kid in out


async def test_a_key_certificate_is_never_a_root(server: RunningServer) -> None:
    roots = load_bundle(server.settings.data_dir)
    assert len(roots) == 1
    assert roots[0].extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_meshca_serve_workers_sign_jwt_svids_on_postgres(
    tmp_path: Path, postgres_database_url: str
) -> None:
    """A real ``meshca serve`` (two worker processes, PostgreSQL): every worker signs with
    the one active key, an outside verifier accepts every token through OIDC discovery,
    and the log of the records verifies."""
    minter, jwks_path = TokenMinter.create(tmp_path)
    oidc_port = _free_port()
    issuer = f"http://127.0.0.1:{oidc_port}"
    data_dir = tmp_path / "data"
    command = serve_command(
        data_dir,
        jwks_path,
        workers=2,
        extra=[
            "--plaintext",
            "--database-url",
            postgres_database_url,
            "--oidc-discovery",
            f"127.0.0.1:{oidc_port}",
            "--jwt-issuer",
            issuer,
            "--tree-head-interval",
            "1h",
        ],
    )
    served = launch("jwt", data_dir, command, workers=2)
    jtis, kids = [], set()
    try:
        for i in range(8):
            # A channel per call: the kernel spreads connections over the workers.
            with grpc.insecure_channel(served.target) as channel:
                stub = jwt_pb2_grpc.JwtSvidServiceStub(channel)
                signed = stub.SignJwtSvid(
                    jwt_pb2.SignJwtSvidRequest(audiences=[f"svc-{i}"]),
                    metadata=[("authorization", f"Bearer {minter.mint('shop', 'web')}")],
                    timeout=10,
                )
            claims = _verify_with_oidc_discovery(signed.token, issuer, f"svc-{i}")
            assert claims["sub"] == WEB_ID and claims["iss"] == issuer
            jtis.append(claims["jti"])
            kids.add(jwt.get_unverified_header(signed.token)["kid"])
        assert len(kids) == 1, "every worker signs with the one active key"
    finally:
        assert served.stop() == 0, served.log()
    assert len(set(jtis)) == 8

    out = io.StringIO()
    with redirect_stdout(out):
        code = meshca_main(
            [
                "audit",
                "verify",
                "--data-dir",
                str(data_dir),
                "--database-url",
                postgres_database_url,
            ]
        )
    assert code == 0, out.getvalue()
    out = io.StringIO()
    with redirect_stdout(out):
        code = meshca_main(
            [
                "audit",
                "query",
                "--database-url",
                postgres_database_url,
                "--api",
                "meshca.v1.SignJwtSvid",
                "--format",
                "json",
                "--limit",
                "0",
            ]
        )
    assert code == 0
    assert sorted(r["serial"] for r in json.loads(out.getvalue())) == sorted(jtis)


async def test_jwt_svids_signed_by_a_vault_transit_key(openbao: OpenBao, tmp_path: Path) -> None:
    """With --vault-transit the JWT key lives in Vault like the CA keys; its tokens verify."""
    overrides = vault_overrides(openbao, tmp_path, transit=True)
    overrides["vault_upstream"] = False
    async for server in running_server(tmp_path, **overrides):
        assert isinstance(server.worker.authorities.jwt_signer().signer, TransitSigningKey)
        signed = await _sign(server)
        async with server.channel() as channel:
            trust = await ca_pb2_grpc.CertificateServiceStub(channel).GetTrustBundle(
                ca_pb2.GetTrustBundleRequest()
            )
        (key,) = json.loads(trust.jwt_bundle)["keys"]
        claims = jwt.decode(
            signed.token,
            jwt.PyJWK(key, algorithm="ES256"),
            algorithms=["ES256"],
            audience="https://db.example.org",
        )
        assert claims["sub"] == WEB_ID
    assert not list((tmp_path / "data" / "ca").glob("keys/*")), "no key on disk"
