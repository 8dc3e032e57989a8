"""``meshca db``: the database schema (alembic migrations shipped with meshca)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from meshca.adapters.storage.engine import make_engine, sqlite_url_for
from meshca.adapters.storage.migrate import SchemaUnknown, schema_state, upgrade
from meshca.config import load_settings

__all__ = ["database_url_of", "register"]


def database_url_of(args: argparse.Namespace) -> str:
    """``--database-url`` (or ``MESHCA_DATABASE_URL``), else the SQLite file in
    ``--data-dir`` (or ``MESHCA_DATA_DIR``), as ``meshca serve`` would find them; the
    environment keeps a password out of the process's arguments."""
    settings = load_settings({"database_url": args.database_url, "data_dir": args.data_dir})
    if settings.database_url:
        return settings.database_url
    return sqlite_url_for(settings.data_dir.resolve())


def _upgrade(args: argparse.Namespace) -> int:
    engine = make_engine(database_url_of(args))
    try:
        before, after = upgrade(engine)
    except SchemaUnknown as error:
        print(f"meshca: {error}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    if before.current == after.current:
        print(f"schema already at revision {after.current}")
    else:
        print(f"schema upgraded from revision {before.current or '(empty)'} to {after.current}")
    return 0


def _status(args: argparse.Namespace) -> int:
    engine = make_engine(database_url_of(args))
    try:
        state = schema_state(engine)
    finally:
        engine.dispose()
    status = "up to date" if state.up_to_date else "needs 'meshca db upgrade'"
    print(f"revision {state.current or '(none)'}; this meshca: {state.head}; {status}")
    return 0 if state.up_to_date else 1


def add_database_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", help="meshca's data directory (MESHCA_DATA_DIR; default ./meshca-data)"
    )
    parser.add_argument(
        "--database-url",
        help="SQLAlchemy URL, instead of --data-dir's SQLite (MESHCA_DATABASE_URL)",
    )


def register(commands: Any) -> None:
    parser = commands.add_parser("db", help="manage the database schema")
    sub = parser.add_subparsers(dest="db_command", metavar="COMMAND", required=True)
    up = sub.add_parser(
        "upgrade",
        help="apply every schema migration this meshca ships",
        description="Bring the database's schema to this meshca's revision (back it up first).",
    )
    add_database_flags(up)
    up.set_defaults(run=_upgrade)
    status = sub.add_parser("status", help="show the schema revision (exit 1 if not current)")
    add_database_flags(status)
    status.set_defaults(run=_status)
