"""Lint findings: each check fires on its case and stays quiet on the examples."""

from __future__ import annotations

import pytest

from meshca.core.policy.lint import Severity, lint
from tests.core.policy.helpers import policies

HEAD = "apiVersion: meshca.io/v1\nkind: AuthorizationPolicy\n"

FINDINGS = {
    "error/mesh-wide-allow-all": (
        HEAD + "metadata: {name: open}\nspec: {rules: [{}]}\n",
        Severity.ERROR,
        "every workload in the mesh",
    ),
    "warning/namespace-allow-all": (
        HEAD + "metadata: {name: open, namespace: shop}\nspec: {rules: [{}]}\n",
        Severity.WARNING,
        "allows every request to namespaces shop",
    ),
    "warning/any-authenticated": (
        HEAD + "metadata: {name: a, namespace: shop}\n"
        "spec: {rules: [{from: [{source: {principals: ['*']}}]}]}\n",
        Severity.WARNING,
        "any authenticated caller",
    ),
    "warning/unreachable-not-excludes-all": (
        HEAD + "metadata: {name: a, namespace: shop}\nspec: {rules: [{to: [{operation: "
        "{methods: [GET], notMethods: [GET, POST]}}]}]}\n",
        Severity.WARNING,
        "can never match",
    ),
    "warning/unreachable-condition": (
        HEAD + "metadata: {name: a, namespace: shop}\nspec: {rules: [{when: [{key: "
        "source.ip, values: ['10.1.0.0/16'], notValues: ['10.0.0.0/8']}]}]}\n",
        Severity.WARNING,
        "can never match",
    ),
    "warning/shadowed-within-policy": (
        HEAD + "metadata: {name: a, namespace: shop}\nspec: {rules: ["
        "{to: [{operation: {paths: ['/api/*']}}]},"
        "{to: [{operation: {paths: ['/api/items'], methods: [GET]}}]}]}\n",
        Severity.WARNING,
        "shadowed by shop/a rule 0",
    ),
    "warning/shadowed-by-earlier-policy": (
        HEAD + "metadata: {name: a, namespace: shop}\nspec: {rules: ["
        "{from: [{source: {namespaces: [shop, web]}}]}]}\n---\n"
        + HEAD
        + "metadata: {name: b}\nspec: {selector: {namespaces: [shop], serviceAccounts: [db]}, "
        "rules: [{from: [{source: {namespaces: [web]}}], to: [{operation: {ports: ['5432']}}]}]}\n",
        Severity.WARNING,
        "shadowed by shop/a rule 0",
    ),
    "warning/allow-denied-first": (
        HEAD + "metadata: {name: no-admin}\nspec: {action: DENY, rules: ["
        "{to: [{operation: {paths: ['/admin', '/admin/*']}}]}]}\n---\n"
        + HEAD
        + "metadata: {name: ops, namespace: shop}\nspec: {rules: ["
        "{from: [{source: {principals: ['spiffe://cluster.local/ns/ops/sa/console']}}],"
        " to: [{operation: {paths: ['/admin/*']}}]}]}\n",
        Severity.WARNING,
        "denied first by DENY policy no-admin rule 0",
    ),
    "warning/unknown-trust-domain": (
        HEAD + "metadata: {name: a, namespace: shop}\nspec: {rules: ["
        "{from: [{source: {principals: ['spiffe://example.org/ns/a/sa/b']}}]}]}\n",
        Severity.WARNING,
        "trust domain 'example.org'",
    ),
    "warning/deny-exact-path": (
        HEAD + "metadata: {name: a}\nspec: {action: DENY, rules: ["
        "{to: [{operation: {paths: ['/admin']}}]}]}\n",
        Severity.WARNING,
        "add '/admin/*' too",
    ),
    "warning/deny-without-rules": (
        HEAD + "metadata: {name: a}\nspec: {action: DENY}\n",
        Severity.WARNING,
        "denies nothing",
    ),
}


@pytest.mark.parametrize(("text", "severity", "message"), FINDINGS.values(), ids=FINDINGS.keys())
def test_finding(text: str, severity: Severity, message: str) -> None:
    found = lint(policies(text).policies, ["cluster.local"])
    assert any(f.severity is severity and message in f.message for f in found), found


def test_clean_set_has_no_findings() -> None:
    text = (
        HEAD + "metadata: {name: a, namespace: shop}\nspec: {rules: ["
        "{from: [{source: {principals: ['spiffe://cluster.local/ns/shop/sa/web']}}],"
        " to: [{operation: {methods: [GET], paths: ['/api/*']}}]},"
        "{from: [{source: {principals: ['spiffe://cluster.local/ns/shop/sa/web']}}],"
        " to: [{operation: {methods: [POST], paths: ['/api/orders']}}]}]}\n"
    )
    assert lint(policies(text).policies, ["cluster.local"]) == []


def test_finding_text_names_file_policy_and_rule() -> None:
    found = lint(policies(FINDINGS["error/mesh-wide-allow-all"][0]).policies)
    assert str(found[0]).startswith("test.yaml:0: error: open rule 0:")
