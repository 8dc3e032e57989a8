"""A compiled policy set: policies indexed by the destination workloads they select.

A check looks up its destination once: by exact SPIFFE ID, by ``(namespace, service
account)``, by namespace and by service account, plus the few policies whose selectors
are patterns or mesh-wide. The cost of a check therefore does not grow with the number of
policies written for other workloads. Lookups are cached per destination.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from meshca.core.policy.match import StringMatcher
from meshca.core.policy.model import Action, Constraint, Destination, Policy

__all__ = ["PolicySet", "Targets"]

#: Cached destinations; past this the cache starts over (a mesh has far fewer workloads).
CACHE_LIMIT = 65_536


@dataclass(frozen=True, slots=True)
class Targets:
    """The policies that select one destination, by action, each in load order."""

    deny: tuple[Policy, ...] = ()
    allow: tuple[Policy, ...] = ()
    audit: tuple[Policy, ...] = ()

    @property
    def all(self) -> tuple[Policy, ...]:
        """DENY first, then ALLOW, then AUDIT: the order they are evaluated in."""
        return self.deny + self.allow + self.audit


_NO_TARGETS = Targets()


class PolicySet:
    """An immutable, indexed set of policies with its version (a content hash).

    ``targets`` is safe to call from any thread; the set never changes once built.
    """

    def __init__(self, policies: Sequence[Policy], version: str) -> None:
        self.policies: tuple[Policy, ...] = tuple(policies)
        self.version = version
        self._by_id: dict[str, list[Policy]] = {}
        self._by_workload: dict[tuple[str, str], list[Policy]] = {}
        self._by_namespace: dict[str, list[Policy]] = {}
        self._by_account: dict[str, list[Policy]] = {}
        self._scan: list[Policy] = []
        self._order = {id(p): i for i, p in enumerate(self.policies)}
        for policy in self.policies:
            self._place(policy)
        self._cache: dict[str, Targets] = {}
        self.header_names: frozenset[str] = frozenset(
            constraint.attribute.removeprefix("header:")
            for policy in self.policies
            for constraint in _constraints(policy)
            if constraint.attribute.startswith("header:")
        )

    def __len__(self) -> int:
        return len(self.policies)

    def _place(self, policy: Policy) -> None:
        selector = policy.selector
        if selector.namespaces is not None and selector.service_accounts is not None:
            for namespace in selector.namespaces:
                for account in selector.service_accounts:
                    self._by_workload.setdefault((namespace, account), []).append(policy)
        elif selector.namespaces is not None:
            for namespace in selector.namespaces:
                self._by_namespace.setdefault(namespace, []).append(policy)
        elif selector.service_accounts is not None:
            for account in selector.service_accounts:
                self._by_account.setdefault(account, []).append(policy)
        elif selector.spiffe_ids is not None and _only_exact(selector.spiffe_ids):
            for spiffe_id in selector.spiffe_ids.exact:
                self._by_id.setdefault(spiffe_id, []).append(policy)
        else:
            self._scan.append(policy)

    def targets(self, destination: str) -> Targets:
        """The policies selecting the workload whose SPIFFE ID is ``destination``."""
        cached = self._cache.get(destination)
        if cached is not None:
            return cached
        found = self._lookup(Destination.of(destination))
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[destination] = found
        return found

    def _lookup(self, destination: Destination) -> Targets:
        candidates: list[Policy] = []
        candidates += self._by_id.get(destination.principal, ())
        if destination.namespace is not None and destination.service_account is not None:
            candidates += self._by_workload.get(
                (destination.namespace, destination.service_account), ()
            )
            candidates += self._by_namespace.get(destination.namespace, ())
            candidates += self._by_account.get(destination.service_account, ())
        candidates += self._scan
        if not candidates:
            return _NO_TARGETS
        selected = sorted(
            {id(p): p for p in candidates if p.selector.matches(destination)}.values(),
            key=lambda p: self._order[id(p)],
        )
        return Targets(
            deny=tuple(p for p in selected if p.action is Action.DENY),
            allow=tuple(p for p in selected if p.action is Action.ALLOW),
            audit=tuple(p for p in selected if p.action is Action.AUDIT),
        )


def _only_exact(matcher: StringMatcher) -> bool:
    return bool(matcher.exact) and not (matcher.prefixes or matcher.suffixes or matcher.any)


def _constraints(policy: Policy) -> Iterable[Constraint]:
    for rule in policy.rules:
        for clause in (*rule.sources, *rule.operations):
            yield from clause
        yield from rule.conditions
