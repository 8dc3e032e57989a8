"""The CA's authority journal over SQLAlchemy, beside the issuance record.

Every change is one transaction, and every state move is a compare-and-set (``UPDATE
... WHERE state = <expected>``): a process that lost a race gets ``JournalConflict``
and nothing of its change is applied, so a crash or a rival at any point leaves the
journal in a state the rules can resume from.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from meshca.adapters.storage.engine import error_summary, write_gate
from meshca.adapters.storage.record_rows import LOG_STATE_ID, insert_records, stored_record
from meshca.adapters.storage.tables import AuthorityJournalRow, LogStateRow
from meshca.core.audit import AuditRecord
from meshca.core.errors import BackendUnavailable, JournalConflict
from meshca.core.rotation import (
    AuthorityEntry,
    AuthorityKind,
    AuthoritySet,
    AuthoritySource,
    AuthorityState,
    Transition,
)

__all__ = ["SqlAuthorityJournal"]

_STAMP = {
    AuthorityState.ACTIVE: "activated_at",
    AuthorityState.RETIRED: "retired_at",
    AuthorityState.REMOVED: "removed_at",
}


class SqlAuthorityJournal:
    """``AuthorityJournal`` on a SQLAlchemy engine (SQLite or PostgreSQL). Blocking."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._gate = write_gate(engine)
        self._lock = threading.Lock()  # the gate serialises processes, not threads
        # Parsing PEM is most of a load's cost; rows never change their certificates.
        self._parsed: dict[str, tuple[x509.Certificate, tuple[x509.Certificate, ...]]] = {}

    def load(self) -> AuthoritySet:
        try:
            with Session(self._engine) as session:
                rows = session.scalars(select(AuthorityJournalRow)).all()
                return AuthoritySet(tuple(self._entry(row) for row in rows))
        except SQLAlchemyError as error:
            raise BackendUnavailable(
                f"cannot read the authority journal: {error_summary(error)}"
            ) from error

    def record(
        self, inserts: Sequence[AuthorityEntry], moves: Sequence[Transition], at: datetime
    ) -> None:
        try:
            with self._lock, self._gate, Session(self._engine) as session, session.begin():
                for entry in inserts:
                    session.add(_row(entry))
                session.flush()
                for move in moves:
                    values: dict[str, object] = {"state": move.to_state.value}
                    values[_STAMP[move.to_state]] = at
                    result = session.execute(
                        update(AuthorityJournalRow)
                        .where(AuthorityJournalRow.id == move.id)
                        .where(AuthorityJournalRow.state == move.from_state.value)
                        .values(**values)
                    )
                    if getattr(result, "rowcount", 0) != 1:
                        raise JournalConflict(
                            f"authority {move.id} is no longer {move.from_state}: "
                            "another process changed the journal first"
                        )
        except IntegrityError as error:
            raise JournalConflict("an authority with this id is already in the journal") from error
        except SQLAlchemyError as error:
            raise BackendUnavailable(
                f"cannot write the authority journal: {error_summary(error)}"
            ) from error

    def taint(self, entry_id: str, at: datetime, record: AuditRecord) -> int:
        """Mark ``entry_id`` tainted at ``at`` and append ``record`` to the issuance log,
        in one transaction; returns the record's leaf index.

        Raises ``JournalConflict`` if the entry is unknown, removed or already tainted
        (of two concurrent taints exactly one succeeds).
        """
        try:
            with self._lock, self._gate, Session(self._engine) as session, session.begin():
                result = session.execute(
                    update(AuthorityJournalRow)
                    .where(AuthorityJournalRow.id == entry_id)
                    .where(AuthorityJournalRow.tainted_at.is_(None))
                    .where(AuthorityJournalRow.state != AuthorityState.REMOVED.value)
                    .values(tainted_at=at)
                )
                if getattr(result, "rowcount", 0) != 1:
                    raise JournalConflict(
                        f"authority {entry_id} is unknown, removed or already tainted"
                    )
                connection = session.connection()
                insert_records(connection, [stored_record(record)])
                size = connection.execute(
                    select(LogStateRow.tree_size).where(LogStateRow.id == LOG_STATE_ID)
                ).scalar_one()
                return int(size) - 1
        except SQLAlchemyError as error:
            raise BackendUnavailable(
                f"cannot write the authority journal: {error_summary(error)}"
            ) from error

    def _entry(self, row: AuthorityJournalRow) -> AuthorityEntry:
        parsed = self._parsed.get(row.id)
        if parsed is None:
            certificate = x509.load_pem_x509_certificate(row.certificate_pem.encode())
            chain = (
                tuple(x509.load_pem_x509_certificates(row.chain_pem.encode()))
                if row.chain_pem
                else ()
            )
            parsed = self._parsed[row.id] = (certificate, chain)
        return AuthorityEntry(
            id=row.id,
            kind=AuthorityKind(row.kind),
            state=AuthorityState(row.state),
            source=AuthoritySource(row.source),
            certificate=parsed[0],
            parent_id=row.parent_id,
            key_ref=row.key_ref,
            prepared_at=row.prepared_at,
            activated_at=row.activated_at,
            retired_at=row.retired_at,
            removed_at=row.removed_at,
            chain=parsed[1],
            tainted_at=row.tainted_at,
        )


def _pem(certificates: Sequence[x509.Certificate]) -> str:
    return "".join(c.public_bytes(Encoding.PEM).decode() for c in certificates)


def _row(entry: AuthorityEntry) -> AuthorityJournalRow:
    return AuthorityJournalRow(
        id=entry.id,
        kind=entry.kind.value,
        state=entry.state.value,
        source=entry.source.value,
        parent_id=entry.parent_id,
        key_ref=entry.key_ref,
        certificate_pem=_pem([entry.certificate]),
        chain_pem=_pem(entry.chain),
        fingerprint_sha256=entry.fingerprint,
        not_before=entry.not_before,
        not_after=entry.certificate.not_valid_after_utc,
        prepared_at=entry.prepared_at,
        activated_at=entry.activated_at,
        retired_at=entry.retired_at,
        removed_at=entry.removed_at,
        tainted_at=entry.tainted_at,
    )
