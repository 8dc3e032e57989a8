"""SPIFFE IDs and trust domains against the SPIFFE-ID standard (§2.1-2.3).

The corpus below is also run through the reference Python library (``spiffe``); where it
and meshca disagree, ``REFERENCE_DISAGREES`` records the case and which side the
standard supports.
"""

from __future__ import annotations

import dataclasses
import string

import pytest
import spiffe
from hypothesis import given, settings
from hypothesis import strategies as st
from spiffe.errors import PySpiffeError

from meshca.core.errors import InvalidRequest, InvalidSpiffeId
from meshca.core.spiffe import MAX_SPIFFE_ID_BYTES, MAX_TRUST_DOMAIN_BYTES, SpiffeId, TrustDomain

PREFIX = "spiffe://example.org/"
LONGEST = PREFIX + "a" * (MAX_SPIFFE_ID_BYTES - len(PREFIX))
LONGEST_TRUST_DOMAIN = "spiffe://" + "a" * MAX_TRUST_DOMAIN_BYTES
LONG_PATH = LONGEST_TRUST_DOMAIN + "/" + "b" * 2000

VALID = [
    pytest.param("spiffe://example.org", id="ok/trust-domain-only"),
    pytest.param("spiffe://example.org/ns/default/sa/web", id="ok/k8s-workload"),
    pytest.param("spiffe://example.org/Payments/MySQL", id="ok/path-is-case-sensitive"),
    pytest.param("spiffe://example.org/a.b/..c/.d/e..", id="ok/dots-inside-segments"),
    pytest.param("spiffe://my_td-1.example/x_y-z.0", id="ok/underscore-and-dash"),
    pytest.param("spiffe://10.0.0.1/workload", id="ok/ipv4-trust-domain"),
    pytest.param("spiffe://123/456", id="ok/digits-only"),
    pytest.param("spiffe://.../x", id="ok/dots-only-trust-domain"),
    pytest.param("spiffe://example.org/9eebccd2-12bf-40a6-b262-65fe0487d453", id="ok/opaque-uuid"),
    pytest.param(LONGEST_TRUST_DOMAIN, id="ok/trust-domain-255-bytes"),
    pytest.param(LONGEST_TRUST_DOMAIN + "/x", id="ok/trust-domain-255-bytes-with-path"),
    pytest.param(LONGEST, id="ok/id-2048-bytes"),
    pytest.param(PREFIX + "/".join(["s"] * 1014), id="ok/many-segments-2048-bytes"),
]

