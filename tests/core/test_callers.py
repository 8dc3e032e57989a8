"""The table of callers and the ``--policy-caller`` SPIFFE ID patterns."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshca.core.callers import CALLERS, Access, SpiffePatterns, row_for
from meshca.core.errors import InvalidSpiffeId

SHOP = "spiffe://example.org/ns/shop/sa/frontend"


@pytest.mark.parametrize(
    ("patterns", "spiffe_id", "matches"),
    [
        pytest.param(("spiffe://example.org/*",), SHOP, True, id="ok/trust-domain-prefix"),
        pytest.param(
            ("spiffe://example.org/*",), "spiffe://evil.org/ns/a/sa/b", False, id="fail/other-td"
        ),
        pytest.param(
            ("spiffe://example.org/*",),
            "spiffe://example.org.evil.com/ns/a",
            False,
            id="fail/td-suffix-trick",
        ),
        pytest.param((SHOP,), SHOP, True, id="ok/exact"),
        pytest.param((SHOP,), SHOP + "x", False, id="fail/exact-is-exact"),
        pytest.param(("*/sa/frontend",), SHOP, True, id="ok/suffix"),
        pytest.param(("*/sa/backend",), SHOP, False, id="fail/suffix"),
        pytest.param(("*",), SHOP, True, id="ok/any"),
        pytest.param(("*",), None, False, id="fail/no-svid-never-matches"),
        pytest.param((), SHOP, False, id="fail/no-patterns"),
        pytest.param(("spiffe://example.org/ns/mesh/*", SHOP), SHOP, True, id="ok/second-pattern"),
    ],
)
def test_patterns(patterns: tuple[str, ...], spiffe_id: str | None, matches: bool) -> None:
    assert SpiffePatterns.parse(patterns).test(spiffe_id) is matches


@pytest.mark.parametrize(
    "pattern",
    [
        pytest.param("", id="fail/empty"),
        pytest.param("example.org/ns/a/sa/b", id="fail/no-scheme"),
        pytest.param("spiffe://example.org/*/sa/b", id="fail/star-in-the-middle"),
        pytest.param("*spiffe://example.org/*", id="fail/two-stars"),
        pytest.param("spiffe://Example.org/ns/a", id="fail/uppercase-trust-domain"),
        pytest.param("spiffe://example.org/ns/a?x=1", id="fail/query"),
        pytest.param("https://example.org/*", id="fail/other-scheme"),
    ],
)
def test_bad_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        SpiffePatterns.parse([pattern])


@given(st.text(max_size=300))
def test_parse_returns_or_raises_invalid_spiffe_id(text: str) -> None:
    try:
        patterns = SpiffePatterns.parse([text])
    except InvalidSpiffeId:
        return
    # What parses matches itself (an exact ID) or is a pattern with one '*' at an end.
    assert patterns.written == (text,)
    assert text.count("*") <= 1
    if "*" not in text:
        assert patterns.test(text)


@given(
    st.from_regex(r"[a-z0-9/._-]{0,40}", fullmatch=True),
    st.from_regex(r"[a-z0-9/._-]{0,40}", fullmatch=True),
)
def test_a_prefix_matches_exactly_what_starts_with_it(prefix: str, rest: str) -> None:
    pattern = f"spiffe://example.org/{prefix}*"
    spiffe_id = f"spiffe://example.org/{rest}"
    assert SpiffePatterns.parse([pattern]).test(spiffe_id) is spiffe_id.startswith(pattern[:-1])


def test_every_method_has_one_row_and_lookups_of_unknown_methods_fail() -> None:
    methods = [m for row in CALLERS for m in row.methods]
    assert len(methods) == len(set(methods))
    for row in CALLERS:
        for method in row.methods:
            assert row_for(method) is row
    with pytest.raises(KeyError):
        row_for("meshca.v1.PolicyService/Delete")
    assert row_for("envoy.service.auth.v3.Authorization/Check").access is Access.POLICY_CALLER
    assert {r.access for r in CALLERS} == set(Access)
