"""The decision table: requests and the decisions Istio's documented AuthorizationPolicy
semantics call for (https://istio.io/latest/docs/reference/config/security/authorization-policy/),
plus meshca's own choices where they differ (docs/policy.md): a mesh default of deny, and
a DENY-only workload falling back to that default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from meshca.core.policy import AuthzRequest, PolicySet, Reason, evaluate
from tests.core.policy.helpers import policies, req, workload

HTTPBIN = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-allow, namespace: foo}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["test"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/info*"]
    - operation:
        methods: ["POST"]
        paths: ["/data"]
    when:
    - key: request.headers[x-token]
      values: ["valid-*"]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: httpbin-deny, namespace: foo}
spec:
  action: DENY
  rules:
  - from:
    - source:
        notNamespaces: ["foo"]
    to:
    - operation:
        paths: ["/admin*"]
"""

SHOP = """
apiVersion: meshca.io/v1
kind: AuthorizationPolicy
metadata: {name: backend-allow, namespace: shop}
spec:
  selector: {serviceAccounts: [backend]}
  rules:
  - from: [{source: {principals: ["spiffe://cluster.local/ns/shop/*"]}}]
    to: [{operation: {ports: ["8080"], methods: ["GET"]}}]
  - from: [{source: {principals: ["*/sa/monitor"]}}]
    to: [{operation: {paths: ["/metrics", "*.json"]}}]
  - from: [{source: {principals: ["spiffe://cluster.local/ns/ops/sa/admin"]}}]
---
apiVersion: meshca.io/v1
kind: AuthorizationPolicy
metadata: {name: backend-deny, namespace: shop}
spec:
  selector: {serviceAccounts: [backend]}
  action: DENY
  rules:
  - from: [{source: {principals: ["spiffe://cluster.local/ns/shop/sa/untrusted"]}}]
  - to: [{operation: {notMethods: ["GET", "POST", "HEAD"]}}]
  - from: [{source: {ipBlocks: ["192.168.0.0/16"]}}]
---
apiVersion: meshca.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-shop}
spec:
  selector: {spiffeIds: ["spiffe://cluster.local/ns/shop/*"]}
  action: AUDIT
  rules:
  - to: [{operation: {methods: ["POST"]}}]
"""

WEB = """
apiVersion: meshca.io/v1
kind: AuthorizationPolicy
metadata: {name: api, namespace: web}
spec:
  rules:
  - to: [{operation: {hosts: ["API.example.com", "*.internal"], notPaths: ["/private*"]}}]
    when:
    - key: source.namespace
      values: ["web", "edge-*"]
    - key: request.headers[X-Tenant]
      notValues: ["blocked"]
  - when:
    - key: destination.port
      values: ["9443"]
    - key: connection.sni
      values: ["*.example.com"]
  - when:
    - key: source.ip
      values: ["10.0.0.0/8"]
      notValues: ["10.9.0.0/16"]
"""

