"""SQL storage adapters (SQLAlchemy 2.0, SQLite or PostgreSQL via psycopg 3)."""

from __future__ import annotations

from meshca.adapters.storage.audit_log import SqlAuditLog
from meshca.adapters.storage.engine import make_engine, sqlite_url_for
from meshca.adapters.storage.tables import create_schema

__all__ = ["SqlAuditLog", "create_schema", "make_engine", "sqlite_url_for"]
