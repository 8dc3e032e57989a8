"""Which stored CA keys no live authority names: the orphans ``meshca ca prune-keys`` removes.

A key is live while a journal entry that is not removed names it as its ``key_ref``.
Every other key with this deployment's prefix is an orphan: made just before a crash
(before its entry was recorded), imported by a ``meshca ca import`` that did not get to
record its entry, or left by an authority whose removal did not get to delete its key.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshca.core.rotation import AuthoritySet, AuthorityState

__all__ = ["live_key_refs", "orphaned_key_refs"]


def live_key_refs(authorities: AuthoritySet) -> frozenset[str]:
    """The key references of every entry that is not removed."""
    return frozenset(
        e.key_ref
        for e in authorities.entries
        if e.key_ref is not None and e.state != AuthorityState.REMOVED
    )


def orphaned_key_refs(
    stored: Iterable[str], authorities: AuthoritySet, *, prefix: str
) -> tuple[str, ...]:
    """The ``stored`` references that start with ``prefix`` and no live entry names, sorted.

    A reference outside ``prefix`` is never an orphan: it is not meshca's to judge.
    """
    live = live_key_refs(authorities)
    return tuple(sorted({r for r in stored if r.startswith(prefix) and r not in live}))
