"""SqlRevokedLeaves: which issued, unexpired certificates the standing entries name."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine

from meshca.adapters.storage.record_rows import insert_records, stored_record
from meshca.adapters.storage.revoked_leaves import SqlRevokedLeaves
from meshca.core.audit import Outcome
from meshca.core.denylist import DenyEntry, DenyKind, DenyList
from tests.adapters.storage.log_fixtures import T0, TRUST_DOMAIN, make_record

WEB = f"{TRUST_DOMAIN}/ns/shop/sa/web"
NOW = T0 + timedelta(minutes=30)


def _entry(id_: int, kind: DenyKind, value: str, **kw: object) -> DenyEntry:
    fields: dict[str, object] = {
        "id": id_,
        "kind": kind,
        "value": value,
        "reason": "leak",
        "requested_by": "secteam",
        "created_at": NOW,
    }
    fields.update(kw)
    return DenyEntry(**fields)  # type: ignore[arg-type]


def _store(engine: Engine) -> None:
    records = [
        # Issued, live at NOW: serials a1.. a4
        make_record(0, spiffe_id=WEB, serial="a1", outcome=Outcome.ISSUED),
        make_record(1, spiffe_id=WEB + "/x", serial="a2", outcome=Outcome.ISSUED),
        make_record(2, spiffe_id=WEB + "x", serial="a3", outcome=Outcome.ISSUED),
        make_record(3, spiffe_id=f"{TRUST_DOMAIN}/ns/pay/sa/db", serial="a4"),
        # Expired before NOW.
        make_record(5, spiffe_id=WEB, serial="e1", not_after=NOW - timedelta(seconds=1)),
        # A refusal naming the same identity: never a certificate.
        make_record(4, spiffe_id=WEB, serial=None),
    ]
    with engine.begin() as connection:
        insert_records(connection, [stored_record(r) for r in records])


def _serials(engine: Engine, *entries: DenyEntry, limit: int = 100) -> list[str]:
    leaves = SqlRevokedLeaves(engine).revoked_leaves(DenyList(7, entries), NOW, limit)
    return [leaf.serial for leaf in leaves]


def test_each_kind_names_its_certificates(engine: Engine) -> None:
    _store(engine)
    assert _serials(engine) == []
    assert _serials(engine, _entry(1, DenyKind.SERIAL, "a4")) == ["a4"]
    assert _serials(engine, _entry(1, DenyKind.SERIAL, "e1")) == []  # expired
    assert _serials(engine, _entry(1, DenyKind.SERIAL, "ff")) == []  # never issued
    # The exact ID: not the one under it, not the sibling that shares its text.
    assert _serials(engine, _entry(1, DenyKind.SPIFFE_ID, WEB)) == ["a1"]
    # A prefix: the ID and what lies under it, on segment boundaries.
    assert _serials(engine, _entry(1, DenyKind.SPIFFE_ID_PREFIX, WEB)) == ["a1", "a2"]
    # A key entry blocks issuance only: the log does not record keys.
    assert _serials(engine, _entry(1, DenyKind.KEY_SHA256, "ab" * 32)) == []


def test_leaves_carry_their_entry_and_times(engine: Engine) -> None:
    _store(engine)
    by_id = _entry(3, DenyKind.SPIFFE_ID, WEB, created_at=NOW - timedelta(minutes=5))
    by_serial = _entry(4, DenyKind.SERIAL, "a1")
    leaves = SqlRevokedLeaves(engine).revoked_leaves(DenyList(9, (by_id, by_serial)), NOW)
    assert [(leaf.serial, leaf.entry_id, leaf.entry_kind) for leaf in leaves] == [
        ("a1", 3, DenyKind.SPIFFE_ID),
        ("a1", 4, DenyKind.SERIAL),
    ]
    assert leaves[0].revoked_at == NOW - timedelta(minutes=5)
    assert leaves[0].issued_at == T0 and leaves[0].not_after == T0 + timedelta(hours=1)


def test_lifted_and_lapsed_entries_name_nothing(engine: Engine) -> None:
    _store(engine)
    lapsed = _entry(1, DenyKind.SERIAL, "a1", until=NOW - timedelta(seconds=1))
    lifted = _entry(2, DenyKind.SERIAL, "a2", lifted_at=NOW)
    assert _serials(engine, lapsed, lifted) == []


def test_the_answer_is_bounded(engine: Engine) -> None:
    records = [make_record(n, spiffe_id=f"{WEB}/{n}", serial=f"{n + 1:x}") for n in range(30)]
    records = [r for r in records if r.outcome is Outcome.ISSUED]
    with engine.begin() as connection:
        insert_records(connection, [stored_record(r) for r in records])
    prefix = _entry(1, DenyKind.SPIFFE_ID_PREFIX, WEB)
    assert len(_serials(engine, prefix)) == len(records)
    assert len(_serials(engine, prefix, limit=5)) == 5


def test_many_entries_are_read_in_batches(engine: Engine) -> None:
    _store(engine)
    entries = [_entry(i, DenyKind.SERIAL, f"{0xF000 + i:x}") for i in range(1200)]
    entries.append(_entry(5000, DenyKind.SERIAL, "a3"))
    assert _serials(engine, *entries) == ["a3"]
