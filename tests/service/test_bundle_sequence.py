"""The bundle's sequence comes from the journal: it grows exactly when the bundle changes,
and a replica that starts late, or follows from another host, gives the same number."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from meshca.core.rotation import AuthoritySet
from tests.core.builders import NOW
from tests.fakes import FakeClock
from tests.service.test_fleet_rotation import POLICY, _service


def test_sequence_counts_bundle_changes_the_same_everywhere(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    leader = _service(tmp_path, clock, POLICY)
    leader.bootstrap()
    assert leader.view.bundle_sequence == 1
    seen = [(leader.view.bundle, leader.view.bundle_sequence)]
    for _ in range(int(timedelta(hours=40) / timedelta(minutes=10))):
        clock.advance(timedelta(minutes=10))
        leader.tick()
        bundle, sequence = leader.view.bundle, leader.view.bundle_sequence
        last_bundle, last_sequence = seen[-1]
        if bundle != last_bundle:
            assert sequence == last_sequence + 1, "each change is one version"
            seen.append((bundle, sequence))
        else:
            assert sequence == last_sequence
        # A replica starting now, on another host, reads the same number.
        late = _service(tmp_path, clock, POLICY)
        assert late.refresh().bundle_sequence == sequence
    assert len(seen) >= 8, "the run covers several root rotations"


def test_entry_order_does_not_matter(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    leader = _service(tmp_path, clock, POLICY)
    leader.bootstrap()
    for _ in range(60):
        clock.advance(timedelta(minutes=30))
        leader.tick()
    entries = leader.view.authorities.entries
    reordered = AuthoritySet(tuple(reversed(entries)))
    assert reordered.bundle_sequence() == leader.view.bundle_sequence > 3
