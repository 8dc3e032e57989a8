"""spiffe_id_for: Kubernetes service accounts to SPIFFE IDs, and names no token can carry."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshca.core.errors import AuthenticationFailed
from meshca.core.identity import KubernetesIdentity, spiffe_id_for
from meshca.core.spiffe import SpiffeId, TrustDomain

TD = TrustDomain("cluster.local")
LABEL_63 = "a" + "b" * 61 + "c"
SUBDOMAIN_253 = ".".join(["a" * 63] * 3 + ["b" * 61])


@pytest.mark.parametrize(
    ("namespace", "service_account"),
    [
        pytest.param("default", "default", id="ok/default"),
        pytest.param("kube-system", "coredns", id="ok/kube-system"),
        pytest.param("a", "b", id="ok/single-characters"),
        pytest.param("0", "9", id="ok/digits"),
        pytest.param("istio-system", "istio-ingressgateway-service-account", id="ok/long-sa"),
        pytest.param("team-1", "web.v2", id="ok/dotted-service-account"),
        pytest.param("ns", "a.b.c-d.e", id="ok/many-labels"),
        pytest.param(LABEL_63, "web", id="ok/namespace-63"),
        pytest.param("ns", SUBDOMAIN_253, id="ok/service-account-253"),
    ],
)
def test_valid_names_map(namespace: str, service_account: str) -> None:
    identity = KubernetesIdentity(namespace=namespace, service_account=service_account)
    spiffe_id = spiffe_id_for(identity, TD)
    text = f"spiffe://cluster.local/ns/{namespace}/sa/{service_account}"
    assert str(spiffe_id) == text
    assert SpiffeId.parse(text) == spiffe_id
    assert spiffe_id.is_workload


def test_trust_domain_is_the_callers_choice() -> None:
    identity = KubernetesIdentity(namespace="default", service_account="web")
    assert str(spiffe_id_for(identity, TrustDomain("prod.example.com"))) == (
        "spiffe://prod.example.com/ns/default/sa/web"
    )


BAD_NAMESPACES = [
    pytest.param("", id="fail/ns-empty"),
    pytest.param("Default", id="fail/ns-uppercase"),
    pytest.param(LABEL_63 + "d", id="fail/ns-64-characters"),
    pytest.param("my.ns", id="fail/ns-dot"),
    pytest.param("-ns", id="fail/ns-leading-dash"),
    pytest.param("ns-", id="fail/ns-trailing-dash"),
    pytest.param("ns_1", id="fail/ns-underscore"),
    pytest.param("n\u00e9", id="fail/ns-unicode"),
    pytest.param("\uff4e\uff53", id="fail/ns-fullwidth"),
    pytest.param("ns\n", id="fail/ns-trailing-newline"),
    pytest.param(" ns", id="fail/ns-space"),
    pytest.param("ns/sa/admin", id="fail/ns-path-injection"),
    pytest.param("..", id="fail/ns-dotdot"),
    pytest.param("x" * 10_000, id="fail/ns-huge"),
]

BAD_SERVICE_ACCOUNTS = [
    pytest.param("", id="fail/sa-empty"),
    pytest.param("Web", id="fail/sa-uppercase"),
    pytest.param("a" * 254, id="fail/sa-254-characters"),
    pytest.param(SUBDOMAIN_253 + "x", id="fail/sa-254-with-dots"),
    pytest.param(".web", id="fail/sa-leading-dot"),
    pytest.param("web.", id="fail/sa-trailing-dot"),
    # Regression: the old pattern allowed any mix of '.' and '-' inside a name.
    pytest.param("a..b", id="fail/sa-empty-label"),
    pytest.param("a.-b", id="fail/sa-label-leading-dash"),
    pytest.param("a-.b", id="fail/sa-label-trailing-dash"),
    pytest.param("-web", id="fail/sa-leading-dash"),
    pytest.param("web_1", id="fail/sa-underscore"),
    pytest.param("w\u00ebb", id="fail/sa-unicode"),
    pytest.param("web\n", id="fail/sa-trailing-newline"),
    pytest.param("web/../admin", id="fail/sa-path-injection"),
    pytest.param(".", id="fail/sa-dot"),
    pytest.param("..", id="fail/sa-dotdot"),
    pytest.param("x" * 10_000, id="fail/sa-huge"),
]


@pytest.mark.parametrize("namespace", BAD_NAMESPACES)
def test_invalid_namespace_is_a_bad_token(namespace: str) -> None:
    identity = KubernetesIdentity(namespace=namespace, service_account="web")
    with pytest.raises(AuthenticationFailed) as caught:
        spiffe_id_for(identity, TD)
    assert caught.value.reason == "token-invalid-namespace"
    assert len(caught.value.message) < 200


@pytest.mark.parametrize("service_account", BAD_SERVICE_ACCOUNTS)
def test_invalid_service_account_is_a_bad_token(service_account: str) -> None:
    identity = KubernetesIdentity(namespace="default", service_account=service_account)
    with pytest.raises(AuthenticationFailed) as caught:
        spiffe_id_for(identity, TD)
    assert caught.value.reason == "token-invalid-service-account"
    assert len(caught.value.message) < 200


# --- properties ---------------------------------------------------------------------------

ALNUM = string.ascii_lowercase + string.digits
labels = st.builds(
    lambda first, middle, last: first + middle + last if middle or last else first,
    st.sampled_from(ALNUM),
    st.text(ALNUM + "-", max_size=20),
    st.sampled_from(ALNUM),
)
subdomains = st.lists(labels, min_size=1, max_size=8).map(".".join)


@settings(max_examples=200)
@given(namespace=labels, service_account=subdomains)
def test_property_kubernetes_names_map_to_valid_ids(namespace: str, service_account: str) -> None:
    spiffe_id = spiffe_id_for(KubernetesIdentity(namespace, service_account), TD)
    assert spiffe_id.path == f"/ns/{namespace}/sa/{service_account}"
    assert SpiffeId.parse(str(spiffe_id)) == spiffe_id


@settings(max_examples=200)
@given(
    namespace=st.one_of(st.text(max_size=70), st.text(ALNUM + "-._/ A", max_size=70)),
    service_account=st.one_of(st.text(max_size=260), st.text(ALNUM + "-._/ A", max_size=260)),
)
def test_property_any_names_give_a_valid_id_or_a_bad_token(
    namespace: str, service_account: str
) -> None:
    try:
        spiffe_id = spiffe_id_for(KubernetesIdentity(namespace, service_account), TD)
    except AuthenticationFailed:
        return
    # Whatever maps is exactly two ns/sa segments, never a path trick.
    assert spiffe_id.path.split("/") == ["", "ns", namespace, "sa", service_account]
    assert SpiffeId.parse(str(spiffe_id)) == spiffe_id
