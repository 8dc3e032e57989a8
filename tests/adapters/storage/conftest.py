"""Storage fixtures: a migrated database on SQLite and on PostgreSQL (log_fixtures.py)."""

from tests.adapters.storage.log_fixtures import database_url, engine

__all__ = ["database_url", "engine"]
