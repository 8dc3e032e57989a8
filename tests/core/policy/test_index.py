"""The index returns exactly the policies whose selectors match, in load order, and a
lookup does not look at policies written for other workloads."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshca.core.policy import Action, Policy, PolicyRef, PolicySet, Selector
from meshca.core.policy.match import StringMatcher
from meshca.core.policy.model import Destination

NAMESPACES = ["a", "b", "c"]
ACCOUNTS = ["x", "y", "z"]


def ids(patterns: list[str]) -> StringMatcher:
    return StringMatcher.of(tuple(patterns))


selectors = st.builds(
    Selector,
    namespaces=st.none() | st.frozensets(st.sampled_from(NAMESPACES), min_size=1),
    service_accounts=st.none() | st.frozensets(st.sampled_from(ACCOUNTS), min_size=1),
    spiffe_ids=st.none()
    | st.lists(
        st.sampled_from(
            [
                "spiffe://td/ns/a/sa/x",
                "spiffe://td/ns/b/sa/y",
                "spiffe://td/ns/a/*",
                "*/sa/z",
                "*",
                "spiffe://other/ns/a/sa/x",
            ]
        ),
        min_size=1,
        max_size=3,
    ).map(ids),
)


@given(
    st.lists(st.tuples(selectors, st.sampled_from(list(Action))), max_size=12),
    st.sampled_from([*NAMESPACES, "d"]),
    st.sampled_from([*ACCOUNTS, "w"]),
    st.sampled_from(["td", "other"]),
)
@settings(max_examples=300)
def test_index_equals_brute_force(
    entries: list[tuple[Selector, Action]], namespace: str, account: str, domain: str
) -> None:
    policies = [
        Policy(PolicyRef(f"p{i}"), action, selector, ())
        for i, (selector, action) in enumerate(entries)
    ]
    principal = f"spiffe://{domain}/ns/{namespace}/sa/{account}"
    destination = Destination.of(principal)
    expected = [p for p in policies if p.selector.matches(destination)]
    policy_set = PolicySet(policies, "v")
    for _ in range(2):  # the second lookup comes from the cache
        targets = policy_set.targets(principal)
        assert list(targets.deny) == [p for p in expected if p.action is Action.DENY]
        assert list(targets.allow) == [p for p in expected if p.action is Action.ALLOW]
        assert list(targets.audit) == [p for p in expected if p.action is Action.AUDIT]


class CountingSelector(Selector):
    """A selector that counts how often a lookup asks it."""

    calls = 0

    def matches(self, destination: Destination) -> bool:
        CountingSelector.calls += 1
        return Selector.matches(self, destination)


def _set(workloads: int) -> PolicySet:
    policies = [
        Policy(
            PolicyRef(f"p{n}", f"ns{n}"),
            Action.ALLOW,
            CountingSelector(namespaces=frozenset({f"ns{n}"}), service_accounts=frozenset({"sa"})),
            (),
        )
        for n in range(workloads)
    ]
    return PolicySet(policies, "v")


def test_lookup_cost_does_not_grow_with_other_workloads_policies() -> None:
    for size in (10, 10_000):
        policy_set = _set(size)
        CountingSelector.calls = 0
        targets = policy_set.targets("spiffe://td/ns/ns5/sa/sa")
        assert [p.ref.name for p in targets.allow] == ["p5"]
        assert CountingSelector.calls == 1
