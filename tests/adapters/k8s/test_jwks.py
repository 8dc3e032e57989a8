"""JwksAttestor and JwksKeySource against the Kubernetes API stand-in."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshca.adapters.k8s.jwks import JwksAttestor, JwksKeySource
from meshca.core.errors import AuthenticationFailed, BackendUnavailable
from meshca.core.identity import KubernetesIdentity
from tests.fixtures_k8s import (
    DROP,
    HOSTILE_TOKENS,
    FixedClock,
    K8sApiStandIn,
    SigningKey,
    TokenMinter,
    jwks_document,
)

EXPECTED_REASON = {
    "wrong-audience": "token-wrong-audience",
    "no-audience": "token-wrong-audience",
    "wrong-issuer": "token-wrong-issuer",
    "expired": "token-expired",
    "not-yet-valid": "token-not-yet-valid",
    "issued-in-future": "token-not-yet-valid",
    "no-expiry": "token-legacy",
    "exp-not-a-number": "token-malformed",
    "unknown-kid": "token-unknown-key",
    "no-kid-rogue-key": "token-bad-signature",
    "wrong-key-for-kid": "token-bad-signature",
    "alg-none": "token-bad-algorithm",
    "alg-none-mixed-case": "token-bad-algorithm",
    "hs256-with-public-key": "token-bad-algorithm",
    "alg-not-matching-key": "token-bad-algorithm",
    "ps256-on-rs256-key": "token-bad-algorithm",
    "tampered-signature": "token-bad-signature",
    "tampered-payload": "token-bad-signature",
    "missing-k8s-claims": "token-missing-claims",
    "missing-service-account": "token-missing-claims",
    "sub-disagrees": "token-subject-mismatch",
    "legacy": "token-legacy",
    "garbage": "token-malformed",
    "empty": "token-malformed",
    "two-segments": "token-malformed",
}


def attestor_for(
    api: K8sApiStandIn,
    keys: JwksKeySource | None = None,
    *,
    allow_legacy_tokens: bool = False,
) -> JwksAttestor:
    return JwksAttestor(
        issuer=api.issuer,
        audiences=["meshca"],
        keys=keys or JwksKeySource.from_url(api.jwks_url, monotonic=api.clock.monotonic),
        clock=api.clock,
        allow_legacy_tokens=allow_legacy_tokens,
    )


def write_jwks(path: Path, keys: list[SigningKey], *, include_alg: bool = True) -> Path:
    path.write_text(json.dumps(jwks_document(keys, include_alg=include_alg)))
    return path


def _in(minter: TokenMinter, seconds: int) -> int:
    return int(minter.clock.now().timestamp()) + seconds


OK_CASES: dict[str, Callable[[TokenMinter], str]] = {
    "ok/rsa": lambda m: m.token(),
    "ok/ec-p256": lambda m: m.token(key="ec-1"),
    "ok/ec-p384": lambda m: m.token(key="ec384-1"),
    "ok/audience-as-string": lambda m: m.token(aud="meshca"),
    "ok/one-of-several-audiences": lambda m: m.token(aud=["vault", "meshca"]),
    "ok/expired-within-leeway": lambda m: m.token(exp=_in(m, -20)),
    "ok/nbf-within-leeway": lambda m: m.token(nbf=_in(m, 20), iat=_in(m, 20)),
    "ok/no-kid": lambda m: m.sign(m.claims(), key="ec-1", kid=DROP),
    "ok/no-nbf-no-iat": lambda m: m.token(nbf=DROP, iat=DROP),
}


@pytest.mark.parametrize("make", OK_CASES.values(), ids=OK_CASES.keys())
async def test_accepts(k8s_api: K8sApiStandIn, make: Callable[[TokenMinter], str]) -> None:
    identity = await attestor_for(k8s_api).attest(make(k8s_api.minter))
    assert (identity.namespace, identity.service_account) == ("shop", "cart")


async def test_identity_carries_every_claim(k8s_api: K8sApiStandIn) -> None:
    claims = k8s_api.minter.claims()
    identity = await attestor_for(k8s_api).attest(k8s_api.minter.sign(claims))
    assert identity == KubernetesIdentity(
        namespace="shop",
        service_account="cart",
        expires_at=datetime.fromtimestamp(claims["exp"], UTC),
        pod_name="cart-7d9f",
        pod_uid="uid-pod-1",
        node_name="node-a",
        service_account_uid="uid-sa-cart",
    )


async def test_token_not_bound_to_a_pod(k8s_api: K8sApiStandIn) -> None:
    token = k8s_api.minter.token(pod=False, node=False)
    identity = await attestor_for(k8s_api).attest(token)
    assert (identity.pod_name, identity.pod_uid, identity.node_name) == (None, None, None)


def test_every_hostile_case_has_an_expectation() -> None:
    assert EXPECTED_REASON.keys() == HOSTILE_TOKENS.keys()


@pytest.mark.parametrize(
    "case", list(HOSTILE_TOKENS), ids=[f"fail/{case}" for case in HOSTILE_TOKENS]
)
async def test_refuses(k8s_api: K8sApiStandIn, case: str) -> None:
    token = HOSTILE_TOKENS[case](k8s_api.minter)
    with pytest.raises(AuthenticationFailed) as caught:
        await attestor_for(k8s_api).attest(token)
    assert caught.value.reason == EXPECTED_REASON[case]
    if token:
        assert token not in str(caught.value)


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        pytest.param(
            {"kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "cart"}, "pod": {}}},
            "token-missing-claims",
            id="fail/pod-claim-without-name",
        ),
        pytest.param(
            {"kubernetes.io": {"namespace": 7, "serviceaccount": {"name": "cart"}}},
            "token-missing-claims",
            id="fail/namespace-not-a-string",
        ),
        pytest.param(
            {"kubernetes.io": {"namespace": "shop", "serviceaccount": "cart"}},
            "token-missing-claims",
            id="fail/serviceaccount-not-an-object",
        ),
        pytest.param({"exp": True}, "token-malformed", id="fail/exp-is-a-boolean"),
        pytest.param({"nbf": "now"}, "token-malformed", id="fail/nbf-not-a-number"),
        pytest.param({"aud": [1, 2]}, "token-wrong-audience", id="fail/audience-not-strings"),
    ],
)
async def test_refuses_odd_claims(
    k8s_api: K8sApiStandIn, claims: dict[str, Any], reason: str
) -> None:
    token = k8s_api.minter.token(**claims)
    with pytest.raises(AuthenticationFailed) as caught:
        await attestor_for(k8s_api).attest(token)
    assert caught.value.reason == reason


async def test_exp_far_in_future_is_malformed_not_a_crash(k8s_api: K8sApiStandIn) -> None:
    with pytest.raises(AuthenticationFailed, match="out of range"):
        await attestor_for(k8s_api).attest(k8s_api.minter.token(exp=10**30))


async def test_expiry_is_judged_by_the_injected_clock(k8s_api: K8sApiStandIn) -> None:
    attestor = attestor_for(k8s_api)
    token = k8s_api.minter.token(ttl=timedelta(minutes=10))
    await attestor.attest(token)
    k8s_api.clock.advance(timedelta(minutes=10, seconds=30))
    with pytest.raises(AuthenticationFailed) as caught:
        await attestor.attest(token)
    assert caught.value.reason == "token-expired"


async def test_duplicate_claims_are_malformed(k8s_api: K8sApiStandIn) -> None:
    head, _, signature = k8s_api.minter.token().split(".")
    payload = base64.urlsafe_b64encode(b'{"iss":"a","iss":"b"}').rstrip(b"=").decode()
    with pytest.raises(AuthenticationFailed) as caught:
        await attestor_for(k8s_api).attest(f"{head}.{payload}.{signature}")
    assert caught.value.reason == "token-malformed"


async def test_critical_header_is_refused(k8s_api: K8sApiStandIn) -> None:
    token = k8s_api.minter.sign(k8s_api.minter.claims(), headers={"crit": ["exp"]})
    with pytest.raises(AuthenticationFailed) as caught:
        await attestor_for(k8s_api).attest(token)
    assert caught.value.reason == "token-malformed"


# --- legacy tokens ---


async def test_legacy_token_accepted_when_allowed(k8s_api: K8sApiStandIn) -> None:
    identity = await attestor_for(k8s_api, allow_legacy_tokens=True).attest(k8s_api.minter.legacy())
    assert identity == KubernetesIdentity(
        namespace="shop", service_account="cart", service_account_uid="uid-sa-cart"
    )


async def test_legacy_allowance_does_not_excuse_forgery(k8s_api: K8sApiStandIn) -> None:
    attestor = attestor_for(k8s_api, allow_legacy_tokens=True)
    with pytest.raises(AuthenticationFailed) as caught:
        await attestor.attest(k8s_api.minter.legacy(key="rogue-rsa"))
    assert caught.value.reason == "token-unknown-key"
    forged = k8s_api.minter.hs256_with_public_key(k8s_api.minter.legacy_claims())
    with pytest.raises(AuthenticationFailed) as caught:
        await attestor.attest(forged)
    assert caught.value.reason == "token-bad-algorithm"


# --- key sources ---


async def test_key_file(
    k8s_api: K8sApiStandIn, k8s_signing_keys: dict[str, SigningKey], tmp_path: Path
) -> None:
    path = write_jwks(tmp_path / "jwks.json", [k8s_signing_keys["ec-1"]])
    attestor = attestor_for(k8s_api, JwksKeySource.from_file(path))
    identity = await attestor.attest(k8s_api.minter.token(key="ec-1"))
    assert identity.service_account == "cart"
    with pytest.raises(AuthenticationFailed):
        await attestor.attest(k8s_api.minter.token(key="rsa-1"))


async def test_key_without_alg_allows_every_rsa_algorithm(
    k8s_api: K8sApiStandIn, k8s_signing_keys: dict[str, SigningKey], tmp_path: Path
) -> None:
    path = write_jwks(tmp_path / "jwks.json", [k8s_signing_keys["rsa-1"]], include_alg=False)
    attestor = attestor_for(k8s_api, JwksKeySource.from_file(path))
    for alg in ("RS256", "RS512", "PS256", "PS384"):
        await attestor.attest(k8s_api.minter.sign(k8s_api.minter.claims(), alg=alg))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        pytest.param(None, "cannot read", id="fail/missing-file"),
        pytest.param(b"{not json", "not valid JSON", id="fail/not-json"),
        pytest.param(b'{"kys": []}', "no 'keys' list", id="fail/no-keys-list"),
        pytest.param(b" " * (1024 * 1024 + 1), "over", id="fail/too-large"),
    ],
)
async def test_broken_key_file_is_backend_unavailable(
    k8s_api: K8sApiStandIn, tmp_path: Path, content: bytes | None, match: str
) -> None:
    path = tmp_path / "jwks.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BackendUnavailable, match=match):
        await attestor_for(k8s_api, JwksKeySource.from_file(path)).attest(k8s_api.minter.token())


async def test_unusable_keys_are_skipped(
    k8s_api: K8sApiStandIn, k8s_signing_keys: dict[str, SigningKey], tmp_path: Path
) -> None:
    good = k8s_signing_keys["ec-1"].jwk()
    document = {
        "keys": [
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {**k8s_signing_keys["rsa-1"].jwk(), "use": "enc"},
            {"kty": "RSA", "kid": "broken", "n": "AQAB", "e": "AQAB"},
            {"kty": "EC", "kid": "bad-curve", "crv": "P-192", "x": "AA", "y": "AA"},
            "not an object",
            good,
        ]
    }
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(document))
    attestor = attestor_for(k8s_api, JwksKeySource.from_file(path))
    await attestor.attest(k8s_api.minter.token(key="ec-1"))
    with pytest.raises(AuthenticationFailed) as caught:
        await attestor.attest(k8s_api.minter.token(key="rsa-1"))
    assert caught.value.reason == "token-unknown-key"


async def test_discovery(k8s_api: K8sApiStandIn) -> None:
    keys = JwksKeySource.from_discovery(k8s_api.issuer, monotonic=k8s_api.clock.monotonic)
    attestor = attestor_for(k8s_api, keys)
    await attestor.attest(k8s_api.minter.token())
    await attestor.attest(k8s_api.minter.token(key="ec-1"))
    assert (k8s_api.discovery_fetches, k8s_api.jwks_fetches) == (1, 1)


async def test_discovery_refuses_a_different_issuer(k8s_api: K8sApiStandIn) -> None:
    k8s_api.discovery_issuer = "https://impostor.example"
    attestor = attestor_for(k8s_api, JwksKeySource.from_discovery(k8s_api.issuer))
    with pytest.raises(BackendUnavailable, match="impostor"):
        await attestor.attest(k8s_api.minter.token())
    assert k8s_api.jwks_fetches == 0


async def test_https_with_ca_file(k8s_api_tls: K8sApiStandIn) -> None:
    keys = JwksKeySource.from_discovery(k8s_api_tls.issuer, ca_file=k8s_api_tls.ca_file)
    identity = await attestor_for(k8s_api_tls, keys).attest(k8s_api_tls.minter.token())
    assert identity.namespace == "shop"


async def test_https_without_our_ca_is_unavailable(k8s_api_tls: K8sApiStandIn) -> None:
    attestor = attestor_for(k8s_api_tls, JwksKeySource.from_url(k8s_api_tls.jwks_url))
    with pytest.raises(BackendUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        await attestor.attest(k8s_api_tls.minter.token())


@pytest.mark.parametrize("status", [500, 404, 302])
async def test_failing_endpoint_is_unavailable(k8s_api: K8sApiStandIn, status: int) -> None:
    k8s_api.fail_status = status
    with pytest.raises(BackendUnavailable, match=f"HTTP {status}"):
        await attestor_for(k8s_api).attest(k8s_api.minter.token())


async def test_stopped_endpoint_is_unavailable(k8s_api: K8sApiStandIn) -> None:
    k8s_api.stop()
    with pytest.raises(BackendUnavailable, match="unreachable"):
        await attestor_for(k8s_api).attest(k8s_api.minter.token())


async def test_slow_endpoint_times_out(k8s_api: K8sApiStandIn) -> None:
    k8s_api.delay = 5
    keys = JwksKeySource.from_url(k8s_api.jwks_url, timeout=0.2)
    with pytest.raises(BackendUnavailable, match=r"within|timed out"):
        await attestor_for(k8s_api, keys).attest(k8s_api.minter.token())


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="http"):
        JwksKeySource.from_url("file:///etc/passwd")
    with pytest.raises(ValueError, match="http"):
        JwksKeySource.from_discovery("kubernetes/serviceaccount")


def test_audiences_required(k8s_api: K8sApiStandIn) -> None:
    with pytest.raises(ValueError, match="audience"):
        JwksAttestor(
            issuer=k8s_api.issuer,
            audiences=[],
            keys=JwksKeySource.from_url(k8s_api.jwks_url),
            clock=k8s_api.clock,
        )


# --- refresh ---


async def test_rotated_key_is_accepted_after_refresh(k8s_api: K8sApiStandIn) -> None:
    attestor = attestor_for(k8s_api)
    await attestor.attest(k8s_api.minter.token())
    k8s_api.publish("rsa-1", "rsa-2")
    # Keys were fetched a moment ago: a miss now is not worth another fetch.
    with pytest.raises(AuthenticationFailed) as caught:
        await attestor.attest(k8s_api.minter.token(key="rsa-2"))
    assert caught.value.reason == "token-unknown-key"
    assert k8s_api.jwks_fetches == 1

    k8s_api.clock.advance(timedelta(seconds=31))
    await attestor.attest(k8s_api.minter.token(key="rsa-2"))
    assert k8s_api.jwks_fetches == 2
    # A forged kid right after that refresh costs no fetch.
    with pytest.raises(AuthenticationFailed):
        await attestor.attest(k8s_api.minter.token(key="rogue-rsa"))
    assert k8s_api.jwks_fetches == 2


async def test_unknown_kid_refreshes_at_most_once_per_interval(k8s_api: K8sApiStandIn) -> None:
    attestor = attestor_for(k8s_api)
    await attestor.attest(k8s_api.minter.token())
    for _ in range(3):
        k8s_api.clock.advance(timedelta(seconds=10))
        for _ in range(5):
            with pytest.raises(AuthenticationFailed):
                await attestor.attest(k8s_api.minter.token(key="rogue-rsa"))
    # t=10, 20, 30 s: only the miss at 30 s is past the 30 s interval.
    assert k8s_api.jwks_fetches == 2


async def test_concurrent_misses_share_one_refresh(k8s_api: K8sApiStandIn) -> None:
    attestor = attestor_for(k8s_api)
    await attestor.attest(k8s_api.minter.token())
    k8s_api.clock.advance(timedelta(minutes=1))
    k8s_api.publish("rsa-1", "rsa-2")
    k8s_api.delay = 0.1  # keep the fetch in flight while the others arrive
    results = await asyncio.gather(
        *(attestor.attest(k8s_api.minter.token(key="rsa-2")) for _ in range(10))
    )
    assert len(results) == 10
    assert k8s_api.jwks_fetches == 2


async def test_concurrent_first_loads_share_one_fetch(k8s_api: K8sApiStandIn) -> None:
    attestor = attestor_for(k8s_api)
    k8s_api.delay = 0.1
    await asyncio.gather(*(attestor.attest(k8s_api.minter.token()) for _ in range(10)))
    assert k8s_api.jwks_fetches == 1


async def test_failed_refresh_is_unavailable_but_known_keys_still_work(
    k8s_api: K8sApiStandIn,
) -> None:
    attestor = attestor_for(k8s_api)
    await attestor.attest(k8s_api.minter.token())
    k8s_api.clock.advance(timedelta(minutes=1))
    k8s_api.fail_status = 503
    with pytest.raises(BackendUnavailable):
        await attestor.attest(k8s_api.minter.token(key="rsa-2"))
    await attestor.attest(k8s_api.minter.token())


async def test_old_key_set_is_refreshed_and_removed_keys_stop_verifying(
    k8s_api: K8sApiStandIn,
) -> None:
    attestor = attestor_for(k8s_api)
    await attestor.attest(k8s_api.minter.token())
    k8s_api.publish("ec-1")
    k8s_api.clock.advance(timedelta(minutes=11))
    with pytest.raises(AuthenticationFailed) as caught:
        await attestor.attest(k8s_api.minter.token())
    assert caught.value.reason == "token-unknown-key"
    assert k8s_api.jwks_fetches == 2


async def test_old_key_set_stays_in_use_while_the_issuer_is_down(k8s_api: K8sApiStandIn) -> None:
    attestor = attestor_for(k8s_api)
    await attestor.attest(k8s_api.minter.token())
    k8s_api.fail_status = 500
    k8s_api.clock.advance(timedelta(minutes=11))
    await attestor.attest(k8s_api.minter.token())
    await attestor.attest(k8s_api.minter.token())
    assert k8s_api.jwks_fetches == 1
    assert k8s_api.failed_requests == 1  # one failed attempt, not one per token


# --- property ---

_CLAIM_NAMES = ["iss", "aud", "exp", "nbf", "iat", "sub", "kubernetes.io", "jti"]
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt_shaped() -> st.SearchStrategy[str]:
    header = st.fixed_dictionaries(
        {"alg": st.sampled_from(["RS256", "ES256", "ES384", "PS256", "HS256", "none", "EdDSA"])},
        optional={"kid": st.sampled_from(["rsa-1", "ec-1", "ec384-1", "nope"]) | _json_values},
    )
    payload = st.dictionaries(st.sampled_from(_CLAIM_NAMES), _json_values, max_size=8)
    segment = st.one_of(
        header.map(lambda h: _b64(json.dumps(h).encode())),
        payload.map(lambda p: _b64(json.dumps(p).encode())),
        st.binary(max_size=40).map(_b64),
        st.text("abcXYZ09-_=+/.", max_size=20),
    )
    return st.lists(segment, min_size=1, max_size=4).map(".".join)


TOKENS = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", "surrogateescape")),
    _jwt_shaped(),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(token=TOKENS)
def test_property_arbitrary_tokens_only_raise_authentication_failed(
    k8s_signing_keys: dict[str, SigningKey], tmp_path: Path, token: str
) -> None:
    path = tmp_path / "jwks.json"
    if not path.exists():
        write_jwks(path, [k8s_signing_keys[kid] for kid in ("rsa-1", "ec-1", "ec384-1")])
    clock = FixedClock()
    attestor = JwksAttestor(
        issuer="https://kubernetes.default.svc",
        audiences=["meshca"],
        keys=JwksKeySource.from_file(path, monotonic=clock.monotonic),
        clock=clock,
    )
    with pytest.raises(AuthenticationFailed):
        asyncio.run(attestor.attest(token))


async def test_with_audiences_shares_the_keys_but_not_the_audiences(
    k8s_api: K8sApiStandIn,
) -> None:
    k8s_api.publish("rsa-1")
    meshca = attestor_for(k8s_api)
    linkerd = meshca.with_audiences(["identity.l5d.io"])
    linkerd_token = k8s_api.minter.token(aud=["identity.l5d.io"])
    meshca_token = k8s_api.minter.token()

    assert (await linkerd.attest(linkerd_token)).service_account == "cart"
    assert (await meshca.attest(meshca_token)).service_account == "cart"
    for attestor, token in ((linkerd, meshca_token), (meshca, linkerd_token)):
        with pytest.raises(AuthenticationFailed) as refused:
            await attestor.attest(token)
        assert refused.value.reason == "token-wrong-audience"
    assert k8s_api.jwks_fetches == 1  # one key source for both doors
    with pytest.raises(ValueError, match="audience"):
        meshca.with_audiences([])