INVALID = [
    pytest.param("", id="fail/empty"),
    pytest.param("example.org/x", id="fail/no-scheme"),
    pytest.param("http://example.org/x", id="fail/wrong-scheme-http"),
    pytest.param("spiffes://example.org/x", id="fail/wrong-scheme-spiffes"),
    pytest.param("SPIFFE://example.org/x", id="fail/uppercase-scheme"),
    pytest.param("spiffe:/example.org/x", id="fail/single-slash"),
    pytest.param("spiffe:example.org", id="fail/opaque-uri"),
    pytest.param(" spiffe://example.org/x", id="fail/leading-space"),
    pytest.param("spiffe://", id="fail/empty-trust-domain"),
    pytest.param("spiffe:///x", id="fail/empty-trust-domain-with-path"),
    pytest.param("spiffe://Example.org/x", id="fail/uppercase-trust-domain"),
    pytest.param("spiffe://EXAMPLE.ORG", id="fail/all-uppercase-trust-domain"),
    pytest.param("spiffe://example.org/x?y=1", id="fail/query"),
    pytest.param("spiffe://example.org?", id="fail/empty-query"),
    pytest.param("spiffe://example.org/x#frag", id="fail/fragment"),
    pytest.param("spiffe://example.org#", id="fail/empty-fragment"),
    pytest.param("spiffe://example.org:8443/x", id="fail/port"),
    pytest.param("spiffe://example.org:/x", id="fail/empty-port"),
    pytest.param("spiffe://user@example.org/x", id="fail/userinfo"),
    pytest.param("spiffe://user:pw@example.org/x", id="fail/userinfo-with-password"),
    pytest.param("spiffe://@example.org", id="fail/empty-userinfo"),
    pytest.param("spiffe://[::1]/x", id="fail/ipv6-trust-domain"),
    pytest.param("spiffe://ex%41mple.org/x", id="fail/percent-encoded-trust-domain"),
    pytest.param("spiffe://example.org/%41", id="fail/percent-encoded-path"),
    pytest.param("spiffe://example.org/a%2Fb", id="fail/percent-encoded-slash"),
    pytest.param("spiffe://example.org/", id="fail/root-trailing-slash"),
    pytest.param("spiffe://example.org/x/", id="fail/trailing-slash"),
    pytest.param("spiffe://example.org//x", id="fail/empty-segment"),
    pytest.param("spiffe://example.org/./x", id="fail/dot-segment"),
    pytest.param("spiffe://example.org/x/..", id="fail/dotdot-segment"),
    pytest.param("spiffe://example.org/a b", id="fail/space-in-segment"),
    pytest.param("spiffe://example.org/a+b", id="fail/plus-in-segment"),
    pytest.param("spiffe://example.org/a~b", id="fail/tilde-in-segment"),
    pytest.param("spiffe://example.org/a:b", id="fail/colon-in-segment"),
    pytest.param("spiffe://example.org/a\\b", id="fail/backslash-in-segment"),
    pytest.param("spiffe://example.org/caf\u00e9", id="fail/non-ascii-segment"),
    pytest.param("spiffe://ex\u00e4mple.org/x", id="fail/non-ascii-trust-domain"),
    pytest.param("spiffe://\u212a8s.io/x", id="fail/kelvin-sign-lowercases-to-k"),
    pytest.param("spiffe://example.org/x\n", id="fail/trailing-newline-in-path"),
    pytest.param("spiffe://example.org\n", id="fail/trailing-newline-in-trust-domain"),
    pytest.param("spiffe://exa*mple.org", id="fail/star-in-trust-domain"),
    pytest.param("spiffe://example.org/\x00", id="fail/nul-in-segment"),
    pytest.param("spiffe://\ud800", id="fail/lone-surrogate-trust-domain"),
    pytest.param("spiffe://example.org/\udfff", id="fail/lone-surrogate-path"),
    pytest.param(LONGEST_TRUST_DOMAIN + "a", id="fail/trust-domain-256-bytes"),
    pytest.param(LONGEST + "a", id="fail/id-2049-bytes"),
    pytest.param(LONG_PATH, id="fail/long-path-over-2048"),
]

#: Inputs the reference library accepts although the SPIFFE-ID standard forbids them (or,
#: for length, although meshca's stricter policy refuses them), with what it makes of them.
REFERENCE_DISAGREES = [
    # §2.1: "The host part of the authority MUST be lowercase." §2.4 calls the scheme and
    # trust domain case-insensitive for *comparison*; the reference library lowercases,
    # so str() no longer round-trips. go-spiffe rejects, as meshca does.
    pytest.param("spiffe://Example.org/x", "spiffe://example.org/x", id="diff/uppercase-td"),
    pytest.param("SPIFFE://example.org/x", "spiffe://example.org/x", id="diff/uppercase-scheme"),
    pytest.param("spiffe://EXAMPLE.ORG", "spiffe://example.org", id="diff/all-uppercase-td"),
    # str.lower() maps U+212A KELVIN SIGN to ASCII 'k' before the [a-z0-9._-] check, so a
    # non-ASCII name aliases another trust domain. The standard allows only ASCII.
    pytest.param("spiffe://\u212a8s.io/x", "spiffe://k8s.io/x", id="diff/kelvin-sign"),
    # re.match(r"^...$") lets '$' match before a final newline, and the newline is kept.
    pytest.param("spiffe://example.org/x\n", "spiffe://example.org/x\n", id="diff/newline-in-path"),
    pytest.param("spiffe://example.org\n", "spiffe://example.org\n", id="diff/newline-in-td"),
    # §2.3: implementations MUST support 2048 bytes and a trust domain is at most 255
    # bytes; the reference library has no limits at all.
    pytest.param(
        LONGEST_TRUST_DOMAIN + "a", LONGEST_TRUST_DOMAIN + "a", id="diff/trust-domain-256"
    ),
    pytest.param(LONGEST + "a", LONGEST + "a", id="diff/id-2049-bytes"),
    pytest.param(LONG_PATH, LONG_PATH, id="diff/long-path-over-2048"),
]
_DISAGREE_INPUTS = {p.values[0] for p in REFERENCE_DISAGREES}


