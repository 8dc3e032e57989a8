"""The SQL schema: typed declarative tables and ``create_schema``.

Timestamps are always timezone-aware UTC on the Python side. PostgreSQL stores them as
``timestamptz``; SQLite has no time zone type, so they are stored there as naive UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, DateTime, Engine, Index, Integer, String, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from meshca.adapters.storage.engine import error_summary, redacted_url
from meshca.core.errors import BackendUnavailable

__all__ = ["Base", "IssuanceRecordRow", "UtcDateTime", "create_schema"]


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


class IssuanceRecordRow(Base):
    """One row per certificate issued and per request refused (see ``AuditRecord``).

    Text columns have no length limit on purpose: a value the database refuses would
    withhold a certificate or lose a refusal record.
    """

    __tablename__ = "issuance_record"

    id: Mapped[int] = mapped_column(_RecordId, primary_key=True, autoincrement=True)
    time: Mapped[datetime] = mapped_column(UtcDateTime())
    outcome: Mapped[str] = mapped_column(String())
    api: Mapped[str] = mapped_column(String())
    reason: Mapped[str] = mapped_column(String())
    detail: Mapped[str] = mapped_column(Text())
    spiffe_id: Mapped[str | None] = mapped_column(String())
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

    __table_args__ = (
        Index("ix_issuance_record_spiffe_id_time", "spiffe_id", "time"),
        Index("ix_issuance_record_serial", "serial"),
        Index("ix_issuance_record_time", "time"),
        Index("ix_issuance_record_outcome", "outcome"),
    )


def create_schema(engine: Engine) -> None:
    """Create every table and index that does not exist yet; existing ones are untouched.

    Several processes may call it at once on a new database. Raises
    ``BackendUnavailable`` if the schema cannot be created.
    """
    try:
        try:
            Base.metadata.create_all(engine)
        except DBAPIError:
            # create_all checks, then creates: another process may have created the table
            # in between. The second pass sees it; a real failure fails again.
            Base.metadata.create_all(engine)
    except DBAPIError as error:
        raise BackendUnavailable(
            f"cannot create the schema in {redacted_url(engine.url)}: {error_summary(error)}"
        ) from error