IDIOMS = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: locked}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: open}
spec:
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: quarantine}
spec: {action: DENY, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: quarantine}
spec:
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-nothing, namespace: denynothing}
spec: {action: DENY}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: global-admin-deny, namespace: istio-system}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin", "/admin/*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: when-principal, namespace: cond}
spec:
  rules:
  - when: [{key: source.principal, values: ["cluster.local/ns/a/sa/b"]}]
"""

SETS: dict[str, PolicySet] = {
    name: policies(text, version=name)
    for name, text in {"httpbin": HTTPBIN, "shop": SHOP, "web": WEB, "idioms": IDIOMS}.items()
}

SLEEP = workload("default", "sleep")
HTTPBIN_DST = workload("foo", "httpbin")
BACKEND = workload("shop", "backend")
WEB_APP = workload("web", "app")
TOKEN = {"x-token": "valid-1"}


@dataclass(frozen=True)
class Case:
    scenario: str
    request: AuthzRequest
    allowed: bool
    decided_by: str
    default_allow: bool = False
    audit: tuple[str, ...] = ()


def http(source: str | None, method: str, path: str, **extra: Any) -> AuthzRequest:
    return req(source, HTTPBIN_DST, method, path, **extra)


def shop(source: str | None, method: str = "GET", path: str = "/", **extra: Any) -> AuthzRequest:
    extra.setdefault("destination_port", 8080)
    return req(source, BACKEND, method, path, **extra)


def web(source: str | None = None, path: str = "/", **extra: Any) -> AuthzRequest:
    return req(source or workload("web", "x"), WEB_APP, "GET", path, **extra)


def idiom(
    namespace: str, path: str = "/", source: str | None = SLEEP, **extra: Any
) -> AuthzRequest:
    return req(source, workload(namespace, "x"), "GET", path, **extra)


ALLOW_HTTPBIN = "foo/httpbin-allow"
DENY_HTTPBIN = "foo/httpbin-deny"
GLOBAL = "istio-system/global-admin-deny"
NO_MATCH = Reason.NO_ALLOW_MATCH.value
AMBIGUOUS = Reason.AMBIGUOUS_PATH.value

CASES: dict[str, Case] = {
    # -- httpbin: Istio's documented example shape ----------------------------------------
    "allow/istio-principal-get-info": Case(
        "httpbin", http(SLEEP, "GET", "/info", headers=TOKEN), True, ALLOW_HTTPBIN
    ),
    "allow/path-prefix": Case(
        "httpbin", http(SLEEP, "GET", "/info/abc", headers=TOKEN), True, ALLOW_HTTPBIN
    ),
    "deny/when-header-missing": Case("httpbin", http(SLEEP, "GET", "/info"), False, NO_MATCH),
    "deny/when-header-wrong": Case(
        "httpbin", http(SLEEP, "GET", "/info", headers={"x-token": "bad"}), False, NO_MATCH
    ),
    "allow/second-source-namespace": Case(
        "httpbin",
        http(workload("test", "any"), "GET", "/info", headers=TOKEN),
        True,
        ALLOW_HTTPBIN,
    ),
    "deny/source-in-neither": Case(
        "httpbin", http(workload("other", "any"), "GET", "/info", headers=TOKEN), False, NO_MATCH
    ),
    "allow/second-operation": Case(
        "httpbin", http(SLEEP, "POST", "/data", headers=TOKEN), True, ALLOW_HTTPBIN
    ),
    "deny/method-and-path-pair-per-operation": Case(
        "httpbin", http(SLEEP, "POST", "/info", headers=TOKEN), False, NO_MATCH
    ),
    "deny/get-on-post-only-path": Case(
        "httpbin", http(SLEEP, "GET", "/data", headers=TOKEN), False, NO_MATCH
    ),
    "allow/method-case-normalized": Case(
        "httpbin", http(SLEEP, "get", "/info", headers=TOKEN), True, ALLOW_HTTPBIN
    ),
    "deny/deny-before-allow": Case(
        "httpbin", http(SLEEP, "GET", "/admin", headers=TOKEN), False, DENY_HTTPBIN
    ),
    "deny/deny-prefix-covers-subpaths": Case(
        "httpbin", http(SLEEP, "GET", "/admin/users", headers=TOKEN), False, DENY_HTTPBIN
    ),
    "deny/not-namespaces-exempts-own-namespace-but-allow-needed": Case(
        "httpbin", http(workload("foo", "x"), "GET", "/admin", headers=TOKEN), False, NO_MATCH
    ),
    "deny/not-field-matches-unauthenticated": Case(
        "httpbin", http(None, "GET", "/admin"), False, DENY_HTTPBIN
    ),
    "allow/namespace-wide-policy-other-workload": Case(
        "httpbin",
        req(SLEEP, workload("foo", "other"), "GET", "/info", headers=TOKEN),
        True,
        ALLOW_HTTPBIN,
    ),
    "deny/other-namespace-default": Case(
        "httpbin",
        req(SLEEP, workload("bar", "x"), "GET", "/info", headers=TOKEN),
        False,
        Reason.DEFAULT_DENY.value,
    ),
    "allow/other-namespace-default-allow": Case(
        "httpbin",
        req(SLEEP, workload("bar", "x"), "GET", "/info", headers=TOKEN),
        True,
        Reason.DEFAULT_ALLOW.value,
        default_allow=True,
    ),
    "deny/allow-policy-ignores-default-allow": Case(
        "httpbin", http(SLEEP, "GET", "/nothing"), False, NO_MATCH, default_allow=True
    ),
    # -- shop: meshca selectors, principal patterns, ports, ip blocks, audit --------------
    "allow/principal-prefix-and-port": Case(
        "shop", shop(workload("shop", "frontend")), True, "shop/backend-allow"
    ),
    "deny/wrong-port": Case(
        "shop", shop(workload("shop", "frontend"), destination_port=9090), False, NO_MATCH
    ),
    "deny/post-not-allowed-but-audited": Case(
        "shop",
        shop(workload("shop", "frontend"), "POST"),
        False,
        NO_MATCH,
        audit=("audit-shop",),
    ),
    "allow/principal-suffix-exact-path": Case(
        "shop",
        shop(workload("monitoring", "monitor"), path="/metrics", destination_port=9090),
        True,
        "shop/backend-allow",
    ),
    "allow/path-suffix": Case(
        "shop",
        shop(workload("monitoring", "monitor"), path="/v1/status.json"),
        True,
        "shop/backend-allow",
    ),
    "deny/path-not-listed": Case(
        "shop",
        shop(workload("monitoring", "monitor"), path="/status", destination_port=9090),
        False,
        NO_MATCH,
    ),
    "deny/not-methods-deny-rule": Case(
        "shop", shop(workload("ops", "admin"), "DELETE", "/x"), False, "shop/backend-deny"
    ),
    "allow/any-operation-for-admin": Case(
        "shop",
        shop(workload("ops", "admin"), "POST", "/x"),
        True,
        "shop/backend-allow",
        audit=("audit-shop",),
    ),
    "deny/denied-principal-despite-allow": Case(
        "shop", shop(workload("shop", "untrusted")), False, "shop/backend-deny"
    ),
    "deny/ip-block": Case(
        "shop",
        shop(workload("shop", "frontend"), source_ip="192.168.1.5"),
        False,
        "shop/backend-deny",
    ),
    "allow/ip-outside-block": Case(
        "shop",
        shop(workload("shop", "frontend"), source_ip="10.0.0.1"),
        True,
        "shop/backend-allow",
    ),
    "deny/selector-other-account-default": Case(
        "shop",
        req(workload("shop", "backend"), workload("shop", "frontend")),
        False,
        Reason.DEFAULT_DENY.value,
    ),
    "allow/selector-other-account-default-allow": Case(
        "shop",
        req(workload("shop", "untrusted"), workload("shop", "frontend"), "DELETE"),
        True,
        Reason.DEFAULT_ALLOW.value,
        default_allow=True,
    ),
    "deny/prefix-is-not-a-namespace-prefix": Case(
        "shop", shop(workload("shopping", "x")), False, NO_MATCH
    ),
    "deny/unauthenticated": Case("shop", shop(None), False, NO_MATCH),
    "deny/foreign-trust-domain": Case(
        "shop", shop("spiffe://other.org/ns/shop/sa/frontend"), False, NO_MATCH
    ),
    # -- web: hosts, not-paths and when conditions ----------------------------------------
    "allow/host-case-insensitive": Case("web", web(host="api.EXAMPLE.com"), True, "web/api"),
    "allow/host-with-port": Case("web", web(host="api.example.com:443"), True, "web/api"),
    "allow/host-suffix": Case("web", web(host="db.internal"), True, "web/api"),
    "deny/host-unknown": Case("web", web(host="evil.com"), False, NO_MATCH),
    "deny/not-paths": Case("web", web(host="db.internal", path="/private/x"), False, NO_MATCH),
    "allow/source-namespace-prefix": Case(
        "web", web(workload("edge-1", "gw"), host="db.internal"), True, "web/api"
    ),
    "deny/source-namespace-other": Case(
        "web", web(workload("other", "gw"), host="db.internal"), False, NO_MATCH
    ),
    "deny/header-not-values": Case(
        "web", web(host="db.internal", headers={"x-tenant": "blocked"}), False, NO_MATCH
    ),
    "allow/header-other-value": Case(
        "web", web(host="db.internal", headers={"x-tenant": "acme"}), True, "web/api"
    ),
    "allow/destination-port-and-sni": Case(
        "web",
        web(workload("x", "y"), destination_port=9443, sni="a.example.com"),
        True,
        "web/api",
    ),
    "deny/sni-mismatch": Case(
        "web",
        web(workload("x", "y"), destination_port=9443, sni="a.example.org"),
        False,
        NO_MATCH,
    ),
    "allow/source-ip-cidr": Case(
        "web", web(workload("x", "y"), source_ip="10.1.2.3"), True, "web/api"
    ),
    "deny/source-ip-not-values": Case(
        "web", web(workload("x", "y"), source_ip="10.9.1.1"), False, NO_MATCH
    ),
    "deny/source-ip-absent": Case("web", web(workload("x", "y")), False, NO_MATCH),
    # -- idioms: allow-nothing, allow-all, deny-all, root namespace, normalization --------
    "deny/allow-nothing": Case("idioms", idiom("locked"), False, NO_MATCH),
    "allow/allow-all": Case("idioms", idiom("open", "/anything"), True, "open/allow-all"),
    "allow/allow-all-unauthenticated": Case(
        "idioms", idiom("open", source=None), True, "open/allow-all"
    ),
    "deny/root-namespace-is-mesh-wide": Case("idioms", idiom("open", "/admin"), False, GLOBAL),
    "deny/root-namespace-with-default-allow": Case(
        "idioms", idiom("elsewhere", "/admin/x"), False, GLOBAL, default_allow=True
    ),
    "deny/deny-all-beats-allow-all": Case(
        "idioms", idiom("quarantine"), False, "quarantine/deny-all"
    ),
    "deny/deny-without-rules-falls-to-default": Case(
        "idioms", idiom("denynothing"), False, Reason.DEFAULT_DENY.value
    ),
    "allow/deny-without-rules-denies-nothing": Case(
        "idioms", idiom("denynothing"), True, Reason.DEFAULT_ALLOW.value, default_allow=True
    ),
    "allow/when-source-principal-istio-form": Case(
        "idioms", idiom("cond", source=workload("a", "b")), True, "cond/when-principal"
    ),
    "deny/when-source-principal-other": Case(
        "idioms", idiom("cond", source=workload("a", "c")), False, NO_MATCH
    ),
    "deny/no-destination": Case("idioms", req(SLEEP, None), False, Reason.NO_DESTINATION.value),
    "deny/destination-not-spiffe": Case(
        "idioms",
        req(SLEEP, "web.default.svc"),
        False,
        Reason.NO_DESTINATION.value,
        default_allow=True,
    ),
    "allow/admin-is-case-sensitive": Case(
        "idioms", idiom("open", "/ADMIN"), True, "open/allow-all"
    ),
    "allow/admin-lookalike": Case(
        "idioms", idiom("open", "/administrator"), True, "open/allow-all"
    ),
}

for name, path in {
    "dot-segment": "/./admin",
    "double-slash": "//admin",
    "encoded-letter": "/%61dmin",
    "encoded-upper-hex": "/%61%64%6D%69%6E",
    "query": "/admin?x=1",
    "fragment": "/admin#x",
    "dot-dot": "/foo/../admin",
    "dot-dot-above-root": "/../../admin",
    "encoded-dot": "/%2e/admin",
    "encoded-dot-dot": "/x/%2E%2E/admin",
    "trailing-dot": "/admin/.",
    "subpath-double-slash": "/admin//users",
}.items():
    CASES[f"deny/normalized-{name}"] = Case("idioms", idiom("open", path), False, GLOBAL)

for name, path in {
    "encoded-slash": "/admin%2Fx",
    "encoded-slash-lower": "/x%2fadmin",
    "backslash": "/admin\\x",
    "encoded-backslash": "/x%5Cadmin",
    "semicolon": "/admin;jsessionid=1",
    "nul": "/adm\x00in",
    "encoded-nul": "/adm%00in",
    "double-encoding": "/%2561dmin",
    "bad-escape": "/admin%zz",
    "not-absolute": "admin",
    "space": "/ad min",
    "slash-dot-ambiguity": "/x//../admin",
}.items():
    CASES[f"deny/ambiguous-{name}"] = Case("idioms", idiom("open", path), False, AMBIGUOUS)


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 60


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_decision(case: Case) -> None:
    decision = evaluate(SETS[case.scenario], case.request, default_allow=case.default_allow)
    assert (decision.allowed, decision.decided_by) == (case.allowed, case.decided_by), (
        decision.detail
    )
    assert tuple(p.key for p in decision.audit) == case.audit
    assert decision.version == case.scenario


def test_nothing_loaded_denies_everything_even_with_default_allow() -> None:
    decision = evaluate(None, idiom("open"), default_allow=True)
    assert not decision.allowed
    assert decision.reason is Reason.NOT_LOADED


def test_deciding_rule_is_the_first_matching_one() -> None:
    # shop/monitor matches rule 0 (shop prefix, GET on 8080) and rule 1 (*/sa/monitor).
    decision = evaluate(SETS["shop"], shop(workload("shop", "monitor"), "GET", "/metrics"))
    assert decision.policy is not None and decision.rule == 0
