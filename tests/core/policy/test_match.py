"""Matching, checked against plain reference definitions over generated values."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from hypothesis import given
from hypothesis import strategies as st

from meshca.core.policy import AuthzRequest
from meshca.core.policy.evaluate import RequestView, rule_matches
from meshca.core.policy.match import HostMatcher, IpMatcher, StringMatcher, parse_ip, split_host
from meshca.core.policy.model import Constraint, Rule

ALPHABET = "ab/.:-*"
words = st.text("ab/.:-", min_size=1, max_size=6)
patterns = st.one_of(
    st.just("*"),
    words,
    words.map(lambda w: w + "*"),
    words.map(lambda w: "*" + w),
)


def reference(pattern: str, value: str | None) -> bool:
    """Istio's StringMatch semantics: exact, prefix*, *suffix, or * for any non-empty value."""
    if not value:
        return False
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


@given(st.lists(patterns, min_size=1, max_size=4), st.none() | st.text("ab/.:-", max_size=8))
def test_string_matcher_is_any_of_its_patterns(pats: list[str], value: str | None) -> None:
    matcher = StringMatcher.of(tuple(pats))
    assert matcher.test(value) == any(reference(p, value) for p in pats)


@given(st.lists(patterns, min_size=1, max_size=3), st.text("aAbB.", min_size=1, max_size=6))
def test_fold_case(pats: list[str], value: str) -> None:
    matcher = StringMatcher.of(tuple(pats), fold_case=True)
    assert matcher.test(value) == matcher.test(value.lower()) == matcher.test(value.upper())


@given(
    st.lists(patterns, min_size=1, max_size=3),
    st.lists(patterns, min_size=1, max_size=3),
    st.text("ab/.:-", min_size=1, max_size=8),
)
def test_covers_is_sound(wide: list[str], narrow: list[str], value: str) -> None:
    """When lint says one matcher covers another, no value proves it wrong."""
    w, n = StringMatcher.of(tuple(wide)), StringMatcher.of(tuple(narrow))
    if w.covers(n) and n.test(value):
        assert w.test(value)


@given(
    st.sampled_from(["api.example.com", "a.internal", "[::1]", "x"]),
    st.none() | st.integers(1, 65535),
)
def test_host_with_port_matches_host(host: str, port: int | None) -> None:
    matcher = HostMatcher(StringMatcher.of((host,), fold_case=True))
    value = host if port is None else f"{host}:{port}"
    assert matcher.test(value.upper())
    assert split_host(value) == (host if port is not None else None)


@given(st.ip_addresses(v=4), st.integers(0, 32), st.ip_addresses(v=4) | st.ip_addresses(v=6))
def test_ip_blocks(base: object, prefix: int, value: object) -> None:
    network = ip_network(f"{base}/{prefix}", strict=False)
    matcher = IpMatcher.of((str(network),))
    assert matcher.test(value) == (value.version == 4 and value in network)  # type: ignore[attr-defined]
    assert matcher.test(parse_ip(str(value))) == matcher.test(value)
    assert not matcher.test(None) and parse_ip("not-an-ip") is None
    assert parse_ip(str(value)) == ip_address(str(value))


ATTRIBUTES = ("source.principal", "request.path", "header:x-a")
constraints = st.builds(
    Constraint,
    field=st.just("f"),
    attribute=st.sampled_from(ATTRIBUTES),
    values=st.none()
    | st.lists(patterns, min_size=1, max_size=2).map(lambda p: StringMatcher.of(tuple(p))),
    not_values=st.none()
    | st.lists(patterns, min_size=1, max_size=2).map(lambda p: StringMatcher.of(tuple(p))),
)
clauses = st.lists(constraints, min_size=1, max_size=3).map(tuple)


def reference_constraint(c: Constraint, attrs: dict[str, str | None]) -> bool:
    value = attrs[c.attribute]
    ok = c.values is None or any(reference(p, value) for p in c.values.written)
    return ok and not (
        c.not_values is not None and any(reference(p, value) for p in c.not_values.written)
    )


@given(
    st.lists(clauses, max_size=2),
    st.lists(clauses, max_size=2),
    st.lists(constraints, max_size=2),
    st.none() | st.text("ab/.:-", min_size=1, max_size=5),
    st.text("ab.-", max_size=4),
    st.none() | st.text("ab/.:-", max_size=4),
)
def test_rule_is_any_from_any_to_every_when(
    sources: list[tuple[Constraint, ...]],
    operations: list[tuple[Constraint, ...]],
    conditions: list[Constraint],
    principal: str | None,
    path_tail: str,
    header: str | None,
) -> None:
    rule = Rule(0, tuple(sources), tuple(operations), tuple(conditions))
    path = "/" + path_tail
    headers = {} if header is None else {"x-a": header}
    view = RequestView(AuthzRequest(principal, "spiffe://td/ns/a/sa/b", headers=headers), path)
    attrs = {"source.principal": principal or None, "request.path": path, "header:x-a": header}
    expected = (
        (not sources or any(all(reference_constraint(c, attrs) for c in s) for s in sources))
        and (
            not operations
            or any(all(reference_constraint(c, attrs) for c in o) for o in operations)
        )
        and all(reference_constraint(c, attrs) for c in conditions)
    )
    assert rule_matches(rule, view) == expected
