"""Decide a request against a policy set; explain how the decision was reached.

The order (docs/policy.md):

1. No policy set loaded yet: deny. A path that cannot be normalized, or a destination
   without a SPIFFE ID: deny.
2. AUDIT policies that match are noted; they never change the outcome.
3. DENY policies selecting the destination, in load order: the first matching rule denies.
4. ALLOW policies selecting the destination: the first matching rule allows; if there are
   ALLOW policies and none matches, the request is denied.
5. No ALLOW policy selects the destination: the mesh-wide default decides (deny unless
   configured otherwise). A DENY policy alone therefore never opens a workload.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from meshca.core.errors import AmbiguousPath
from meshca.core.policy.index import PolicySet
from meshca.core.policy.match import IpAddress, parse_ip
from meshca.core.policy.model import (
    AuthzRequest,
    Constraint,
    Decision,
    Explanation,
    Policy,
    PolicyRef,
    Reason,
    Rule,
    RuleStep,
    workload_of,
)
from meshca.core.policy.paths import normalize_path

__all__ = ["NOT_LOADED_VERSION", "RequestView", "evaluate", "explain"]

NOT_LOADED_VERSION = "none"


@lru_cache(maxsize=8192)
def _namespace_of(principal: str) -> str | None:
    workload = workload_of(principal)
    return workload[0] if workload else None


class RequestView:
    """A request's attributes as the rules see them: normalized once, looked up by name."""

    __slots__ = ("_attributes", "_headers", "path")

    def __init__(self, request: AuthzRequest, path: str) -> None:
        principal = request.source_principal or None
        self.path = path
        self._headers = request.headers
        source_ip: IpAddress | None = parse_ip(request.source_ip)
        self._attributes: dict[str, Any] = {
            "source.principal": principal,
            "source.namespace": _namespace_of(principal) if principal else None,
            "source.ip": source_ip,
            "destination.ip": parse_ip(request.destination_ip),
            "destination.port": request.destination_port,
            "request.method": request.method.upper() if request.method else None,
            "request.path": path,
            "request.host": request.host.lower() if request.host else None,
            "connection.sni": request.sni.lower() if request.sni else None,
        }

    def get(self, attribute: str) -> Any:
        try:
            return self._attributes[attribute]
        except KeyError:
            if attribute.startswith("header:"):
                return self._headers.get(attribute[7:])
            return None


# The three functions below run for every rule of every selecting policy on every check:
# plain loops, because generator expressions cost more than the tests themselves here.


def _ok(constraint: Constraint, view: RequestView) -> bool:
    value = view.get(constraint.attribute)
    if constraint.values is not None and not constraint.values.test(value):
        return False
    return constraint.not_values is None or not constraint.not_values.test(value)


def _clause_ok(clause: tuple[Constraint, ...], view: RequestView) -> bool:
    for constraint in clause:
        if not _ok(constraint, view):
            return False
    return True


def _any_clause(clauses: tuple[tuple[Constraint, ...], ...], view: RequestView) -> bool:
    for clause in clauses:
        if _clause_ok(clause, view):
            return True
    return False


def rule_matches(rule: Rule, view: RequestView) -> bool:
    if rule.sources and not _any_clause(rule.sources, view):
        return False
    if rule.operations and not _any_clause(rule.operations, view):
        return False
    return _clause_ok(rule.conditions, view)


def _first_match(policy: Policy, view: RequestView) -> int | None:
    for rule in policy.rules:
        if rule_matches(rule, view):
            return rule.index
    return None


# -- explaining --------------------------------------------------------------------------


def _shown(value: object) -> str:
    text = str(value)
    return repr(text if len(text) <= 100 else text[:97] + "...")


def _why_not(constraint: Constraint, view: RequestView) -> str | None:
    value = view.get(constraint.attribute)
    name = constraint.attribute.replace("header:", "header ")
    if constraint.values is not None and not constraint.values.test(value):
        if value is None:
            return f"{constraint.field}: the request has no {name}"
        written = list(constraint.values.written)
        return f"{constraint.field}: {name} {_shown(value)} is not in {written}"
    if constraint.not_values is not None and constraint.not_values.test(value):
        return (
            f"{constraint.not_field}: {name} {_shown(value)} is in "
            f"{list(constraint.not_values.written)}"
        )
    return None


def _clause_why_not(clause: tuple[Constraint, ...], view: RequestView) -> str | None:
    for constraint in clause:
        why = _why_not(constraint, view)
        if why is not None:
            return why
    return None


def _rule_why_not(rule: Rule, view: RequestView) -> str | None:
    for clauses in (rule.sources, rule.operations):
        if clauses:
            reasons = [_clause_why_not(c, view) for c in clauses]
            if all(r is not None for r in reasons):
                return "; ".join(r for r in reasons if r is not None)
    for condition in rule.conditions:
        why = _why_not(condition, view)
        if why is not None:
            return why
    return None


