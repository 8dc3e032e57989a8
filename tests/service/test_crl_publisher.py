"""CrlPublisher: when CRLs are re-signed, which intermediates publish, failures keep the last
set, and two publishers (two replicas) agree on content and number."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.core.authority import build_intermediate, build_root
from meshca.core.crl import MAX_CRL_ENTRIES, CrlTooLarge, RevokedLeaf
from meshca.core.denylist import DenyEntry, DenyKind, DenyList
from meshca.core.errors import BackendUnavailable
from meshca.core.rotation import (
    AuthorityEntry,
    AuthorityKind,
    AuthoritySet,
    AuthoritySource,
    AuthorityState,
)
from meshca.core.spiffe import TrustDomain
from meshca.service.crl import CrlPublisher, CrlSet, CrlSigningFailed
from tests.fakes import FakeClock

TD = TrustDomain("example.org")
VALIDITY = timedelta(minutes=10)
HALF = VALIDITY / 2


@dataclass
class _Leaves:
    """The issuance log as the publisher sees it: every leaf a serial entry names."""

    issued: dict[str, tuple[datetime, datetime]] = field(default_factory=dict)
    down: bool = False
    calls: int = 0

    def revoked_leaves(
        self, deny_list: DenyList, now: datetime, limit: int = MAX_CRL_ENTRIES + 1
    ) -> tuple[RevokedLeaf, ...]:
        self.calls += 1
        if self.down:
            raise BackendUnavailable("database is down")
        found = []
        for entry in deny_list.standing(now):
            if entry.kind is DenyKind.SERIAL and entry.value in self.issued:
                issued_at, not_after = self.issued[entry.value]
                if not_after > now:
                    found.append(
                        RevokedLeaf(
                            entry.value,
                            issued_at,
                            not_after,
                            entry.created_at,
                            entry.id,
                            entry.kind,
                        )
                    )
        return tuple(found[:limit])


class _Journal:
    def __init__(self, start: datetime) -> None:
        root_key = ec.generate_private_key(ec.SECP256R1())
        root = build_root(root_key, TD, start - timedelta(days=1), timedelta(days=365), 1)
        self.keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        self.loads = 0
        entries = [
            AuthorityEntry(
                "root-1",
                AuthorityKind.ROOT,
                AuthorityState.ACTIVE,
                AuthoritySource.SELF,
                root,
                None,
                None,
                start - timedelta(days=1),
                activated_at=start - timedelta(days=1),
            )
        ]
        for serial, (state, activated, retired) in enumerate(
            [
                (AuthorityState.RETIRED, start - timedelta(hours=5), start - timedelta(hours=2)),
                (AuthorityState.ACTIVE, start - timedelta(hours=2), None),
                (AuthorityState.PREPARED, None, None),
                (AuthorityState.REMOVED, start - timedelta(days=1), start - timedelta(hours=5)),
            ],
            start=2,
        ):
            key = ec.generate_private_key(ec.SECP256R1())
            self.keys[f"key-{serial}"] = key
            cert = build_intermediate(
                key.public_key(), root, root_key, TD, start - timedelta(days=1),
                timedelta(days=30), serial,
            )  # fmt: skip
            entries.append(
                AuthorityEntry(
                    f"int-{serial}",
                    AuthorityKind.INTERMEDIATE,
                    state,
                    AuthoritySource.SELF,
                    cert,
                    "root-1",
                    f"key-{serial}",
                    start - timedelta(days=1),
                    activated_at=activated,
                    retired_at=retired,
                )
            )
        self.set = AuthoritySet(tuple(entries))

    def cert(self, entry_id: str) -> x509.Certificate:
        entry = self.set.get(entry_id)
        assert entry is not None
        return entry.certificate

    def load(self, ref: str) -> ec.EllipticCurvePrivateKey:
        """As a key manager does: ``BackendUnavailable`` for a key it cannot give."""
        self.loads += 1
        if ref not in self.keys:
            raise BackendUnavailable(f"no key {ref}")
        return self.keys[ref]


class _World:
    def __init__(self) -> None:
        self.clock = FakeClock()
        # Start just after a half-period boundary.
        epoch = datetime(1970, 1, 1, tzinfo=self.clock.current.tzinfo)
        elapsed = (self.clock.current - epoch) % HALF
        self.clock.advance(HALF - elapsed + timedelta(seconds=1))
        self.journal = _Journal(self.clock.now())
        self.leaves = _Leaves()
        self.deny = DenyList()

    def publisher(self) -> CrlPublisher:
        return CrlPublisher(
            source=self.leaves,
            deny_list=lambda: self.deny,
            authorities=lambda: self.journal.set,
            load_key=self.journal.load,
            clock=self.clock,
            validity=VALIDITY,
            slack=timedelta(seconds=10),
        )

    def revoke(self, serial: str, issued_at: datetime) -> None:
        self.leaves.issued[serial] = (issued_at, issued_at + timedelta(hours=24))
        entry = DenyEntry(
            len(self.deny.entries) + 1, DenyKind.SERIAL, serial, "leak", "secteam",
            self.clock.now(),
        )  # fmt: skip
        self.deny = DenyList(self.deny.revision + 2, (*self.deny.entries, entry))


def _listed(crls: CrlSet, journal: _Journal, entry_id: str) -> list[int]:
    cert = journal.cert(entry_id)
    crl = x509.load_der_x509_crl(crls.crls[_fp(cert)].der)
    assert crl.is_signature_valid(cert.public_key())
    return [r.serial_number for r in crl]


def _fp(cert: x509.Certificate) -> str:
    from meshca.core.crl import fingerprint

    return fingerprint(cert)


def test_published_by_active_retired_and_prepared_not_removed() -> None:
    world = _World()
    publisher = world.publisher()
    assert publisher.refresh() is True
    published = publisher.current().crls
    expected = {_fp(world.journal.cert(i)) for i in ("int-2", "int-3", "int-4")}
    assert set(published) == expected
    assert _fp(world.journal.cert("int-5")) not in published
    for crl in published.values():
        assert crl.serials == ()


def test_resigned_on_a_deny_list_change_and_at_half_validity_only() -> None:
    world = _World()
    publisher = world.publisher()
    assert publisher.refresh()
    first = publisher.current()
    loads = world.journal.loads

    # Nothing changed: no new CRL, no storage read, for the rest of the half-period.
    world.clock.advance(HALF - timedelta(seconds=2))
    reads = world.leaves.calls
    assert publisher.refresh() is False
    assert publisher.current() is first and world.leaves.calls == reads

    # A revoke: re-signed at once, the serial on the issuing intermediate's CRL only.
    world.revoke("abc123", world.clock.now() - timedelta(hours=1))
    assert publisher.refresh() is True
    second = publisher.current()
    assert _listed(second, world.journal, "int-3") == [0xABC123]
    assert _listed(second, world.journal, "int-2") == []
    fp = _fp(world.journal.cert("int-3"))
    assert second.crls[fp].number > first.crls[fp].number
    assert second.crls[fp].this_update == first.crls[fp].this_update

    # The half-period ends: re-signed with a new thisUpdate, same entries.
    world.clock.advance(timedelta(seconds=1))
    assert publisher.refresh() is True
    third = publisher.current().crls[fp]
    assert third.this_update == second.crls[fp].this_update + HALF
    assert third.next_update == third.this_update + VALIDITY
    assert third.number > second.crls[fp].number and third.serials == ("abc123",)
    # Keys are loaded once per intermediate, not once per CRL.
    assert world.journal.loads == loads


def test_a_leaf_of_the_retired_intermediate_goes_on_its_crl() -> None:
    world = _World()
    publisher = world.publisher()
    world.revoke("77", world.clock.now() - timedelta(hours=3))
    publisher.refresh()
    assert _listed(publisher.current(), world.journal, "int-2") == [0x77]
    assert _listed(publisher.current(), world.journal, "int-3") == []


def test_two_replicas_sign_the_same_content_and_number() -> None:
    world = _World()
    world.revoke("1a", world.clock.now() - timedelta(minutes=5))
    one, two = world.publisher(), world.publisher()
    one.refresh()
    world.clock.advance(timedelta(seconds=30))  # the other replica polls later
    two.refresh()
    for fp, crl in one.current().crls.items():
        other = two.current().crls[fp]
        assert (crl.number, crl.this_update, crl.serials) == (
            other.number, other.this_update, other.serials,
        )  # fmt: skip
        a, b = x509.load_der_x509_crl(crl.der), x509.load_der_x509_crl(other.der)
        assert a.tbs_certlist_bytes == b.tbs_certlist_bytes


def test_failures_keep_the_last_crls() -> None:
    world = _World()
    publisher = world.publisher()
    publisher.refresh()
    kept = publisher.current()
    world.leaves.down = True
    world.revoke("99", world.clock.now())
    with pytest.raises(BackendUnavailable):
        publisher.refresh()
    assert publisher.current() is kept
    world.leaves.down = False
    assert publisher.refresh() is True
    assert _listed(publisher.current(), world.journal, "int-3") == [0x99]


def test_too_many_revoked_certificates_keep_the_last_crls() -> None:
    world = _World()
    publisher = world.publisher()
    publisher.refresh()
    kept = publisher.current()
    start = world.clock.now() - timedelta(minutes=1)
    for n in range(MAX_CRL_ENTRIES + 1):
        world.leaves.issued[f"{n + 1:x}"] = (start, start + timedelta(hours=1))
    entries = tuple(
        DenyEntry(n + 1, DenyKind.SERIAL, f"{n + 1:x}", "r", "s", start)
        for n in range(MAX_CRL_ENTRIES + 1)
    )
    world.deny = DenyList(5, entries)
    with pytest.raises(CrlTooLarge, match="more than 10000"):
        publisher.refresh()
    assert publisher.current() is kept


async def test_run_refreshes_every_interval_wakes_watchers_and_reports_degraded() -> None:
    world = _World()
    publisher = world.publisher()
    seen: list[int] = []
    publisher.on_change = lambda crls: seen.append(crls.version)
    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop, 0.01))
    watched = publisher.watch()
    try:
        first = await asyncio.wait_for(anext(watched), 5)
        while first.version == 0:
            first = await asyncio.wait_for(anext(watched), 5)
        world.revoke("5", world.clock.now())
        second = await asyncio.wait_for(anext(watched), 5)
        assert second.version > first.version
        assert _listed(second, world.journal, "int-3") == [5]
        world.leaves.down = True
        world.revoke("6", world.clock.now())
        for _ in range(500):
            if publisher.degraded:
                break
            await asyncio.sleep(0.01)
        assert publisher.degraded and "database is down" in publisher.degraded
        assert publisher.current() is second
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert seen and seen[-1] == second.version


def test_one_key_that_cannot_sign_does_not_hold_back_the_others() -> None:
    world = _World()
    publisher = world.publisher()
    publisher.refresh()
    before = publisher.current()
    retired = _fp(world.journal.cert("int-2"))
    # The retired intermediate's key is gone (removed meanwhile, or Vault refuses it).
    del world.journal.keys["key-2"]
    publisher._signers.clear()  # a fresh process: every key is loaded again
    world.revoke("42", world.clock.now() - timedelta(minutes=1))
    with pytest.raises(CrlSigningFailed, match=retired[:16]):
        publisher.refresh()
    after = publisher.current()
    assert after.version > before.version
    assert _listed(after, world.journal, "int-3") == [0x42]  # the others were re-signed
    assert after.crls[retired] is before.crls[retired]  # this one keeps its last CRL
    # Tried again next round (the basis was not taken), still failing for that key only.
    with pytest.raises(CrlSigningFailed):
        publisher.refresh()
