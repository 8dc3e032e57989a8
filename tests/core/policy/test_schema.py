"""Policy documents: what loads, and what is refused with the field named."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from meshca.core.policy import Action, PolicyFieldError, parse_policy
from meshca.core.policy.model import Destination


def doc(text: str) -> Any:
    return yaml.safe_load(text)


MESHCA = "apiVersion: meshca.io/v1\nkind: AuthorizationPolicy\n"
ISTIO = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"

BAD: dict[str, tuple[str, str, str]] = {
    "fail/not-a-mapping": ("- a\n- b\n", "", "expected a mapping"),
    "fail/no-api-version": ("kind: AuthorizationPolicy\n", "apiVersion", "required"),
    "fail/other-api-version": (
        "apiVersion: security.istio.io/v1alpha1\nkind: AuthorizationPolicy\n",
        "apiVersion",
        "not supported",
    ),
    "fail/wrong-kind": (
        "apiVersion: meshca.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\n",
        "kind",
        "must be AuthorizationPolicy",
    ),
    "fail/unknown-top-level": (MESHCA + "metadata: {name: a}\nstatus: {}\n", "status", "unknown"),
    "fail/no-metadata": (MESHCA, "metadata", "required"),
    "fail/no-name": (MESHCA + "metadata: {namespace: a}\n", "metadata.name", "required"),
    "fail/bad-name": (MESHCA + "metadata: {name: Bad_Name}\n", "metadata.name", "Kubernetes"),
    "fail/name-not-text": (MESHCA + "metadata: {name: 12}\n", "metadata.name", "expected text"),
    "fail/unknown-metadata": (MESHCA + "metadata: {name: a, owner: b}\n", "metadata.owner", ""),
    "fail/spec-list": (MESHCA + "metadata: {name: a}\nspec: []\n", "spec", "mapping"),
    "fail/unknown-spec": (MESHCA + "metadata: {name: a}\nspec: {foo: 1}\n", "spec.foo", "unknown"),
    "fail/custom-action": (
        MESHCA + "metadata: {name: a}\nspec: {action: CUSTOM}\n",
        "spec.action",
        "not supported",
    ),
    "fail/lowercase-action": (
        MESHCA + "metadata: {name: a}\nspec: {action: allow}\n",
        "spec.action",
        "not one of",
    ),
    "fail/provider": (
        ISTIO + "metadata: {name: a, namespace: b}\nspec: {provider: {name: x}}\n",
        "spec.provider",
        "not supported",
    ),
    "fail/target-ref": (
        ISTIO + "metadata: {name: a, namespace: b}\nspec: {targetRef: {kind: Gateway}}\n",
        "spec.targetRef",
        "not supported",
    ),
    "fail/match-labels": (
        ISTIO + "metadata: {name: a, namespace: b}\nspec: {selector: {matchLabels: {app: x}}}\n",
        "spec.selector.matchLabels",
        "pod labels",
    ),
    "fail/istio-without-namespace": (ISTIO + "metadata: {name: a}\n", "metadata.namespace", ""),
    "fail/rules-not-list": (
        MESHCA + "metadata: {name: a}\nspec: {rules: {from: []}}\n",
        "spec.rules",
        "expected a list",
    ),
    "fail/unknown-rule-field": (
        MESHCA + "metadata: {name: a}\nspec: {rules: [{form: []}]}\n",
        "spec.rules[0].form",
        "unknown field",
    ),
    "fail/empty-source": (
        MESHCA + "metadata: {name: a}\nspec: {rules: [{from: [{source: {}}]}]}\n",
        "spec.rules[0].from[0].source",
        "must not be empty",
    ),
    "fail/source-missing": (
        MESHCA + "metadata: {name: a}\nspec: {rules: [{from: [{}]}]}\n",
        "spec.rules[0].from[0].source",
        "required",
    ),
    "fail/request-principals": (
        ISTIO + "metadata: {name: a, namespace: b}\n"
        "spec: {rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}\n",
        "spec.rules[0].from[0].source.requestPrincipals",
        "not supported",
    ),
    "fail/remote-ip-blocks": (
        ISTIO + "metadata: {name: a, namespace: b}\n"
        "spec: {rules: [{from: [{source: {remoteIpBlocks: ['1.2.3.4']}}]}]}\n",
        "spec.rules[0].from[0].source.remoteIpBlocks",
        "not supported",
    ),
    "fail/meshca-principal-without-scheme": (
        MESHCA + "metadata: {name: a}\n"
        "spec: {rules: [{from: [{source: {principals: ['cluster.local/ns/a/sa/b']}}]}]}\n",
        "spec.rules[0].from[0].source.principals[0]",
        "not a SPIFFE ID",
    ),
    "fail/istio-principal-with-scheme": (
        ISTIO + "metadata: {name: a, namespace: b}\n"
        "spec: {rules: [{from: [{source: {principals: ['spiffe://td/ns/a/sa/b']}}]}]}\n",
        "spec.rules[0].from[0].source.principals[0]",
        "no scheme",
    ),
    "fail/invalid-spiffe-id": (
        MESHCA + "metadata: {name: a}\n"
        "spec: {rules: [{from: [{source: {principals: ['spiffe://TD/x']}}]}]}\n",
        "spec.rules[0].from[0].source.principals[0]",
        "trust domain",
    ),
    "fail/wildcard-in-middle": (
        MESHCA + "metadata: {name: a}\nspec: {rules: [{to: [{operation: {paths: ['/a/*/b']}}]}]}\n",
        "spec.rules[0].to[0].operation.paths[0]",
        "'*' may only",
    ),
    "fail/path-template": (
        MESHCA + "metadata: {name: a}\nspec: {rules: [{to: [{operation: {paths: ['/a/{*}']}}]}]}\n",
        "spec.rules[0].to[0].operation.paths[0]",
        "templates",
    ),
    "fail/path-not-normalized": (
        MESHCA + "metadata: {name: a}\n"
        "spec: {rules: [{to: [{operation: {paths: ['/a/../admin']}}]}]}\n",
        "spec.rules[0].to[0].operation.paths[0]",
        "'/admin'",
    ),
    "fail/path-with-query": (
        MESHCA + "metadata: {name: a}\nspec: {rules: [{to: [{operation: {paths: ['/a?x=1']}}]}]}\n",
        "spec.rules[0].to[0].operation.paths[0]",
        "query",
    ),
    "fail/path-ambiguous": (
        MESHCA + "metadata: {name: a}\nspec: {rules: [{to: [{operation: {paths: ['/a%2Fb']}}]}]}\n",
        "spec.rules[0].to[0].operation.paths[0]",
        "never match",
    ),
    "fail/bad-port": (
        MESHCA + "metadata: {name: a}\nspec: {rules: [{to: [{operation: {ports: ['http']}}]}]}\n",
        "spec.rules[0].to[0].operation.ports[0]",
        "port number",
    ),
    "fail/port-bool": (
        MESHCA + "metadata: {name: a}\nspec: {rules: [{to: [{operation: {ports: [yes]}}]}]}\n",
        "spec.rules[0].to[0].operation.ports[0]",
        "boolean",
    ),
    "fail/bad-method": (
        MESHCA + "metadata: {name: a}\nspec: {rules: [{to: [{operation: {methods: ['GE T']}}]}]}\n",
        "spec.rules[0].to[0].operation.methods[0]",
        "HTTP method",
    ),
    "fail/bad-cidr": (
        MESHCA + "metadata: {name: a}\n"
        "spec: {rules: [{from: [{source: {ipBlocks: ['10.0.0.0/33']}}]}]}\n",
        "spec.rules[0].from[0].source.ipBlocks[0]",
        "CIDR",
    ),
    "fail/empty-list": (
        MESHCA + "metadata: {name: a}\nspec: {rules: [{to: [{operation: {methods: []}}]}]}\n",
        "spec.rules[0].to[0].operation.methods",
        "must not be empty",
    ),
    "fail/value-not-text": (
        MESHCA + "metadata: {name: a}\nspec: {rules: [{to: [{operation: {hosts: [{a: 1}]}}]}]}\n",
        "spec.rules[0].to[0].operation.hosts[0]",
        "expected text",
    ),
    "fail/when-without-values": (
        MESHCA + "metadata: {name: a}\nspec: {rules: [{when: [{key: source.ip}]}]}\n",
        "spec.rules[0].when[0]",
        "values or notValues",
    ),
    "fail/when-unknown-key": (
        MESHCA + "metadata: {name: a}\nspec: {rules: [{when: [{key: source.pod, values: [a]}]}]}\n",
        "spec.rules[0].when[0].key",
        "unknown key",
    ),
    "fail/when-jwt-claims": (
        ISTIO + "metadata: {name: a, namespace: b}\n"
        "spec: {rules: [{when: [{key: 'request.auth.claims[iss]', values: [a]}]}]}\n",
        "spec.rules[0].when[0].key",
        "not supported",
    ),
    "fail/when-remote-ip": (
        ISTIO + "metadata: {name: a, namespace: b}\n"
        "spec: {rules: [{when: [{key: remote.ip, values: ['1.2.3.4']}]}]}\n",
        "spec.rules[0].when[0].key",
        "not supported",
    ),
    "fail/selector-both-namespaces": (
        MESHCA + "metadata: {name: a, namespace: b}\nspec: {selector: {namespaces: [c]}}\n",
        "spec.selector.namespaces",
        "not both",
    ),
    "fail/selector-pattern-namespace": (
        MESHCA + "metadata: {name: a}\nspec: {selector: {namespaces: ['c*']}}\n",
        "spec.selector.namespaces[0]",
        "Kubernetes",
    ),
    "fail/selector-unknown": (
        MESHCA + "metadata: {name: a}\nspec: {selector: {workloads: [c]}}\n",
        "spec.selector.workloads",
        "unknown",
    ),
    "fail/too-many-values": (
        MESHCA
        + "metadata: {name: a}\nspec: {rules: [{to: [{operation: {methods: ["
        + ",".join(["GET"] * 1025)
        + "]}}]}]}\n",
        "spec.rules[0].to[0].operation.methods",
        "more than",
    ),
}


@pytest.mark.parametrize(("text", "field", "message"), BAD.values(), ids=BAD.keys())
def test_refused_with_the_field_named(text: str, field: str, message: str) -> None:
    with pytest.raises(PolicyFieldError) as caught:
        parse_policy(doc(text))
    assert caught.value.field == field
    assert message in caught.value.message


def test_meshca_selector_defaults() -> None:
    mesh = parse_policy(doc(MESHCA + "metadata: {name: a}\n"))
    assert mesh.selector.is_mesh_wide and mesh.action is Action.ALLOW and mesh.rules == ()
    scoped = parse_policy(doc(MESHCA + "metadata: {name: a, namespace: shop}\n"))
    assert scoped.selector.namespaces == frozenset({"shop"})
    by_id = parse_policy(
        doc(MESHCA + "metadata: {name: a}\nspec: {selector: {spiffeIds: ['spiffe://td/ns/x/*']}}")
    )
    assert by_id.selector.matches(Destination.of("spiffe://td/ns/x/sa/y"))
    assert not by_id.selector.matches(Destination.of("spiffe://td/ns/xy/sa/y"))


def test_istio_selector_is_namespace_or_root() -> None:
    scoped = parse_policy(doc(ISTIO + "metadata: {name: a, namespace: foo}\nspec: {}\n"))
    assert scoped.selector.namespaces == frozenset({"foo"}) and scoped.dialect == "istio"
    root = parse_policy(doc(ISTIO + "metadata: {name: a, namespace: istio-system}\n"))
    assert root.selector.is_mesh_wide
    custom_root = parse_policy(
        doc(ISTIO + "metadata: {name: a, namespace: mesh-root}\n"), istio_root_namespace="mesh-root"
    )
    assert custom_root.selector.is_mesh_wide


def test_kubectl_output_is_accepted() -> None:
    text = (
        ISTIO + "metadata:\n  name: a\n  namespace: b\n  uid: 1234\n  resourceVersion: '5'\n"
        "  generation: 2\n  creationTimestamp: '2024-01-01T00:00:00Z'\n  labels: {app: x}\n"
        "  annotations: {note: y}\nspec: {action: DENY}\nstatus: {}\n"
    )
    assert parse_policy(doc(text)).action is Action.DENY


def test_null_rule_is_an_empty_rule() -> None:
    policy = parse_policy(doc(MESHCA + "metadata: {name: a}\nspec: {rules: [null]}\n"))
    assert policy.rules[0].matches_everything