def _trace_policy(policy: Policy, view: RequestView, steps: list[RuleStep]) -> int | None:
    """Every rule of ``policy`` with why it did not match; the first matching rule's index."""
    if not policy.rules:
        steps.append(RuleStep(policy.ref, policy.action, None, False, "the policy has no rules"))
        return None
    first = None
    for rule in policy.rules:
        why = _rule_why_not(rule, view)
        matched = why is None
        detail = why or ("matches every request" if rule.matches_everything else "")
        steps.append(RuleStep(policy.ref, policy.action, rule.index, matched, detail))
        if matched and first is None:
            first = rule.index
    return first


# -- deciding ----------------------------------------------------------------------------


def _decide(
    policy_set: PolicySet | None,
    request: AuthzRequest,
    default_allow: bool,
    steps: list[RuleStep] | None,
) -> tuple[Decision, tuple[PolicyRef, ...]]:
    if policy_set is None:
        return (
            Decision(
                False,
                Reason.NOT_LOADED,
                NOT_LOADED_VERSION,
                detail="no valid policy set has been loaded yet",
            ),
            (),
        )
    version = policy_set.version
    try:
        path = normalize_path(request.path or "/")
    except AmbiguousPath as exc:
        return Decision(False, Reason.AMBIGUOUS_PATH, version, detail=exc.message), ()
    destination = request.destination_principal
    if not destination or not destination.startswith("spiffe://"):
        return (
            Decision(
                False,
                Reason.NO_DESTINATION,
                version,
                detail="the request names no destination SPIFFE ID",
                path=path,
            ),
            (),
        )
    targets = policy_set.targets(destination)
    view = RequestView(request, path)
    selected = tuple(p.ref for p in targets.all)

    def matched(policy: Policy) -> int | None:
        if steps is None:
            return _first_match(policy, view)
        return _trace_policy(policy, view, steps)

    decision: Decision | None = None
    for policy in targets.deny:
        rule = matched(policy)
        if rule is not None and decision is None:
            decision = Decision(
                False,
                Reason.DENIED,
                version,
                policy.ref,
                rule,
                detail=f"DENY policy {policy.ref.key} rule {rule} matches",
                path=path,
            )
            if steps is None:
                break
    if decision is None or steps is not None:
        for policy in targets.allow:
            rule = matched(policy)
            if rule is not None and decision is None:
                decision = Decision(
                    True,
                    Reason.ALLOWED,
                    version,
                    policy.ref,
                    rule,
                    detail=f"ALLOW policy {policy.ref.key} rule {rule} matches",
                    path=path,
                )
                if steps is None:
                    break
    if decision is None:
        if targets.allow:
            decision = Decision(
                False,
                Reason.NO_ALLOW_MATCH,
                version,
                detail=f"{len(targets.allow)} ALLOW "
                f"{'policy selects' if len(targets.allow) == 1 else 'policies select'} "
                "the destination and no rule of them matches",
                path=path,
            )
        elif default_allow:
            decision = Decision(
                True,
                Reason.DEFAULT_ALLOW,
                version,
                detail="no ALLOW policy selects the destination; the mesh default is allow",
                path=path,
            )
        else:
            decision = Decision(
                False,
                Reason.DEFAULT_DENY,
                version,
                detail="no ALLOW policy selects the destination; the mesh default is deny",
                path=path,
            )
    audit = tuple(p.ref for p in targets.audit if matched(p) is not None)
    if audit:
        decision = Decision(
            decision.allowed,
            decision.reason,
            decision.version,
            decision.policy,
            decision.rule,
            audit,
            decision.detail,
            decision.path,
        )
    return decision, selected


def evaluate(
    policy_set: PolicySet | None, request: AuthzRequest, *, default_allow: bool = False
) -> Decision:
    """Decide ``request``; ``policy_set`` None means nothing is loaded (deny)."""
    return _decide(policy_set, request, default_allow, None)[0]


def explain(
    policy_set: PolicySet | None, request: AuthzRequest, *, default_allow: bool = False
) -> Explanation:
    """The same decision as ``evaluate``, with every selecting policy's rules traced."""
    steps: list[RuleStep] = []
    decision, selected = _decide(policy_set, request, default_allow, steps)
    return Explanation(decision, selected, tuple(steps))


def headers_for_record(headers: Mapping[str, str], policy_set: PolicySet | None) -> dict[str, str]:
    """The headers a decision record keeps: those the set refers to, never credentials."""
    if policy_set is None or not policy_set.header_names:
        return {}
    return {
        name: value
        for name, value in headers.items()
        if name in policy_set.header_names and name not in _CREDENTIAL_HEADERS
    }


_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
