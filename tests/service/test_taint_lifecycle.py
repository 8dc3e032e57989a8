"""A taint's whole life on the real SQL journal and key files, driven by a fake clock:
the move, the removal one longest leaf lifetime later, and a crash between the mark and
the move (the rotation rules finish the job at the next tick)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from meshca.adapters.keys.file_store import new_serial
from meshca.adapters.keys.files import FileKeyManager
from meshca.adapters.storage.engine import make_engine
from meshca.adapters.storage.journal import SqlAuthorityJournal
from meshca.adapters.storage.tables import create_schema
from meshca.core.rotation import AuthorityState, RotationPolicy
from meshca.core.taint import check_taint, taint_record
from meshca.service.authority import AuthorityService
from tests.core.builders import NOW, TRUST_DOMAIN
from tests.fakes import FakeClock

H = timedelta(hours=1)
SECOND = timedelta(seconds=1)
POLICY = RotationPolicy(
    root_ttl=24 * H,
    intermediate_ttl=4 * H,
    max_svid_ttl=H,
    propagation_delay=H,
    root_rotation=8 * H,
)


@pytest.fixture
def world(tmp_path: Path) -> tuple[AuthorityService, FakeClock, Path]:
    clock = FakeClock(NOW)
    engine = make_engine(f"sqlite:///{tmp_path / 'meshca.db'}")
    create_schema(engine)
    service = AuthorityService(
        journal=SqlAuthorityJournal(engine),
        keys=FileKeyManager(tmp_path / "ca"),
        clock=clock,
        policy=POLICY,
        trust_domain=TRUST_DOMAIN,
        new_serial=new_serial,
    )
    service.bootstrap()
    return service, clock, tmp_path / "ca"


def _key_files(ca: Path) -> int:
    return len(list(ca.rglob("*.key")))


def test_a_tainted_intermediate_is_replaced_now_and_removed_one_svid_lifetime_later(
    world: tuple[AuthorityService, FakeClock, Path],
) -> None:
    service, clock, ca = world
    clock.advance(10 * 60 * SECOND)
    old = service.view.authorities.active_intermediate
    assert old is not None and service.view.tainted == ()
    sequence = service.view.bundle_sequence
    keys = _key_files(ca)
    outcome = service.taint(old.id, reason="leaked", requested_by="sec")
    view = service.view
    assert view.authority is not None and view.authority.certificate != old.certificate
    assert view.tainted == (old.fingerprint,)
    assert view.bundle_sequence == sequence + 1
    assert outcome.entry.state == AuthorityState.RETIRED and outcome.entry.tainted_at == clock.now()
    assert _key_files(ca) == keys + 1
    clock.advance(H - SECOND)
    service.tick()
    assert service.view.authorities.get(old.id).state == AuthorityState.RETIRED  # type: ignore[union-attr]
    clock.advance(SECOND)
    service.tick()
    assert service.view.authorities.get(old.id).state == AuthorityState.REMOVED  # type: ignore[union-attr]
    assert _key_files(ca) == keys  # its key is gone
    assert service.view.tainted == ()


def test_a_tainted_root_waits_the_delay_then_retires_and_leaves_the_bundle(
    world: tuple[AuthorityService, FakeClock, Path],
) -> None:
    service, clock, _ = world
    old = service.view.authorities.active_root
    assert old is not None
    service.taint(old.id, reason="HSM lost", requested_by="sec")
    successor = service.view.authorities.prepared_root
    assert successor is not None
    assert service.view.bundle == (old.certificate, successor.certificate)
    clock.advance(H - SECOND)
    service.tick()
    assert service.view.authorities.active_root == service.view.authorities.get(old.id)
    clock.advance(SECOND)
    service.tick()
    authorities = service.view.authorities
    assert authorities.active_root is not None and authorities.active_root.id == successor.id
    assert authorities.get(old.id).state == AuthorityState.RETIRED  # type: ignore[union-attr]
    assert service.view.bundle == (successor.certificate, old.certificate)
    retired_at = clock.now()
    clock.advance(H - SECOND)
    service.tick()
    assert len(service.view.bundle) == 2
    clock.advance(SECOND)
    service.tick()
    assert service.view.bundle == (successor.certificate,)
    assert clock.now() == retired_at + POLICY.max_svid_ttl


def test_a_crash_after_the_mark_is_finished_by_the_next_tick(
    world: tuple[AuthorityService, FakeClock, Path],
) -> None:
    service, clock, _ = world
    journal = service._journal  # the mark alone, as if the command died right after it
    assert isinstance(journal, SqlAuthorityJournal)
    old = service.view.authorities.active_intermediate
    assert old is not None
    request = check_taint(
        service.view.authorities,
        old,
        reason="leaked",
        requested_by="sec",
        emergency=False,
        peers_may_fail=False,
        self_managed_roots=True,
    )
    journal.taint(old.id, clock.now(), taint_record(request, clock.now()))
    service.refresh()
    assert service.view.authority is not None
    assert service.view.authority.certificate == old.certificate  # not moved yet
    reports = service.tick()
    assert [r.step for r in reports] == ["prepare-intermediate", "activate-intermediate"]
    current = service.view.authorities.active_intermediate
    assert current is not None and current.id != old.id
