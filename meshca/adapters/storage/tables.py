"""The SQL schema: typed declarative tables and ``create_schema``.

Timestamps are always timezone-aware UTC on the Python side. PostgreSQL stores them as
``timestamptz``; SQLite has no time zone type, so they are stored there as naive UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Engine,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from meshca.adapters.storage.engine import error_summary, redacted_url
from meshca.core.errors import BackendUnavailable

__all__ = [
    "AuthorityJournalRow",
    "Base",
    "DecisionRecordRow",
    "DenyEntryRow",
    "IssuanceRecordRow",
    "LogNodeRow",
    "LogStateRow",
    "SealedKeyRow",
    "TreeHeadRow",
    "UtcDateTime",
    "create_schema",
]


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that accepts only aware datetimes and always returns aware UTC ones.

    A naive datetime is refused (``ValueError``) rather than guessed at: an audit time in
    the wrong zone is worse than a failed write.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} cannot be stored")
        utc = value.astimezone(UTC)
        # SQLite's DATETIME text has no offset; storing naive UTC keeps it sortable.
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


# The record grows forever, so PostgreSQL gets a 64-bit key; SQLite's INTEGER PRIMARY
# KEY is already 64-bit and must stay spelled INTEGER to alias the rowid.
_RecordId = BigInteger().with_variant(Integer(), "sqlite")
# Byte order on both databases (SQLite's default BINARY, PostgreSQL's "C"), so that a
# SPIFFE ID prefix is one index range whatever the server's default collation.
_BytewiseText = String().with_variant(String(collation="C"), "postgresql")


class IssuanceRecordRow(Base):
    """One row per certificate issued and per request refused (see ``AuditRecord``).

    Text columns have no length limit on purpose: a value the database refuses would
    withhold a certificate or lose a refusal record.

    ``leaf_index`` is the record's place in the verifiable log, assigned inside the write
    transaction under the log's lock (``log_state``), so it follows commit order with no
    gaps; ``leaf_hash`` is RFC 9162's leaf hash of ``core.audit.leaf_data``.
    """

    __tablename__ = "issuance_record"

    id: Mapped[int] = mapped_column(_RecordId, primary_key=True, autoincrement=True)
    leaf_index: Mapped[int] = mapped_column(BigInteger(), unique=True)
    leaf_hash: Mapped[bytes] = mapped_column(LargeBinary())
    time: Mapped[datetime] = mapped_column(UtcDateTime())
    outcome: Mapped[str] = mapped_column(String())
    api: Mapped[str] = mapped_column(String())
    reason: Mapped[str] = mapped_column(String())
    detail: Mapped[str] = mapped_column(Text())
    spiffe_id: Mapped[str | None] = mapped_column(_BytewiseText)
    serial: Mapped[str | None] = mapped_column(String())
    fingerprint_sha256: Mapped[str | None] = mapped_column(String())
    not_before: Mapped[datetime | None] = mapped_column(UtcDateTime())
    not_after: Mapped[datetime | None] = mapped_column(UtcDateTime())
    namespace: Mapped[str | None] = mapped_column(String())
    service_account: Mapped[str | None] = mapped_column(String())
    pod_name: Mapped[str | None] = mapped_column(String())
    pod_uid: Mapped[str | None] = mapped_column(String())
    node_name: Mapped[str | None] = mapped_column(String())
    peer: Mapped[str | None] = mapped_column(String())
    csr_sha256: Mapped[str | None] = mapped_column(String())

    # Every query is newest first by (time, leaf_index), so each filter's index ends so.
    __table_args__ = (
        Index("ix_issuance_record_time", "time", "leaf_index"),
        Index("ix_issuance_record_spiffe_id_time", "spiffe_id", "time", "leaf_index"),
        Index("ix_issuance_record_namespace_time", "namespace", "time", "leaf_index"),
        Index("ix_issuance_record_service_account", "service_account", "time"),
        Index("ix_issuance_record_outcome_time", "outcome", "time", "leaf_index"),
        Index("ix_issuance_record_serial", "serial"),
        Index("ix_issuance_record_fingerprint", "fingerprint_sha256"),
        Index("ix_issuance_record_pod_name", "pod_name"),
        Index("ix_issuance_record_pod_uid", "pod_uid"),
    )


class LogStateRow(Base):
    """The verifiable log's counters: one row (``id`` 1), locked by every log writer.

    ``tree_size`` is the next leaf index. Leaves below ``pruned_below`` were removed by
    retention; ``log_node`` keeps the hashes that still prove the rest.
    """

    __tablename__ = "log_state"

    id: Mapped[int] = mapped_column(Integer(), primary_key=True, autoincrement=False)
    tree_size: Mapped[int] = mapped_column(BigInteger())
    pruned_below: Mapped[int] = mapped_column(BigInteger(), default=0)


class LogNodeRow(Base):
    """Cached hashes of complete subtrees of the log (``core.merkle.Subtree``).

    Levels that are multiples of ``storage.transparency.STRIDE`` are filled as tree heads
    are signed; other levels hold only what pruning must leave behind.
    """

    __tablename__ = "log_node"

    level: Mapped[int] = mapped_column(SmallInteger(), primary_key=True, autoincrement=False)
    idx: Mapped[int] = mapped_column(BigInteger(), primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary())


class TreeHeadRow(Base):
    """A signed tree head (``core.log.SignedTreeHead``); timestamps in epoch milliseconds."""

    __tablename__ = "log_tree_head"

    id: Mapped[int] = mapped_column(_RecordId, primary_key=True, autoincrement=True)
    tree_size: Mapped[int] = mapped_column(BigInteger())
    timestamp_ms: Mapped[int] = mapped_column(BigInteger())
    root_hash: Mapped[bytes] = mapped_column(LargeBinary())
    key_id: Mapped[bytes] = mapped_column(LargeBinary())
    signature: Mapped[bytes] = mapped_column(LargeBinary())

    __table_args__ = (Index("ix_log_tree_head_size", "tree_size", "timestamp_ms"),)


class AuthorityJournalRow(Base):
    """One of the CA's own roots or intermediates and its lifecycle state.

    Certificates only: private keys stay in their key manager (files 0600 in the data
    directory, or Vault), named by ``key_ref``.
    """

    __tablename__ = "authority_journal"

    id: Mapped[str] = mapped_column(String(), primary_key=True)
    kind: Mapped[str] = mapped_column(String())
    state: Mapped[str] = mapped_column(String())
    source: Mapped[str] = mapped_column(String())
    parent_id: Mapped[str | None] = mapped_column(String())
    key_ref: Mapped[str | None] = mapped_column(String())
    certificate_pem: Mapped[str] = mapped_column(Text())
    chain_pem: Mapped[str] = mapped_column(Text())
    fingerprint_sha256: Mapped[str] = mapped_column(String())
    not_before: Mapped[datetime] = mapped_column(UtcDateTime())
    not_after: Mapped[datetime] = mapped_column(UtcDateTime())
    prepared_at: Mapped[datetime] = mapped_column(UtcDateTime())
    activated_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    retired_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    removed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    #: ``meshca ca taint``: when it was marked compromised (its log record says why).
    tainted_at: Mapped[datetime | None] = mapped_column(UtcDateTime())

    __table_args__ = (
        Index("ix_authority_journal_state", "state"),
        # Fencing below the locks: two leaders (a lock lost with its connection) can
        # never both prepare a root; the second insert fails and its step is retried.
        Index(
            "ux_authority_journal_one_prepared_root",
            "kind",
            unique=True,
            sqlite_where=text("kind = 'root' AND state = 'prepared'"),
            postgresql_where=text("kind = 'root' AND state = 'prepared'"),
        ),
    )


class SealedKeyRow(Base):
    """A private key sealed (AES-256-GCM) under the key-encryption key every replica has.

    The database alone never reveals a key; ``kek_id`` names the key-encryption key so a
    replica given another one says so instead of failing to decrypt. The public key is
    kept in clear for readers without the key-encryption key (``meshca audit verify``).
    """

    __tablename__ = "sealed_key"

    ref: Mapped[str] = mapped_column(String(), primary_key=True)
    kek_id: Mapped[str] = mapped_column(String())
    nonce: Mapped[bytes] = mapped_column(LargeBinary())
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary())
    public_key_der: Mapped[bytes] = mapped_column(LargeBinary())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class DecisionRecordRow(Base):
    """One authorization decision (``core.policy.DecisionRecord``): who asked for what,
    the outcome, and the policy, rule and policy-set version that decided.

    Allowed decisions are sampled (``decision_sample_rate``); denied ones are all kept.
    ``headers`` is a JSON object of only the headers some policy refers to, never
    credentials; ``audit`` lists the AUDIT policies that matched, comma-separated.
    """

    __tablename__ = "decision_record"

    id: Mapped[int] = mapped_column(_RecordId, primary_key=True, autoincrement=True)
    time: Mapped[datetime] = mapped_column(UtcDateTime())
    api: Mapped[str] = mapped_column(String())
    allowed: Mapped[bool] = mapped_column(Boolean())
    reason: Mapped[str] = mapped_column(String())
    version: Mapped[str] = mapped_column(String())
    policy: Mapped[str | None] = mapped_column(String())
    rule: Mapped[int | None] = mapped_column(Integer())
    source_principal: Mapped[str | None] = mapped_column(String())
    destination_principal: Mapped[str | None] = mapped_column(String())
    method: Mapped[str] = mapped_column(String())
    path: Mapped[str] = mapped_column(Text())
    host: Mapped[str] = mapped_column(String())
    headers: Mapped[str] = mapped_column(Text())
    source_ip: Mapped[str | None] = mapped_column(String())
    destination_ip: Mapped[str | None] = mapped_column(String())
    destination_port: Mapped[int | None] = mapped_column(Integer())
    sni: Mapped[str | None] = mapped_column(String())
    request_id: Mapped[str | None] = mapped_column(String())
    audit: Mapped[str] = mapped_column(Text())
    detail: Mapped[str] = mapped_column(Text())

    __table_args__ = (
        Index("ix_decision_record_time", "time", "id"),
        Index("ix_decision_record_destination_time", "destination_principal", "time"),
        Index("ix_decision_record_policy_time", "policy", "time"),
        Index("ix_decision_record_allowed_time", "allowed", "time"),
    )


class DenyEntryRow(Base):
    """A deny-list entry (``core.denylist.DenyEntry``), added by ``meshca revoke``.

    Each add and lift is also a record of the issuance log; ``leaf_index`` is the add's.
    ``revision`` is the leaf index of the latest record about this entry, so the largest
    ``revision`` changes with every add and lift: servers poll it to reload the list.
    """

    __tablename__ = "deny_entry"

    id: Mapped[int] = mapped_column(_RecordId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String())
    value: Mapped[str] = mapped_column(String())
    reason: Mapped[str] = mapped_column(Text())
    requested_by: Mapped[str] = mapped_column(String())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    lifted_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    lifted_by: Mapped[str | None] = mapped_column(String())
    leaf_index: Mapped[int | None] = mapped_column(BigInteger())
    revision: Mapped[int] = mapped_column(BigInteger())

    __table_args__ = (Index("ix_deny_entry_revision", "revision"),)


def create_schema(engine: Engine) -> None:
    """Create every table and index that does not exist yet; existing ones are untouched.

    Several processes may call it at once on a new database. Raises
    ``BackendUnavailable`` if the schema cannot be created.
    """
    # create_all checks, then creates: another process may create a table in between.
    # Each retry sees at least one more table; a real failure fails every time.
    attempts = len(Base.metadata.tables) + 1
    for attempt in range(attempts):
        try:
            Base.metadata.create_all(engine)
            return
        except DBAPIError as error:
            if attempt == attempts - 1:
                raise BackendUnavailable(
                    f"cannot create the schema in {redacted_url(engine.url)}: "
                    f"{error_summary(error)}"
                ) from error
