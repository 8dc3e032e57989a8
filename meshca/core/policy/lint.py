"""Findings about a valid policy set that will not do what its author probably meant.

Errors: an ALLOW rule that matches every request to every workload in the mesh.
Warnings: other ALLOW rules that match everything (or any authenticated caller), rules
that can never match, rules shadowed by an earlier rule or denied first by a DENY rule,
principals of trust domains the mesh does not know, DENY paths that leave sub-paths
open, and DENY policies without rules (which deny nothing).

"Covers" is judged conservatively: a finding means it holds; no finding proves nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from meshca.core.policy.match import HostMatcher, IpMatcher, Matcher, PortMatcher, StringMatcher
from meshca.core.policy.model import Action, Constraint, Policy, PolicyRef, Rule

__all__ = ["Finding", "Severity", "lint"]


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    policy: PolicyRef
    rule: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.policy.file}:{self.policy.line}" if self.policy.file else ""
        rule = f" rule {self.rule}" if self.rule is not None else ""
        prefix = f"{where}: " if where else ""
        return f"{prefix}{self.severity.value}: {self.policy.key}{rule}: {self.message}"


# -- coverage ----------------------------------------------------------------------------


def _matcher_covers(wide: Matcher, narrow: Matcher) -> bool:
    """Every value ``narrow`` matches, ``wide`` matches too."""
    if isinstance(wide, HostMatcher) and isinstance(narrow, HostMatcher):
        return wide.strings.covers(narrow.strings)
    if isinstance(wide, StringMatcher) and isinstance(narrow, StringMatcher):
        return wide.covers(narrow)
    if isinstance(wide, PortMatcher) and isinstance(narrow, PortMatcher):
        return narrow.ports <= wide.ports
    if isinstance(wide, IpMatcher) and isinstance(narrow, IpMatcher):
        return all(
            any(n.version == w.version and n.subnet_of(w) for w in wide.networks)  # type: ignore[arg-type]
            for n in narrow.networks
        )
    return False


def _implies(strong: Constraint, weak: Constraint) -> bool:
    """Every request passing ``strong`` passes ``weak`` (same attribute only)."""
    if strong.attribute != weak.attribute:
        return False
    if weak.values is not None and (
        strong.values is None or not _matcher_covers(weak.values, strong.values)
    ):
        return False
    return weak.not_values is None or (
        strong.not_values is not None and _matcher_covers(strong.not_values, weak.not_values)
    )


def _clause_covers(wide: Sequence[Constraint], narrow: Sequence[Constraint]) -> bool:
    return all(any(_implies(n, w) for n in narrow) for w in wide)


def _clauses_cover(
    wide: Sequence[Sequence[Constraint]], narrow: Sequence[Sequence[Constraint]]
) -> bool:
    if not wide:
        return True
    if not narrow:
        return False
    return all(any(_clause_covers(w, n) for w in wide) for n in narrow)


def rule_covers(wide: Rule, narrow: Rule) -> bool:
    """Every request ``narrow`` matches, ``wide`` matches too (conservative)."""
    return (
        _clauses_cover(wide.sources, narrow.sources)
        and _clauses_cover(wide.operations, narrow.operations)
        and _clause_covers(wide.conditions, narrow.conditions)
    )


def _never(constraint: Constraint) -> bool:
    """The constraint excludes every value it requires."""
    return (
        constraint.values is not None
        and constraint.not_values is not None
        and _matcher_covers(constraint.not_values, constraint.values)
    )


def _unreachable(rule: Rule) -> str | None:
    for clauses in (rule.sources, rule.operations):
        if clauses and all(any(_never(c) for c in clause) for clause in clauses):
            first = next(c for c in clauses[0] if _never(c))
            return f"can never match: {first.not_field} excludes everything {first.field} allows"
    for condition in rule.conditions:
        if _never(condition):
            return (
                f"can never match: {condition.not_field} excludes everything "
                f"{condition.field} allows"
            )
    return None


# -- the checks --------------------------------------------------------------------------


def _principal_patterns(rule: Rule) -> Iterable[str]:
    for clause in (*rule.sources, rule.conditions):
        for constraint in clause:
            if constraint.attribute != "source.principal":
                continue
            for matcher in (constraint.values, constraint.not_values):
                if isinstance(matcher, StringMatcher):
                    yield from matcher.exact
                    yield from matcher.prefixes


def _trust_domain(pattern: str) -> str | None:
    rest = pattern.removeprefix("spiffe://")
    if rest == pattern or "/" not in rest:
        return None
    return rest.split("/", 1)[0]


def _only_any_principal(rule: Rule) -> bool:
    if rule.operations or rule.conditions or len(rule.sources) != 1:
        return False
    (clause,) = rule.sources
    return (
        len(clause) == 1
        and clause[0].attribute == "source.principal"
        and clause[0].not_values is None
        and isinstance(clause[0].values, StringMatcher)
        and clause[0].values.any
    )


def _exact_deny_paths(rule: Rule) -> Iterable[str]:
    for clause in rule.operations:
        for constraint in clause:
            if constraint.attribute == "request.path" and isinstance(
                constraint.values, StringMatcher
            ):
                matcher = constraint.values
                for path in sorted(matcher.exact):
                    if path == "/" or path.endswith("/"):
                        continue
                    if not matcher.test(path + "/x"):
                        yield path


def _single_policy(policy: Policy, trust_domains: frozenset[str]) -> list[Finding]:
    found: list[Finding] = []
    ref = policy.ref
    if policy.action is Action.DENY and not policy.rules:
        found.append(
            Finding(Severity.WARNING, ref, None, "a DENY policy without rules denies nothing")
        )
    for rule in policy.rules:
        if policy.action is Action.ALLOW and rule.matches_everything:
            if policy.selector.is_mesh_wide:
                found.append(
                    Finding(
                        Severity.ERROR,
                        ref,
                        rule.index,
                        "allows every request to every workload in the mesh",
                    )
                )
            else:
                found.append(
                    Finding(
                        Severity.WARNING,
                        ref,
                        rule.index,
                        f"allows every request to {policy.selector.describe()}",
                    )
                )
        elif policy.action is Action.ALLOW and _only_any_principal(rule):
            found.append(
                Finding(
                    Severity.WARNING,
                    ref,
                    rule.index,
                    f"allows any authenticated caller to reach {policy.selector.describe()}",
                )
            )
        why = _unreachable(rule)
        if why is not None:
            found.append(Finding(Severity.WARNING, ref, rule.index, why))
        for pattern in _principal_patterns(rule):
            domain = _trust_domain(pattern)
            if domain is not None and trust_domains and domain not in trust_domains:
                found.append(
                    Finding(
                        Severity.WARNING,
                        ref,
                        rule.index,
                        f"principal {pattern!r} is in trust domain {domain!r}, which this "
                        f"mesh does not know (known: {', '.join(sorted(trust_domains))})",
                    )
                )
        if policy.action is Action.DENY:
            for path in _exact_deny_paths(rule):
                found.append(
                    Finding(
                        Severity.WARNING,
                        ref,
                        rule.index,
                        f"denies {path!r} but not {path + '/'!r} or what is below it; "
                        f"add {path + '/*'!r} too",
                    )
                )
    return found


def _overlapping(policies: Sequence[Policy]) -> dict[int, list[Policy]]:
    """For each policy (by position), the earlier-or-same policies whose selector covers it.

    Only mesh-wide, same-namespace and same-workload selectors are compared, so the work
    stays proportional to the policies per workload, not to the square of the set.
    """
    groups: dict[object, list[int]] = {}
    for index, policy in enumerate(policies):
        selector = policy.selector
        keys: list[object] = []
        if selector.is_mesh_wide:
            keys.append("mesh")
        elif selector.namespaces is not None:
            keys += [("ns", n) for n in selector.namespaces]
        else:
            keys.append("other")
        for key in keys:
            groups.setdefault(key, []).append(index)
    mesh = groups.get("mesh", [])
    result: dict[int, list[Policy]] = {}
    for index, policy in enumerate(policies):
        selector = policy.selector
        related: set[int] = set(mesh)
        if selector.namespaces is not None:
            for namespace in selector.namespaces:
                related.update(groups.get(("ns", namespace), ()))
        if not selector.is_mesh_wide and selector.namespaces is None:
            related.update(groups.get("other", ()))
        result[index] = [
            policies[i] for i in sorted(related) if policies[i].selector.covers(selector)
        ]
    return result


def _relations(policies: Sequence[Policy]) -> list[Finding]:
    found: list[Finding] = []
    order = {id(p): i for i, p in enumerate(policies)}
    coverers = _overlapping(policies)
    for index, policy in enumerate(policies):
        if policy.action is Action.AUDIT:
            continue
        wider = coverers[index]
        for rule in policy.rules:
            reported = False
            if policy.action is Action.ALLOW:
                for deny in (p for p in wider if p.action is Action.DENY):
                    hit = next((r for r in deny.rules if rule_covers(r, rule)), None)
                    if hit is not None:
                        found.append(
                            Finding(
                                Severity.WARNING,
                                policy.ref,
                                rule.index,
                                f"unreachable: every request it matches is denied first by "
                                f"DENY policy {deny.ref.key} rule {hit.index}",
                            )
                        )
                        reported = True
                        break
            if reported:
                continue
            for other in (p for p in wider if p.action is policy.action):
                if order[id(other)] > index:
                    continue
                earlier = [r for r in other.rules if other is not policy or r.index < rule.index]
                hit = next((r for r in earlier if rule_covers(r, rule)), None)
                if hit is not None:
                    found.append(
                        Finding(
                            Severity.WARNING,
                            policy.ref,
                            rule.index,
                            f"shadowed by {other.ref.key} rule {hit.index}, which matches "
                            "every request this rule matches",
                        )
                    )
                    break
    return found


def lint(policies: Sequence[Policy], trust_domains: Iterable[str] = ()) -> list[Finding]:
    """Every finding about ``policies`` (in load order), errors and warnings mixed.

    ``trust_domains`` are the ones the mesh knows; empty skips that check.
    """
    known = frozenset(trust_domains)
    found: list[Finding] = []
    for policy in policies:
        found += _single_policy(policy, known)
    found += _relations(policies)
    return found