def _reference_str(text: str) -> str | None:
    """What the reference library makes of ``text``: its str(), or None if it refuses."""
    try:
        return str(spiffe.SpiffeId(text))
    except PySpiffeError:
        return None


# --- table-driven -------------------------------------------------------------------------


@pytest.mark.parametrize("text", VALID)
def test_valid_ids_round_trip(text: str) -> None:
    parsed = SpiffeId.parse(text)
    assert str(parsed) == text
    assert SpiffeId.parse(str(parsed)) == parsed
    assert SpiffeId(parsed.trust_domain, parsed.path) == parsed
    assert len(text.encode()) <= MAX_SPIFFE_ID_BYTES


@pytest.mark.parametrize("text", INVALID)
def test_invalid_ids_are_refused(text: str) -> None:
    with pytest.raises(InvalidSpiffeId) as caught:
        SpiffeId.parse(text)
    assert isinstance(caught.value, InvalidRequest)
    assert caught.value.reason == "invalid-spiffe-id"
    # Messages quote the input, but never flood a log with it.
    assert len(caught.value.message) < 250


def test_parse_splits_trust_domain_and_path() -> None:
    parsed = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")
    assert parsed.trust_domain == TrustDomain("example.org")
    assert parsed.path == "/ns/default/sa/web"
    assert parsed.is_workload
    root = SpiffeId.parse("spiffe://example.org")
    assert root.path == ""
    assert not root.is_workload


def test_ids_are_frozen_values() -> None:
    parsed = SpiffeId.parse("spiffe://example.org/x")
    assert parsed == SpiffeId.parse("spiffe://example.org/x")
    assert hash(parsed) == hash(SpiffeId.parse("spiffe://example.org/x"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.path = "/y"  # type: ignore[misc]


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("x", id="fail/no-leading-slash"),
        pytest.param("/", id="fail/slash-only"),
        pytest.param("/x/", id="fail/trailing-slash"),
        pytest.param("/x//y", id="fail/empty-segment"),
        pytest.param("/..", id="fail/dotdot"),
        pytest.param("/a?b", id="fail/query-char"),
        pytest.param("/" + "a" * 2040, id="fail/too-long"),
    ],
)
def test_constructor_checks_the_path_too(path: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        SpiffeId(TrustDomain("example.org"), path)


@pytest.mark.parametrize(
    ("text", "name"),
    [
        pytest.param("example.org", "example.org", id="ok/bare-name"),
        pytest.param("spiffe://example.org", "example.org", id="ok/trust-domain-id"),
        pytest.param("a" * 255, "a" * 255, id="ok/255-bytes"),
    ],
)
def test_trust_domain_parse(text: str, name: str) -> None:
    td = TrustDomain.parse(text)
    assert td.name == name
    assert str(td) == name
    assert td.id == "spiffe://" + name


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="fail/empty"),
        pytest.param("Example.org", id="fail/uppercase"),
        pytest.param("example.org:443", id="fail/port"),
        pytest.param("user@example.org", id="fail/userinfo"),
        pytest.param("example.org/x", id="fail/slash"),
        pytest.param("spiffe://example.org/x", id="fail/workload-id"),
        pytest.param("spiffe://example.org/", id="fail/trailing-slash"),
        pytest.param("ex%41mple.org", id="fail/percent-encoding"),
        pytest.param("a" * 256, id="fail/256-bytes"),
        pytest.param("\ud800", id="fail/lone-surrogate"),
    ],
)
def test_trust_domain_parse_refuses(text: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        TrustDomain.parse(text)


def test_workload_id() -> None:
    spiffe_id = TrustDomain("cluster.local").workload_id("default", "web")
    assert str(spiffe_id) == "spiffe://cluster.local/ns/default/sa/web"
    with pytest.raises(InvalidSpiffeId):
        TrustDomain("cluster.local").workload_id("a/../b", "web")


# --- the reference library ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [p for p in VALID + INVALID if p.values[0] not in _DISAGREE_INPUTS],
)
def test_reference_library_agrees(text: str) -> None:
    try:
        ours: str | None = str(SpiffeId.parse(text))
    except InvalidSpiffeId:
        ours = None
    assert _reference_str(text) == ours


