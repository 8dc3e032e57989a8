"""Schema migrations with alembic; its environment and versions ship inside the package.

``prepare_schema`` is what a server runs at start: a new, empty database gets every
migration at once (so the first run is one command), a database at the newest revision
is used as it is, and anything else is refused with the command that upgrades it.
``upgrade`` is ``meshca db upgrade``. Both hold a lock (PostgreSQL advisory lock; the
SQLite write gate), so replicas or processes starting together migrate once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import DBAPIError

from meshca.adapters.storage.engine import error_summary, redacted_url, write_gate
from meshca.adapters.storage.tables import Base
from meshca.core.errors import BackendUnavailable

__all__ = [
    "SchemaState",
    "SchemaUnknown",
    "head_revision",
    "prepare_schema",
    "schema_state",
    "upgrade",
]

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Any fixed 64-bit key: "meshca-migrate" as ASCII.
_PG_LOCK_KEY = int.from_bytes(b"mshcamig", "big") >> 1


class SchemaUnknown(Exception):
    """The database's schema is not the one this meshca uses; the message says what to run."""


@dataclass(frozen=True, slots=True)
class SchemaState:
    """``current`` is the database's revision (None if unversioned); ``head`` is ours."""

    current: str | None
    head: str
    has_tables: bool

    @property
    def empty(self) -> bool:
        return self.current is None and not self.has_tables

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


_Predicate = Callable[[SchemaState], bool]


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision this meshca knows."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def _state(connection: Connection) -> SchemaState:
    current = MigrationContext.configure(connection).get_current_revision()
    names = set(inspect(connection).get_table_names())
    return SchemaState(
        current=current,
        head=head_revision(),
        has_tables=bool(names & set(Base.metadata.tables)),
    )


def schema_state(engine: Engine) -> SchemaState:
    """Where the database's schema stands. Raises ``BackendUnavailable`` if unreadable."""
    try:
        with engine.connect() as connection:
            return _state(connection)
    except DBAPIError as error:
        raise BackendUnavailable(
            f"cannot read the schema of {redacted_url(engine.url)}: {error_summary(error)}"
        ) from error


def upgrade(engine: Engine) -> tuple[SchemaState, SchemaState]:
    """Apply every missing migration; returns the states before and after.

    Raises ``SchemaUnknown`` for a revision this meshca does not know (a newer meshca
    migrated it) or for meshca tables without a revision, and ``BackendUnavailable``
    when the database fails.
    """
    return _locked(engine, lambda state: True)


def prepare_schema(engine: Engine, upgrade_command: str) -> SchemaState:
    """Create the schema in an empty database; accept one that is up to date.

    Raises ``SchemaUnknown`` naming ``upgrade_command`` for anything else.
    """

    def allowed(state: SchemaState) -> bool:
        if state.empty:
            return True
        if state.up_to_date:
            return False
        raise SchemaUnknown(
            f"the database {redacted_url(engine.url)} is at schema revision "
            f"{state.current or '(none)'}, and this meshca needs {state.head}; "
            f"back it up, then run: {upgrade_command}"
        )

    return _locked(engine, allowed)[1]


def _locked(engine: Engine, should_upgrade: _Predicate) -> tuple[SchemaState, SchemaState]:
    try:
        with write_gate(engine), engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY}
                )
            before = _state(connection)
            _check_known(before, engine)
            if should_upgrade(before):
                command.upgrade(_config(connection), "head")
            after = _state(connection)
    except DBAPIError as error:
        raise BackendUnavailable(
            f"cannot migrate the schema of {redacted_url(engine.url)}: {error_summary(error)}"
        ) from error
    return before, after


def _check_known(state: SchemaState, engine: Engine) -> None:
    if state.current is None and state.has_tables:
        raise SchemaUnknown(
            f"the database {redacted_url(engine.url)} has meshca tables but no schema "
            "revision (made by a meshca from before migrations); move it aside and start "
            "again, or use a new database"
        )
    if state.current is not None:
        known = {s.revision for s in ScriptDirectory.from_config(_config()).walk_revisions()}
        if state.current not in known:
            raise SchemaUnknown(
                f"the database {redacted_url(engine.url)} is at schema revision "
                f"{state.current}, which this meshca does not know (a newer meshca "
                "migrated it); run that version instead"
            )
