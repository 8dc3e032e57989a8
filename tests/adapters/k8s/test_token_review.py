"""TokenReviewAttestor against the Kubernetes API stand-in."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshca.adapters.k8s.token_review import (
    API_SERVER_REFUSED_MESHCA,
    API_SERVER_UNAVAILABLE,
    InClusterDefaults,
    TokenReviewAttestor,
    in_cluster_defaults,
)
from meshca.core.errors import AuthenticationFailed, BackendUnavailable
from meshca.core.identity import KubernetesIdentity
from tests.fixtures_k8s import HOSTILE_TOKENS, K8sApiStandIn

# "pre" = refused before asking the API server; "api" = the API server refused it.
EXPECTED = {
    "wrong-audience": ("api", "token-wrong-audience"),
    "no-audience": ("api", "token-wrong-audience"),
    "wrong-issuer": ("api", "token-rejected"),
    "expired": ("pre", "token-expired"),
    "not-yet-valid": ("api", "token-rejected"),
    "issued-in-future": ("api", "token-rejected"),
    "no-expiry": ("pre", "token-legacy"),
    "exp-not-a-number": ("pre", "token-malformed"),
    "unknown-kid": ("api", "token-rejected"),
    "no-kid-rogue-key": ("api", "token-rejected"),
    "wrong-key-for-kid": ("api", "token-rejected"),
    "alg-none": ("api", "token-rejected"),
    "alg-none-mixed-case": ("api", "token-rejected"),
    "hs256-with-public-key": ("api", "token-rejected"),
    "alg-not-matching-key": ("api", "token-rejected"),
    "ps256-on-rs256-key": ("api", "token-rejected"),
    "tampered-signature": ("api", "token-rejected"),
    "tampered-payload": ("api", "token-rejected"),
    "missing-k8s-claims": ("api", "token-rejected"),
    "missing-service-account": ("api", "token-rejected"),
    "sub-disagrees": ("api", "token-rejected"),
    "legacy": ("pre", "token-legacy"),
    "garbage": ("pre", "token-malformed"),
    "empty": ("pre", "token-malformed"),
    "two-segments": ("pre", "token-malformed"),
}


def attestor_for(
    api: K8sApiStandIn,
    *,
    token_file: Path | None = None,
    ca_file: str | None = None,
    allow_legacy_tokens: bool = False,
    timeout: float = 5.0,
) -> TokenReviewAttestor:
    return TokenReviewAttestor(
        api_server=api.url,
        audiences=["meshca"],
        ca_file=ca_file or api.ca_file,
        token_file=str(token_file or api.caller_token_file),
        clock=api.clock,
        allow_legacy_tokens=allow_legacy_tokens,
        timeout=timeout,
    )


@pytest.mark.parametrize("key", ["rsa-1", "ec-1", "ec384-1"], ids=["ok/rsa", "ok/ec", "ok/p384"])
async def test_accepts(k8s_api: K8sApiStandIn, key: str) -> None:
    claims = k8s_api.minter.claims()
    token = k8s_api.minter.sign(claims, key=key)
    identity = await attestor_for(k8s_api).attest(token)
    assert identity == KubernetesIdentity(
        namespace="shop",
        service_account="cart",
        expires_at=datetime.fromtimestamp(claims["exp"], UTC),
        pod_name="cart-7d9f",
        pod_uid="uid-pod-1",
        node_name="node-a",
        service_account_uid="uid-sa-cart",
    )
    assert k8s_api.review_requests == [
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": ["meshca"]},
        }
    ]


async def test_token_not_bound_to_a_pod(k8s_api: K8sApiStandIn) -> None:
    identity = await attestor_for(k8s_api).attest(k8s_api.minter.token(pod=False, node=False))
    assert (identity.pod_name, identity.pod_uid, identity.node_name) == (None, None, None)


def test_every_hostile_case_has_an_expectation() -> None:
    assert EXPECTED.keys() == HOSTILE_TOKENS.keys()


@pytest.mark.parametrize(
    "case", list(HOSTILE_TOKENS), ids=[f"fail/{case}" for case in HOSTILE_TOKENS]
)
async def test_refuses(k8s_api: K8sApiStandIn, case: str) -> None:
    where, reason = EXPECTED[case]
    token = HOSTILE_TOKENS[case](k8s_api.minter)
    with pytest.raises(AuthenticationFailed) as caught:
        await attestor_for(k8s_api).attest(token)
    assert caught.value.reason == reason
    assert k8s_api.reviews == (1 if where == "api" else 0)
    if token:
        assert token not in str(caught.value)


async def test_deleted_pod_invalidates_its_token(k8s_api: K8sApiStandIn) -> None:
    attestor = attestor_for(k8s_api)
    token = k8s_api.minter.token()
    await attestor.attest(token)
    k8s_api.deleted_pods.add("uid-pod-1")
    with pytest.raises(AuthenticationFailed, match="not found") as caught:
        await attestor.attest(token)
    assert caught.value.reason == "token-rejected"


async def test_expired_by_api_clock_only(k8s_api: K8sApiStandIn) -> None:
    # 10 s past exp: within our grace, so the API server is asked, and it says expired.
    now = int(k8s_api.clock.now().timestamp())
    token = k8s_api.minter.token(iat=now - 100, nbf=now - 100, exp=now - 10)
    with pytest.raises(AuthenticationFailed) as caught:
        await attestor_for(k8s_api).attest(token)
    assert caught.value.reason == "token-expired"
    assert k8s_api.reviews == 1


async def test_audience_unaware_api_server_is_not_trusted(k8s_api: K8sApiStandIn) -> None:
    k8s_api.omit_audiences = True
    with pytest.raises(AuthenticationFailed) as caught:
        await attestor_for(k8s_api).attest(k8s_api.minter.token())
    assert caught.value.reason == "token-wrong-audience"


async def test_user_that_is_not_a_service_account(k8s_api: K8sApiStandIn) -> None:
    token = k8s_api.minter.token(
        namespace="a:b", sub="system:serviceaccount:a:b:cart"
    )  # a username with one colon too many
    with pytest.raises(AuthenticationFailed) as caught:
        await attestor_for(k8s_api).attest(token)
    assert caught.value.reason == "token-not-service-account"


async def test_legacy_token_accepted_when_allowed(k8s_api: K8sApiStandIn) -> None:
    # kube-apiserver vouches for legacy tokens only for its own API audiences.
    k8s_api.api_audiences.append("meshca")
    identity = await attestor_for(k8s_api, allow_legacy_tokens=True).attest(k8s_api.minter.legacy())
    assert identity == KubernetesIdentity(
        namespace="shop", service_account="cart", service_account_uid="uid-sa-cart"
    )


# --- our own credentials and the API server's health ---


async def test_wrong_caller_token_is_unavailable(k8s_api: K8sApiStandIn, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-meshca")
    with pytest.raises(
        BackendUnavailable, match=r"own credentials for TokenReview \(HTTP 401\)"
    ) as caught:
        await attestor_for(k8s_api, token_file=wrong).attest(k8s_api.minter.token())
    assert caught.value.reason == API_SERVER_REFUSED_MESHCA
    assert k8s_api.reviews == 0


async def test_caller_token_is_reread_when_rotated(k8s_api: K8sApiStandIn, tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("expired-caller-token")
    attestor = attestor_for(k8s_api, token_file=path)
    with pytest.raises(BackendUnavailable):
        await attestor.attest(k8s_api.minter.token())
    # kubelet swaps a symlink; a replace gives the file a new inode the same way.
    fresh = tmp_path / "token.new"
    fresh.write_text(k8s_api.caller_token)
    os.replace(fresh, path)
    await attestor.attest(k8s_api.minter.token())


@pytest.mark.parametrize("content", [None, ""], ids=["fail/missing", "fail/empty"])
async def test_unusable_caller_token_file(
    k8s_api: K8sApiStandIn, tmp_path: Path, content: str | None
) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(BackendUnavailable, match="token file"):
        await attestor_for(k8s_api, token_file=path).attest(k8s_api.minter.token())


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (403, API_SERVER_REFUSED_MESHCA),
        (500, API_SERVER_UNAVAILABLE),
        (503, API_SERVER_UNAVAILABLE),
        (429, API_SERVER_UNAVAILABLE),
        (404, API_SERVER_UNAVAILABLE),
    ],
)
async def test_api_server_failure_is_unavailable(
    k8s_api: K8sApiStandIn, status: int, reason: str
) -> None:
    k8s_api.fail_status = status
    with pytest.raises(BackendUnavailable, match=f"Kubernetes API server.*HTTP {status}") as caught:
        await attestor_for(k8s_api).attest(k8s_api.minter.token())
    assert caught.value.reason == reason


async def test_stopped_api_server_is_unavailable(k8s_api: K8sApiStandIn) -> None:
    k8s_api.stop()
    with pytest.raises(BackendUnavailable, match=r"Kubernetes API server .* unreachable") as caught:
        await attestor_for(k8s_api).attest(k8s_api.minter.token())
    assert caught.value.reason == API_SERVER_UNAVAILABLE


async def test_slow_api_server_times_out(k8s_api: K8sApiStandIn) -> None:
    k8s_api.delay = 5
    with pytest.raises(
        BackendUnavailable, match=r"Kubernetes API server .*(within|timed out)"
    ) as caught:
        await attestor_for(k8s_api, timeout=0.2).attest(k8s_api.minter.token())
    assert caught.value.reason == API_SERVER_UNAVAILABLE


async def test_https_with_ca_file(k8s_api_tls: K8sApiStandIn) -> None:
    identity = await attestor_for(k8s_api_tls).attest(k8s_api_tls.minter.token())
    assert identity.service_account == "cart"


async def test_https_without_our_ca_is_unavailable(k8s_api_tls: K8sApiStandIn) -> None:
    attestor = TokenReviewAttestor(
        api_server=k8s_api_tls.url,
        audiences=["meshca"],
        ca_file=None,
        token_file=str(k8s_api_tls.caller_token_file),
        clock=k8s_api_tls.clock,
    )
    with pytest.raises(BackendUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        await attestor.attest(k8s_api_tls.minter.token())
    assert k8s_api_tls.reviews == 0


def test_configuration_errors(k8s_api: K8sApiStandIn, tmp_path: Path) -> None:
    def make(**overrides: object) -> TokenReviewAttestor:
        arguments: dict[str, object] = {
            "api_server": k8s_api.url,
            "audiences": ["meshca"],
            "ca_file": None,
            "token_file": None,
            "clock": k8s_api.clock,
            **overrides,
        }
        return TokenReviewAttestor(**arguments)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="audience"):
        make(audiences=[])
    with pytest.raises(ValueError, match="http"):
        make(api_server="kubernetes.default.svc")
    with pytest.raises(FileNotFoundError):
        make(ca_file=str(tmp_path / "missing-ca.crt"))


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({}, InClusterDefaults(None, None, None), id="outside-a-cluster"),
        pytest.param(
            {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"},
            InClusterDefaults(
                "https://10.96.0.1:443",
                "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
                "/var/run/secrets/kubernetes.io/serviceaccount/token",
            ),
            id="ipv4",
        ),
        pytest.param(
            {"KUBERNETES_SERVICE_HOST": "fd00:10:96::1"},
            InClusterDefaults(
                "https://[fd00:10:96::1]:443",
                "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
                "/var/run/secrets/kubernetes.io/serviceaccount/token",
            ),
            id="ipv6-default-port",
        ),
    ],
)
def test_in_cluster_defaults(env: dict[str, str], expected: InClusterDefaults) -> None:
    assert in_cluster_defaults(env) == expected


# --- property ---


_TOKENS = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.sampled_from(list(HOSTILE_TOKENS)).map(lambda case: f"case:{case}"),
)


def test_property_arbitrary_tokens_only_raise_authentication_failed(
    k8s_api: K8sApiStandIn,
) -> None:
    attestor = attestor_for(k8s_api)

    @settings(max_examples=100, deadline=None)
    @given(token=_TOKENS)
    def check(token: str) -> None:
        if token.startswith("case:"):
            token = HOSTILE_TOKENS[token.removeprefix("case:")](k8s_api.minter)
        with pytest.raises(AuthenticationFailed):
            asyncio.run(attestor.attest(token))

    check()


async def test_with_audiences_reviews_for_the_other_door_only(k8s_api: K8sApiStandIn) -> None:
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
    asked = [r["spec"]["audiences"] for r in k8s_api.review_requests]
    assert asked == [["identity.l5d.io"], ["meshca"]] * 2
    with pytest.raises(ValueError, match="audience"):
        meshca.with_audiences([])