@pytest.mark.parametrize(("text", "reference_result"), REFERENCE_DISAGREES)
def test_reference_library_is_laxer(text: str, reference_result: str) -> None:
    """meshca refuses these; if the reference library starts refusing too, move the case."""
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.parse(text)
    assert _reference_str(text) == reference_result


# --- properties ---------------------------------------------------------------------------

TRUST_DOMAIN_ALPHABET = string.ascii_lowercase + string.digits + ".-_"
SEGMENT_ALPHABET = string.ascii_letters + string.digits + ".-_"

trust_domains = st.text(TRUST_DOMAIN_ALPHABET, min_size=1, max_size=MAX_TRUST_DOMAIN_BYTES)
segments = st.text(SEGMENT_ALPHABET, min_size=1, max_size=200).filter(
    lambda s: s not in (".", "..")
)


@st.composite
def valid_ids(draw: st.DrawFn) -> tuple[str, str, str]:
    """A valid ID built from the allowed alphabets, up to the 2048-byte limit."""
    td = draw(trust_domains)
    parts = draw(st.lists(segments, max_size=20))
    path = "".join("/" + s for s in parts)
    while len(f"spiffe://{td}{path}") > MAX_SPIFFE_ID_BYTES:
        parts.pop()
        path = "".join("/" + s for s in parts)
    return f"spiffe://{td}{path}", td, path


#: Characters that matter to URI parsing, plus some that only look harmless.
NASTY = "/:@?#%[]. \t\n\r\x00\\~+AZaz09-_\u00e9\u212a\u0130\ud800\uff0f"


@st.composite
def mutated_ids(draw: st.DrawFn) -> str:
    text = list(draw(valid_ids())[0])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        match draw(st.sampled_from(["insert", "replace", "delete"])):
            case "insert":
                text.insert(at, draw(st.sampled_from(NASTY)))
            case "replace" if at < len(text):
                text[at] = draw(st.sampled_from(NASTY))
            case "delete" if at < len(text):
                del text[at]
            case _:
                pass
    return "".join(text)


@settings(max_examples=200)
@given(valid_ids())
def test_property_valid_ids_round_trip(case: tuple[str, str, str]) -> None:
    text, td, path = case
    parsed = SpiffeId.parse(text)
    assert str(parsed) == text
    assert parsed.trust_domain.name == td
    assert parsed.path == path
    # Everything meshca accepts, the reference library accepts with the same meaning.
    assert _reference_str(text) == text


@settings(max_examples=200)
@given(st.one_of(st.text(max_size=300), mutated_ids(), st.text(NASTY, max_size=40)))
def test_property_parse_returns_canonical_value_or_raises_invalid(text: str) -> None:
    try:
        parsed = SpiffeId.parse(text)
    except InvalidSpiffeId:
        return
    assert str(parsed) == text
    assert len(text.encode()) <= MAX_SPIFFE_ID_BYTES
    assert _reference_str(text) == text


@settings(max_examples=200)
@given(st.one_of(st.text(max_size=300), st.text(TRUST_DOMAIN_ALPHABET + NASTY, max_size=60)))
def test_property_trust_domain_parse_raises_only_invalid(text: str) -> None:
    try:
        td = TrustDomain.parse(text)
    except InvalidSpiffeId:
        return
    assert td.name == text.removeprefix("spiffe://")
    assert TrustDomain.parse(td.id) == td
