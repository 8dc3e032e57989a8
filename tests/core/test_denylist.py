"""The deny-list's pure core: parsers, request checks, matching, expiry and log records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshca.core.audit import Outcome
from meshca.core.denylist import (
    MAX_REASON_CHARS,
    DenyEntry,
    DenyKind,
    DenyList,
    DenyRequest,
    check_lift,
    check_request,
    lift_record,
    parse_key_sha256,
    parse_serial,
    prefix_covers,
    revoke_record,
)
from meshca.core.errors import InvalidRequest, InvalidSpiffeId, UnsafeChange
from meshca.core.spiffe import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
OWN = SpiffeId.parse("spiffe://example.org/ns/meshca/sa/meshca")
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
KEY = "ab" * 32


def _entry(id_: int, kind: DenyKind, value: str, **kw: object) -> DenyEntry:
    values: dict[str, object] = dict(
        id=id_,
        kind=kind,
        value=value,
        reason="leaked",
        requested_by="alice",
        created_at=NOW - timedelta(hours=1),
    )
    values.update(kw)
    return DenyEntry(**values)  # type: ignore[arg-type]


def _check(kind: DenyKind, value: str, **kw: object) -> DenyRequest:
    options: dict[str, object] = dict(
        reason="key leaked",
        requested_by="alice",
        until=None,
        now=NOW,
        trust_domain=TD,
        protected=(OWN,),
        force=False,
    )
    options.update(kw)
    return check_request(kind, value, **options)  # type: ignore[arg-type]


# -- parsers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        pytest.param("1f", "1f", id="ok/plain"),
        pytest.param("0x00AB", "ab", id="ok/0x-and-leading-zeros"),
        pytest.param("0a:1B:ff", "a1bff", id="ok/colons"),
        pytest.param("f" * 40, "f" * 40, id="ok/20-octets"),
        pytest.param("000" + "1" * 40, "1" * 40, id="ok/leading-zeros-do-not-count"),
    ],
)
def test_serials_are_canonical(text: str, canonical: str) -> None:
    assert parse_serial(text) == canonical


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="fail/empty"),
        pytest.param("xyz", id="fail/not-hex"),
        pytest.param("12 34", id="fail/space-inside"),
        pytest.param("0", id="fail/zero"),
        pytest.param("0x", id="fail/bare-0x"),
        pytest.param("f" * 41, id="fail/21-octets"),
        pytest.param("1" * 10_000, id="fail/huge"),
        pytest.param("-1", id="fail/negative"),
        pytest.param("\uff11\uff12", id="fail/fullwidth-digits"),
    ],
)
def test_bad_serials_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_serial(text)


@given(st.integers(min_value=1, max_value=(1 << 160) - 1))
def test_serial_round_trips_the_logs_spelling(serial: int) -> None:
    assert parse_serial(f"{serial:x}") == f"{serial:x}"
    assert parse_serial(f"0x{serial:040X}") == f"{serial:x}"


@given(st.text(max_size=120))
def test_serial_parser_accepts_or_raises_invalid_request(text: str) -> None:
    try:
        value = parse_serial(text)
    except InvalidRequest:
        return
    assert value and len(value) <= 40 and value == f"{int(value, 16):x}"


@given(st.text(max_size=200))
def test_key_parser_accepts_only_64_hex_digits(text: str) -> None:
    try:
        value = parse_key_sha256(text)
    except InvalidRequest:
        return
    assert len(value) == 64 and set(value) <= set("0123456789abcdef")


@given(st.binary(min_size=32, max_size=32))
def test_key_parser_round_trips(digest: bytes) -> None:
    assert parse_key_sha256(digest.hex().upper()) == digest.hex()
    assert parse_key_sha256(":".join(f"{b:02x}" for b in digest)) == digest.hex()


# -- request checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "value", "options", "error"),
    [
        pytest.param(DenyKind.SERIAL, "nothex", {}, InvalidRequest, id="fail/serial-not-hex"),
        pytest.param(DenyKind.SERIAL, "a" * 41, {}, InvalidRequest, id="fail/serial-too-long"),
        pytest.param(DenyKind.KEY_SHA256, "ab" * 31, {}, InvalidRequest, id="fail/short-key"),
        pytest.param(
            DenyKind.SPIFFE_ID,
            "spiffe://other.org/ns/a/sa/b",
            {},
            InvalidSpiffeId,
            id="fail/outside-trust-domain",
        ),
        pytest.param(
            DenyKind.SPIFFE_ID, "spiffe://example.org/ns//sa", {}, InvalidSpiffeId, id="fail/empty"
        ),
        pytest.param(
            DenyKind.SPIFFE_ID, "https://example.org/ns/a", {}, InvalidSpiffeId, id="fail/scheme"
        ),
        pytest.param(
            DenyKind.SPIFFE_ID_PREFIX,
            "spiffe://example.org/ns/a/",
            {},
            InvalidSpiffeId,
            id="fail/trailing-slash",
        ),
        pytest.param(
            DenyKind.SPIFFE_ID,
            "spiffe://example.org/ns/a?x=1",
            {},
            InvalidSpiffeId,
            id="fail/query",
        ),
        pytest.param(
            DenyKind.SPIFFE_ID, "spiffe://example.org", {}, InvalidSpiffeId, id="fail/bare-domain"
        ),
        pytest.param(
            DenyKind.SPIFFE_ID_PREFIX,
            "spiffe://example.org",
            {},
            UnsafeChange,
            id="refused/whole-trust-domain",
        ),
        pytest.param(
            DenyKind.SPIFFE_ID_PREFIX,
            "spiffe://example.org/ns/meshca",
            {},
            UnsafeChange,
            id="refused/prefix-of-own-identity",
        ),
        pytest.param(
            DenyKind.SPIFFE_ID,
            str(OWN),
            {},
            UnsafeChange,
            id="refused/own-identity",
        ),
        pytest.param(DenyKind.SERIAL, "1f", {"reason": ""}, InvalidRequest, id="fail/no-reason"),
        pytest.param(DenyKind.SERIAL, "1f", {"reason": "  "}, InvalidRequest, id="fail/blank"),
        pytest.param(
            DenyKind.SERIAL, "1f", {"reason": "x" * 10_240}, InvalidRequest, id="fail/10kb-reason"
        ),
        pytest.param(
            DenyKind.SERIAL, "1f", {"reason": "a\nb"}, InvalidRequest, id="fail/multiline"
        ),
        pytest.param(
            DenyKind.SERIAL, "1f", {"reason": "a\x1b[31m"}, InvalidRequest, id="fail/escape"
        ),
        pytest.param(DenyKind.SERIAL, "1f", {"requested_by": ""}, InvalidRequest, id="fail/no-by"),
        pytest.param(
            DenyKind.SERIAL,
            "1f",
            {"until": NOW - timedelta(seconds=1)},
            InvalidRequest,
            id="fail/until-past",
        ),
        pytest.param(DenyKind.SERIAL, "1f", {"until": NOW}, InvalidRequest, id="fail/until-now"),
        pytest.param(
            DenyKind.SERIAL,
            "1f",
            {"until": datetime(2031, 1, 1)},
            InvalidRequest,
            id="fail/until-naive",
        ),
    ],
)
def test_bad_requests_are_refused(
    kind: DenyKind, value: str, options: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error) as caught:
        _check(kind, value, **options)
    # One line, and never the whole hostile input.
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300


def test_force_allows_what_is_otherwise_refused() -> None:
    whole = _check(DenyKind.SPIFFE_ID_PREFIX, "spiffe://example.org", force=True)
    own = _check(DenyKind.SPIFFE_ID_PREFIX, "spiffe://example.org/ns/meshca", force=True)
    assert whole.value == "spiffe://example.org"
    assert own.value == "spiffe://example.org/ns/meshca"


def test_a_sibling_of_meshcas_namespace_is_not_protected() -> None:
    # A prefix on a segment boundary: /ns/mesh is not a prefix of /ns/meshca/...
    request = _check(DenyKind.SPIFFE_ID_PREFIX, "spiffe://example.org/ns/mesh")
    assert request.value == "spiffe://example.org/ns/mesh"


def test_lift_text_checks() -> None:
    assert check_lift(" bob ", "") == ("bob", "")
    with pytest.raises(InvalidRequest):
        check_lift("bob", "y" * (MAX_REASON_CHARS + 1))
    with pytest.raises(InvalidRequest):
        check_lift("", "ok")


# -- matching ----------------------------------------------------------------------------------

_segment = st.sampled_from(["a", "b", "ab", "ns", "sa", "x.y", "a-b"])
_paths = st.lists(_segment, min_size=0, max_size=5).map(lambda s: "".join("/" + x for x in s))


def _covers_by_segments(prefix: str, spiffe_id: str) -> bool:
    """The rule written another way: the prefix's segments start the ID's segments."""
    p, s = prefix.split("/")[2:], spiffe_id.split("/")[2:]
    return s[: len(p)] == p


@given(_paths, _paths)
def test_prefix_matching_is_on_segment_boundaries(prefix_path: str, id_path: str) -> None:
    prefix = "spiffe://example.org" + prefix_path
    spiffe_id = "spiffe://example.org" + id_path
    expected = _covers_by_segments(prefix, spiffe_id)
    assert prefix_covers(prefix, spiffe_id) is expected
    deny = DenyList(0, (_entry(1, DenyKind.SPIFFE_ID_PREFIX, prefix),))
    assert (deny.is_denied(spiffe_id, None, None, NOW) is not None) is expected


@given(_paths, st.sampled_from(["example.org", "example.org.evil", "other.org"]))
def test_a_prefix_never_crosses_trust_domains(path: str, domain: str) -> None:
    deny = DenyList(0, (_entry(1, DenyKind.SPIFFE_ID_PREFIX, "spiffe://example.org"),))
    denied = deny.is_denied(f"spiffe://{domain}{path}", None, None, NOW) is not None
    assert denied is (domain == "example.org")


WEB = "spiffe://example.org/ns/shop/sa/web"


@pytest.mark.parametrize(
    ("entry", "spiffe_id", "key", "denied"),
    [
        pytest.param(_entry(1, DenyKind.SPIFFE_ID, WEB), WEB, None, True, id="deny/exact"),
        pytest.param(
            _entry(1, DenyKind.SPIFFE_ID, WEB), WEB + "x", None, False, id="ok/exact-only"
        ),
        pytest.param(
            _entry(1, DenyKind.SPIFFE_ID, WEB), WEB + "/more", None, False, id="ok/not-a-prefix"
        ),
        pytest.param(
            _entry(1, DenyKind.SPIFFE_ID_PREFIX, "spiffe://example.org/ns/shop"),
            WEB,
            None,
            True,
            id="deny/prefix",
        ),
        pytest.param(
            _entry(1, DenyKind.SPIFFE_ID_PREFIX, "spiffe://example.org/ns/sho"),
            WEB,
            None,
            False,
            id="ok/partial-segment",
        ),
        pytest.param(_entry(1, DenyKind.KEY_SHA256, KEY), WEB, KEY, True, id="deny/key"),
        pytest.param(_entry(1, DenyKind.KEY_SHA256, KEY), WEB, "cd" * 32, False, id="ok/other-key"),
        pytest.param(_entry(1, DenyKind.SERIAL, "1f"), WEB, None, False, id="ok/serial-no-block"),
        pytest.param(
            _entry(1, DenyKind.SPIFFE_ID, WEB, lifted_at=NOW), WEB, None, False, id="ok/lifted"
        ),
        pytest.param(
            _entry(1, DenyKind.SPIFFE_ID, WEB, until=NOW), WEB, None, False, id="ok/expired-now"
        ),
        pytest.param(
            _entry(1, DenyKind.SPIFFE_ID, WEB, until=NOW + timedelta(microseconds=1)),
            WEB,
            None,
            True,
            id="deny/until-not-yet",
        ),
    ],
)
def test_is_denied(entry: DenyEntry, spiffe_id: str, key: str | None, denied: bool) -> None:
    deny = DenyList(5, (entry,))
    found = deny.is_denied(spiffe_id, key, None, NOW)
    assert (found == entry) if denied else found is None


def test_the_lowest_entry_is_named_and_serials_match_only_serials() -> None:
    deny = DenyList(
        9,
        (
            _entry(7, DenyKind.SPIFFE_ID_PREFIX, "spiffe://example.org/ns/shop"),
            _entry(3, DenyKind.KEY_SHA256, KEY),
            _entry(5, DenyKind.SERIAL, "1f"),
        ),
    )
    assert deny.is_denied(WEB, KEY, None, NOW).id == 3  # type: ignore[union-attr]
    assert deny.is_denied(WEB, None, None, NOW).id == 7  # type: ignore[union-attr]
    assert deny.is_denied(None, None, "1f", NOW).id == 5  # type: ignore[union-attr]
    assert deny.has_keys and not deny.empty


def test_an_empty_or_serial_only_list_is_empty() -> None:
    assert DenyList().empty and not DenyList().has_keys
    serials = DenyList(1, (_entry(1, DenyKind.SERIAL, "1f"),))
    assert serials.empty
    lifted = DenyList(2, (_entry(1, DenyKind.SPIFFE_ID, WEB, lifted_at=NOW),))
    assert lifted.empty


# -- log records -------------------------------------------------------------------------------


def test_revoke_and_lift_records_say_who_what_and_why() -> None:
    entry = _entry(4, DenyKind.SPIFFE_ID_PREFIX, "spiffe://example.org/ns/shop", until=NOW)
    added = revoke_record(entry)
    assert added.outcome is Outcome.REVOKED and added.reason == "spiffe-id-prefix"
    assert added.spiffe_id == "spiffe://example.org/ns/shop"
    assert added.detail.startswith("deny-list entry 4: spiffe-id-prefix spiffe://example.org/")
    assert "by alice" in added.detail and "reason: leaked" in added.detail
    assert "until 2030-01-01T12:00:00.000000Z" in added.detail
    lifted = lift_record(_entry(4, DenyKind.KEY_SHA256, KEY), "bob", "rotated", NOW)
    assert lifted.outcome is Outcome.LIFTED and lifted.spiffe_id is None
    assert lifted.detail == f"deny-list entry 4 lifted: key-sha256 {KEY}; by bob; reason: rotated"
