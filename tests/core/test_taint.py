"""Tainting an authority: resolving the fingerprint, refusals, the rotation rules for
tainted entries, the log record, the peer-failure prediction and the agent's check."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given
from hypothesis import strategies as st

from meshca.core.agent import chain_tainted
from meshca.core.audit import Outcome
from meshca.core.errors import InvalidRequest, UnsafeChange
from meshca.core.rotation import AuthoritySet, AuthoritySource, Step
from meshca.core.taint import (
    MAX_REASON_CHARS,
    IssuedLeaf,
    check_taint,
    predict_peer_failures,
    resolve,
    taint_record,
)
from tests.core.test_rotation import (
    ACTIVE,
    POLICY,
    PREPARED,
    REMOVED,
    RETIRED,
    T0,
    H,
    intermediate,
    root,
    rules,
)

R1 = root()
I1 = intermediate(R1)
SET = AuthoritySet((R1, I1))


def _check(entry, *, reason="key leaked", emergency=False, yes=False, managed=True, into=SET):  # type: ignore[no-untyped-def]
    return check_taint(
        into,
        entry,
        reason=reason,
        requested_by="alice",
        emergency=emergency,
        peers_may_fail=yes,
        self_managed_roots=managed,
    )


# -- resolving the fingerprint -----------------------------------------------------------


def test_resolve_takes_the_id_the_full_fingerprint_and_colon_separated_upper_case() -> None:
    assert resolve(SET, I1.id) == I1
    assert resolve(SET, I1.fingerprint) == I1
    pairs = [I1.fingerprint[i : i + 2].upper() for i in range(0, 32, 2)]
    assert resolve(SET, ":".join(pairs)) == I1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("", "not up to 64 hexadecimal", id="empty"),
        pytest.param("xyz" * 6, "not up to 64 hexadecimal", id="not-hex"),
        pytest.param("a" * 65, "not up to 64 hexadecimal", id="too-long"),
        pytest.param("abcdef", "give at least 16", id="too-short"),
        pytest.param("0" * 64, "no authority has fingerprint", id="unknown"),
        pytest.param("\x00" * 20, "not up to 64 hexadecimal", id="nul"),
    ],
)
def test_resolve_refuses_hostile_input(text: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        resolve(SET, text)


def test_resolve_refuses_an_ambiguous_prefix() -> None:
    # 17 intermediates: two share a first hex digit (pigeonhole), so a one-digit prefix
    # is ambiguous for at least one digit.
    entries = [R1, *(intermediate(R1, n=40 + i) for i in range(17))]
    authorities = AuthoritySet(tuple(entries))
    firsts = [e.fingerprint[0] for e in entries]
    shared = next(d for d in firsts if firsts.count(d) > 1)
    with pytest.raises(InvalidRequest, match=r"names [0-9]+ authorities") as raised:
        resolve(authorities, shared, min_length=1)
    assert raised.value.reason == "ambiguous-fingerprint"


@given(st.text(max_size=200))
def test_resolve_either_finds_an_entry_or_raises_invalid_request(text: str) -> None:
    try:
        found = resolve(SET, text)
    except InvalidRequest as error:
        assert error.reason in ("invalid-fingerprint", "unknown-authority")
    else:
        assert found in SET.entries
        assert found.fingerprint.startswith(text.strip().lower().replace(":", ""))


# -- refusals ------------------------------------------------------------------------------


def test_a_tainted_authority_cannot_be_tainted_again() -> None:
    with pytest.raises(UnsafeChange, match="already tainted"):
        _check(replace(I1, tainted_at=T0))


def test_a_removed_authority_cannot_be_tainted() -> None:
    with pytest.raises(UnsafeChange, match="was removed"):
        _check(replace(I1, state=REMOVED))


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        ("x" * 10_240, f"10240 characters; the limit is {MAX_REASON_CHARS}"),
        ("  ", "reason is empty"),
        ("line one\nline two", "one line of printable text"),
        ("bidi \u202e override", "one line of printable text"),
    ],
)
def test_the_reason_must_be_one_bounded_line(reason: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        _check(I1, reason=reason)


def test_emergency_needs_the_explicit_flag_and_an_active_root() -> None:
    with pytest.raises(UnsafeChange, match="yes-i-understand-peers-may-fail"):
        _check(R1, emergency=True)
    assert _check(R1, emergency=True, yes=True).emergency
    with pytest.raises(UnsafeChange, match="for roots"):
        _check(I1, emergency=True, yes=True)
    with pytest.raises(UnsafeChange, match="not active"):
        _check(root(PREPARED, n=2), emergency=True, yes=True)


def test_the_only_root_may_be_tainted_without_emergency() -> None:
    request = _check(R1)
    assert not request.emergency and request.entry == R1


def test_an_upstream_root_is_refused_with_what_to_do_in_vault() -> None:
    upstream = replace(R1, source=AuthoritySource.UPSTREAM, key_ref="upstream:default")
    with pytest.raises(UnsafeChange, match=r"pki/root/rotate/internal"):
        _check(upstream)
    with pytest.raises(UnsafeChange, match="upstream CA"):
        _check(R1, managed=False)
    # An intermediate under an upstream root is tainted as usual.
    assert _check(I1, managed=False).entry == I1


# -- the log record --------------------------------------------------------------------------


def test_the_record_names_the_authority_who_and_why() -> None:
    record = taint_record(_check(I1), T0)
    assert record.outcome is Outcome.REVOKED
    assert record.api == "taint"
    assert record.reason == "taint-intermediate"
    assert record.fingerprint_sha256 == I1.fingerprint
    assert "by alice" in record.detail and "key leaked" in record.detail


# -- rotation rules for tainted entries -----------------------------------------------------


def test_a_tainted_active_intermediate_is_replaced_at_once() -> None:
    tainted = replace(I1, tainted_at=T0 + H)
    assert rules(R1, I1).intermediate_prepare_at() == I1.half_life
    due = rules(R1, tainted).due(T0 + H)
    assert [s.step for s in due] == [Step.PREPARE_INTERMEDIATE]


def test_a_tainted_prepared_intermediate_is_never_activated_and_is_removed() -> None:
    waiting = replace(intermediate(R1, PREPARED, at=T0 + H, n=2), tainted_at=T0 + H)
    rotation = rules(R1, I1, waiting)
    assert not rotation.should_activate_intermediate(T0 + 2 * H)
    assert rotation.remove_at(waiting) == waiting.prepared_at


def test_a_tainted_retired_intermediate_goes_one_svid_lifetime_after_it_stopped() -> None:
    retired = replace(intermediate(R1, RETIRED, at=T0, n=3), retired_at=T0 + H, tainted_at=T0 + H)
    plain = replace(retired, tainted_at=None)
    assert rules(R1, I1, plain).remove_at(plain) == retired.not_after
    assert rules(R1, I1, retired).remove_at(retired) == T0 + H + POLICY.max_svid_ttl


def test_a_tainted_root_gets_a_successor_now_and_goes_svid_lifetime_after_retiring() -> None:
    tainted = replace(R1, tainted_at=T0 + H)
    assert rules(tainted, I1).root_prepare_at() is not None
    assert rules(tainted, I1).should_prepare_root(T0 + H)
    assert not rules(R1, I1).should_prepare_root(T0 + H)
    retired = replace(tainted, state=RETIRED, retired_at=T0 + 2 * H)
    child = replace(I1, state=RETIRED, retired_at=T0 + 2 * H)
    assert rules(retired, child).remove_at(retired) == T0 + 2 * H + POLICY.max_svid_ttl


def test_a_tainted_prepared_root_never_takes_over() -> None:
    waiting = replace(root(PREPARED, at=T0 + H, n=2), tainted_at=T0 + H)
    rotation = rules(R1, I1, waiting)
    assert rotation.root_activate_at(T0 + 5 * H) is None
    assert rotation.remove_at(waiting) == waiting.prepared_at


def test_a_taint_changes_the_bundle_sequence_and_the_signature() -> None:
    before = AuthoritySet((R1, I1))
    after = AuthoritySet((R1, replace(I1, tainted_at=T0 + H)))
    assert after.bundle_sequence() == before.bundle_sequence() + 1
    assert after.signature() != before.signature()
    assert after.tainted() == (after.entries[1],)


# -- who may fail --------------------------------------------------------------------------


def test_prediction_counts_unexpired_leaves_issued_while_the_root_was_active() -> None:
    now = T0 + 3 * H
    leaves = [
        IssuedLeaf("spiffe://example.org/a", T0 + 2 * H, now + H),  # counts
        IssuedLeaf("spiffe://example.org/a", T0 + 2.5 * H, now + 0.5 * H),  # same ID
        IssuedLeaf("spiffe://example.org/b", T0 + H, now - timedelta(seconds=1)),  # expired
        IssuedLeaf("spiffe://example.org/c", T0 - H, now + H),  # before the root
        IssuedLeaf("spiffe://example.org/d", T0 + 2.9 * H, now + 0.9 * H),  # counts
    ]
    prediction = predict_peer_failures(SET, R1, leaves, now)
    assert prediction.spiffe_ids == ("spiffe://example.org/a", "spiffe://example.org/d")
    assert prediction.count == 2
    assert prediction.until == now + H
    assert predict_peer_failures(SET, root(PREPARED, n=2), leaves, now).count == 0


# -- the agent's check -----------------------------------------------------------------------


def _der(entry) -> bytes:  # type: ignore[no-untyped-def]
    return bytes(entry.certificate.public_bytes(Encoding.DER))


def test_chain_tainted_finds_a_tainted_intermediate_or_issuing_root() -> None:
    leaf = b"leaf"  # never parsed: only the certificates after the leaf are
    chain = (leaf, _der(I1))
    roots = (_der(R1),)
    assert chain_tainted(chain, roots, frozenset()) is None
    assert chain_tainted(chain, roots, frozenset({I1.fingerprint})) == I1.fingerprint
    assert chain_tainted(chain, roots, frozenset({R1.fingerprint})) == R1.fingerprint
    other = root(ACTIVE, n=3)
    assert chain_tainted(chain, (_der(other),), frozenset({other.fingerprint})) is None
    assert chain_tainted(chain, (b"garbage",), frozenset({"00" * 32})) is None


@given(
    st.lists(st.binary(max_size=80), max_size=4),
    st.lists(st.binary(max_size=80), max_size=3),
    st.lists(st.text(max_size=70), max_size=4),
    st.booleans(),
)
def test_chain_tainted_takes_any_bytes_and_only_names_what_was_tainted(
    chain: list[bytes], roots: list[bytes], names: list[str], include_own: bool
) -> None:
    import hashlib

    tainted = set(names)
    if include_own:
        tainted |= {hashlib.sha256(b).hexdigest() for b in chain[1:] + roots}
    found = chain_tainted(tuple(chain), tuple(roots), frozenset(tainted))
    assert found is None or found in tainted
    if include_own and len(chain) > 1:
        assert found == hashlib.sha256(chain[1]).hexdigest()
