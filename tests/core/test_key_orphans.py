"""Orphaned CA keys: stored, with our prefix, and named by no live journal entry."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshca.core.key_orphans import live_key_refs, orphaned_key_refs
from meshca.core.rotation import AuthorityEntry, AuthoritySet, AuthorityState
from tests.core.test_rotation import REMOVED, RETIRED, intermediate, root

P = "transit:meshca-example-org-"


def _keyed(entry: AuthorityEntry, key_ref: str | None) -> AuthorityEntry:
    return replace(entry, key_ref=key_ref)


_ROOT = root()
ROOT = _keyed(_ROOT, P + "root-aaaaaaaaaaaa")
INTER = _keyed(intermediate(_ROOT), P + "intermediate-bbbbbbbbbbbb")
OLD = _keyed(intermediate(_ROOT, RETIRED, n=2), P + "intermediate-cccccccccccc")
GONE = _keyed(
    replace(intermediate(_ROOT, n=3), state=AuthorityState.REMOVED),
    P + "intermediate-dddddddddddd",
)
UPSTREAM_ROOT = _keyed(root(n=4), "upstream:issuer-1")


@pytest.mark.parametrize(
    ("entries", "stored", "orphans"),
    [
        pytest.param((ROOT, INTER), [ROOT.key_ref, INTER.key_ref], (), id="ok/all-live"),
        pytest.param(
            (ROOT, INTER),
            [ROOT.key_ref, INTER.key_ref, P + "intermediate-eeeeeeeeeeee"],
            (P + "intermediate-eeeeeeeeeeee",),
            id="orphan/crash-before-record",
        ),
        pytest.param((ROOT, INTER, OLD), [OLD.key_ref], (), id="ok/retired-is-live"),
        pytest.param((ROOT, GONE), [GONE.key_ref], (GONE.key_ref,), id="orphan/removed-entry"),
        pytest.param(
            (),
            ["transit:payments-signing", "transit:meshca-other-org-root-1"],
            (),
            id="ok/outside-prefix-never",
        ),
        pytest.param((UPSTREAM_ROOT,), ["upstream:issuer-1"], (), id="ok/upstream-ref"),
        pytest.param(
            (), [P + "b", P + "a", P + "a"], (P + "a", P + "b"), id="orphan/sorted-unique"
        ),
    ],
)
def test_orphaned_key_refs(
    entries: tuple[AuthorityEntry, ...], stored: list[str], orphans: tuple[str, ...]
) -> None:
    assert orphaned_key_refs(stored, AuthoritySet(entries), prefix=P) == orphans


def test_a_removed_entry_does_not_orphan_a_key_a_live_entry_still_names() -> None:
    shared = _keyed(GONE, INTER.key_ref)
    assert (
        orphaned_key_refs([INTER.key_ref or ""], AuthoritySet((ROOT, INTER, shared)), prefix=P)
        == ()
    )
    assert live_key_refs(AuthoritySet((ROOT, shared))) == {ROOT.key_ref}
    assert REMOVED == AuthorityState.REMOVED


@given(st.lists(st.text(max_size=40), max_size=20))
def test_orphans_are_prefixed_stored_and_never_live(stored: list[str]) -> None:
    authorities = AuthoritySet((ROOT, INTER, OLD, GONE))
    found = orphaned_key_refs([*stored, ROOT.key_ref or ""], authorities, prefix=P)
    live = live_key_refs(authorities)
    assert all(r.startswith(P) and r in stored and r not in live for r in found)
    assert set(found) == {r for r in stored if r.startswith(P) and r not in live}
