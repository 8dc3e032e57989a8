"""DevTokenIssuer: a local token issuer whose tokens the jwks attestor accepts."""

from __future__ import annotations

import base64
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from meshca.adapters.k8s.dev_issuer import DevTokenIssuer
from meshca.adapters.k8s.jwks import JwksAttestor, JwksKeySource
from meshca.core.errors import AuthenticationFailed
from tests.fixtures_k8s import FixedClock

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def attestor_for(
    issuer: DevTokenIssuer, clock: FixedClock, audience: str = "meshca"
) -> JwksAttestor:
    return JwksAttestor(
        issuer=issuer.issuer,
        audiences=[audience],
        keys=JwksKeySource.from_file(issuer.jwks_path),
        clock=clock,
    )


async def test_minted_token_is_accepted(tmp_path: Path) -> None:
    issuer = DevTokenIssuer(tmp_path / "dev-issuer")
    token = issuer.mint("shop", "cart", "meshca", pod_name="cart-0", now=NOW)
    identity = await attestor_for(issuer, FixedClock(NOW)).attest(token)
    assert identity.namespace == "shop"
    assert identity.service_account == "cart"
    assert identity.pod_name == "cart-0"
    assert identity.pod_uid
    assert identity.service_account_uid
    assert identity.expires_at == NOW + timedelta(hours=1)


async def test_pods_get_fresh_uids_and_names(tmp_path: Path) -> None:
    issuer = DevTokenIssuer(tmp_path)
    attestor = attestor_for(issuer, FixedClock(NOW))
    first = await attestor.attest(issuer.mint("shop", "cart", "meshca", now=NOW))
    second = await attestor.attest(issuer.mint("shop", "cart", "meshca", now=NOW))
    assert first.pod_uid != second.pod_uid
    assert first.pod_name != second.pod_name
    assert first.service_account_uid == second.service_account_uid


async def test_key_and_jwks_survive_a_restart(tmp_path: Path) -> None:
    before = DevTokenIssuer(tmp_path)
    token = before.mint("shop", "cart", "meshca", now=NOW)
    jwks = before.jwks_path.read_text()
    key_file = tmp_path / "signing-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key_pem = key_file.read_bytes()

    after = DevTokenIssuer(tmp_path)
    after.ensure()
    assert after.jwks_path.read_text() == jwks
    assert key_file.read_bytes() == key_pem
    await attestor_for(after, FixedClock(NOW)).attest(token)


def test_jwks_holds_only_the_public_key(tmp_path: Path) -> None:
    issuer = DevTokenIssuer(tmp_path)
    issuer.ensure()
    (key,) = json.loads(issuer.jwks_path.read_text())["keys"]
    assert key.keys() == {"kty", "crv", "x", "y", "kid", "use", "alg"}
    assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("EC", "P-256", "ES256", "sig")


@pytest.mark.parametrize(
    ("audience", "advance", "reason"),
    [
        pytest.param("vault", timedelta(0), "token-wrong-audience", id="fail/wrong-audience"),
        pytest.param("meshca", timedelta(minutes=11), "token-expired", id="fail/expired"),
    ],
)
async def test_minted_token_is_still_checked(
    tmp_path: Path, audience: str, advance: timedelta, reason: str
) -> None:
    issuer = DevTokenIssuer(tmp_path)
    clock = FixedClock(NOW)
    token = issuer.mint("shop", "cart", audience, ttl=timedelta(minutes=10), now=NOW)
    clock.advance(advance)
    with pytest.raises(AuthenticationFailed) as caught:
        await attestor_for(issuer, clock).attest(token)
    assert caught.value.reason == reason


async def test_another_issuers_key_is_unknown(tmp_path: Path) -> None:
    ours = DevTokenIssuer(tmp_path / "ours")
    theirs = DevTokenIssuer(tmp_path / "theirs")
    ours.ensure()
    with pytest.raises(AuthenticationFailed) as caught:
        await attestor_for(ours, FixedClock(NOW)).attest(
            theirs.mint("shop", "cart", "meshca", now=NOW)
        )
    assert caught.value.reason == "token-unknown-key"


def test_custom_issuer(tmp_path: Path) -> None:
    assert DevTokenIssuer(tmp_path, issuer="https://dev.example").issuer == "https://dev.example"
    assert DevTokenIssuer(tmp_path).jwks_path == tmp_path / "jwks.json"


@pytest.mark.parametrize(
    ("now", "ttl"),
    [
        pytest.param(datetime(2030, 1, 1), timedelta(hours=1), id="fail/naive-now"),
        pytest.param(NOW, timedelta(0), id="fail/zero-ttl"),
    ],
)
def test_mint_rejects_bad_arguments(tmp_path: Path, now: datetime, ttl: timedelta) -> None:
    with pytest.raises(ValueError):
        DevTokenIssuer(tmp_path).mint("shop", "cart", "meshca", ttl=ttl, now=now)


def test_foreign_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "signing-key.pem").write_text("not a key")
    with pytest.raises(ValueError):
        DevTokenIssuer(tmp_path).ensure()


def test_claims_follow_the_projected_token_layout(tmp_path: Path) -> None:
    issuer = DevTokenIssuer(tmp_path)
    token = issuer.mint("shop", "cart", "meshca", pod_name="p", now=NOW)
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["sub"] == "system:serviceaccount:shop:cart"
    assert claims["aud"] == ["meshca"]
    assert claims["kubernetes.io"]["pod"]["name"] == "p"
