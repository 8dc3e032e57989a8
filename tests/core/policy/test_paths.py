"""Path normalization: a table of known inputs, and properties over generated ones."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshca.core.errors import AmbiguousPath
from meshca.core.policy import normalize_path
from meshca.core.policy.match import StringMatcher

NORMALIZED = {
    "ok/root": ("/", "/"),
    "ok/empty": ("", "/"),
    "ok/plain": ("/api/v1/items", "/api/v1/items"),
    "ok/trailing-slash-kept": ("/api/", "/api/"),
    "ok/query-cut": ("/a?b=/admin", "/a"),
    "ok/fragment-cut": ("/a#/admin", "/a"),
    "ok/query-before-fragment": ("/a?x#y", "/a"),
    "ok/only-query": ("?x", "/"),
    "ok/dot": ("/a/./b", "/a/b"),
    "ok/dot-dot": ("/a/b/../c", "/a/c"),
    "ok/dot-dot-above-root": ("/../a", "/a"),
    "ok/trailing-dot-dot": ("/a/b/..", "/a/"),
    "ok/duplicate-slashes": ("//a///b", "/a/b"),
    "ok/trailing-double-slash": ("/a//", "/a/"),
    "ok/percent-decoded": ("/%61%62c", "/abc"),
    "ok/encoded-dot-segment": ("/a/%2e%2e/b", "/b"),
    "ok/utf8": ("/caf%C3%A9", "/café"),
    "ok/encoded-space": ("/a%20b", "/a b"),
    "ok/encoded-percent-alone": ("/100%25", "/100%"),
    "ok/encoded-question": ("/a%3Fb", "/a?b"),
    "ok/case-kept": ("/Admin", "/Admin"),
    "ok/dots-in-names": ("/a/.b/..c/...", "/a/.b/..c/..."),
    "ok/slashes-without-dots": ("/a//b/c", "/a/b/c"),
}

REFUSED = {
    "fail/encoded-slash": "/a%2Fb",
    "fail/encoded-slash-lower": "/a%2fb",
    "fail/backslash": "/a\\b",
    "fail/encoded-backslash": "/a%5cb",
    "fail/semicolon": "/a;b",
    "fail/nul": "/a\x00",
    "fail/encoded-nul": "/a%00",
    "fail/encoded-control": "/a%0a",
    "fail/control": "/a\tb",
    "fail/space": "/a b",
    "fail/non-ascii": "/café",
    "fail/del": "/a\x7f",
    "fail/bad-escape": "/a%g1",
    "fail/short-escape": "/a%4",
    "fail/double-encoding": "/%252e%252e/admin",
    "fail/not-utf8": "/%ff",
    "fail/relative": "a/b",
    "fail/asterisk-form": "*",
    "fail/absolute-form": "http://host/a",
    "fail/order-dependent": "/a//../b",
    "fail/too-long": "/" + "a" * 20_000,
}


@pytest.mark.parametrize(("raw", "expected"), NORMALIZED.values(), ids=NORMALIZED.keys())
def test_normalized(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize("raw", REFUSED.values(), ids=REFUSED.keys())
def test_refused(raw: str) -> None:
    with pytest.raises(AmbiguousPath):
        normalize_path(raw)


# -- properties ----------------------------------------------------------------------------

SAFE = string.ascii_letters + string.digits + "-._~!$&'()*+,=:@"
segments = st.lists(st.text(SAFE, min_size=0, max_size=6), max_size=6)


def _encode_some(text: str, data: st.DataObject) -> str:
    out = []
    for char in text:
        if data.draw(st.booleans()):
            hex_ = f"{ord(char):02X}"
            out.append("%" + (hex_ if data.draw(st.booleans()) else hex_.lower()))
        else:
            out.append(char)
    return "".join(out)


@given(st.text(max_size=60))
@settings(max_examples=400)
def test_any_input_normalizes_or_is_refused(raw: str) -> None:
    try:
        path = normalize_path(raw)
    except AmbiguousPath:
        return
    assert path.startswith("/")
    assert "//" not in path
    parts = path.split("/")[1:]
    assert "." not in parts and ".." not in parts


@given(segments)
def test_normalizing_twice_changes_nothing(parts: list[str]) -> None:
    raw = "/" + "/".join(parts)
    try:
        once = normalize_path(raw)
    except AmbiguousPath:
        return
    assert normalize_path(once) == once


ADMIN_DISGUISES = st.sampled_from(["", "./", "x/../", "/", "./x/../", ".//"])


@given(
    prefix=ADMIN_DISGUISES,
    middle=ADMIN_DISGUISES,
    tail=st.sampled_from(["", "?x", "#x", "?a=/b#c", "/", "/."]),
    subpath=st.sampled_from(["", "/users", "/./users"]),
    data=st.data(),
)
@settings(max_examples=300)
def test_no_spelling_of_admin_escapes_an_admin_rule(
    prefix: str, middle: str, tail: str, subpath: str, data: st.DataObject
) -> None:
    """Whatever the spelling, a path that means /admin[/...] normalizes to it or is refused."""
    raw = "/" + prefix + middle + _encode_some("admin", data) + subpath + tail
    deny = StringMatcher.of(("/admin", "/admin/*"))
    try:
        path = normalize_path(raw)
    except AmbiguousPath:
        return
    assert deny.test(path), (raw, path)


@given(st.lists(st.sampled_from(["a", "b", ".", "..", "", "%2e", "%2E%2e"]), max_size=8))
def test_dot_segments_never_survive(parts: list[str]) -> None:
    try:
        path = normalize_path("/" + "/".join(parts))
    except AmbiguousPath:
        return
    assert all(p not in (".", "..") for p in path.split("/"))
