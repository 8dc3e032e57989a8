"""Engines for the issuance record: SQLite (one file, several processes) or PostgreSQL.

Both are configured for durability first: a commit that returns is on disk.
"""

from __future__ import annotations

import fcntl
import os
import socket
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Engine, create_engine, event, make_url, text
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from meshca.core.errors import BackendUnavailable

__all__ = [
    "error_summary",
    "make_engine",
    "ping",
    "redacted_url",
    "sqlite_url_for",
    "write_gate",
]

_PSYCOPG = "postgresql+psycopg"


def sqlite_url_for(data_dir: Path) -> str:
    """The URL of the SQLite database in ``data_dir``: ``sqlite:///<data_dir>/meshca.db``."""
    return f"sqlite:///{data_dir / 'meshca.db'}"


def make_engine(url: str, *, busy_timeout: float = 5.0, connect_timeout: float = 5.0) -> Engine:
    """Open the database at ``url`` and check that it answers.

    ``sqlite:///path`` creates the parent directory and uses WAL with
    ``synchronous=FULL``; a writer waits up to ``busy_timeout`` seconds for another
    process's lock. ``postgresql://``, ``postgres://`` and ``postgresql+psycopg://`` all
    use psycopg 3; connecting gives up after ``connect_timeout`` seconds.

    Raises ``ValueError`` for a URL that is not a supported, durable database (including
    in-memory SQLite) and ``BackendUnavailable`` when the database cannot be opened. No
    message carries the password.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        # The text may hold a password, so it is not quoted back.
        raise ValueError("not a database URL; expected sqlite:///... or postgresql://...") from None
    match parsed.drivername:
        case "sqlite" | "sqlite+pysqlite":
            engine = _sqlite_engine(parsed, busy_timeout)
        case "postgres" | "postgresql" | "postgresql+psycopg":
            engine = _postgres_engine(parsed.set(drivername=_PSYCOPG), connect_timeout)
        case other:
            raise ValueError(f"unsupported database driver {other!r}; use sqlite or postgresql")
    try:
        with engine.connect():
            pass
    except DBAPIError as error:
        engine.dispose()
        raise BackendUnavailable(
            f"cannot open database {redacted_url(engine.url)}: "
            f"{error_summary(error, secret=engine.url.password)}"
        ) from error
    return engine


def ping(engine: Engine) -> None:
    """One round trip (``SELECT 1``) through ``engine``'s pool. Blocking.

    Raises ``BackendUnavailable``, without the password, when the database does not answer.
    """
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        raise BackendUnavailable(error_summary(error, secret=engine.url.password)) from error


def redacted_url(url: URL) -> str:
    """``url`` as text with the password masked, for messages and logs."""
    return url.render_as_string(hide_password=True)


def error_summary(error: BaseException, *, secret: str | None = None) -> str:
    """One line naming the driver's error, without SQL parameters or ``secret``.

    SQLAlchemy's own message appends the statement and its parameters; the driver's first
    line is what an operator needs.
    """
    cause: BaseException = error
    if isinstance(error, DBAPIError) and isinstance(error.orig, BaseException):
        cause = error.orig
    lines = str(cause).strip().splitlines()
    text = f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
    if secret:
        text = text.replace(secret, "***")
    return text


def _sqlite_engine(url: URL, busy_timeout: float) -> Engine:
    database = url.database
    if not database or database == ":memory:" or url.query.get("mode") == "memory":
        # Each pooled connection would see its own empty database, and nothing is durable.
        raise ValueError("in-memory SQLite cannot hold the issuance record; give a file path")
    path = Path(database)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BackendUnavailable(
            f"cannot create the directory for {path}: {error.strerror or error}"
        ) from error
    # pysqlite's ``timeout`` is SQLite's busy timeout: how long a writer waits while
    # another process holds the write lock before failing with "database is locked".
    engine = create_engine(url, connect_args={"timeout": busy_timeout})
    event.listen(engine, "connect", _sqlite_on_connect)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # WAL lets readers in other processes run while one process commits; FULL syncs
        # the WAL on every commit, so a returned commit survives a power cut.
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
    finally:
        cursor.close()


def _postgres_engine(url: URL, connect_timeout: float) -> Engine:
    # libpq takes whole seconds; below 2 it silently uses 2.
    connect_args: dict[str, object] = {"connect_timeout": max(2, round(connect_timeout))}
    if "application_name" not in url.query:
        # pg_stat_activity (and so pg_locks) then says which host and process holds
        # the leader lock or a step lock.
        connect_args["application_name"] = f"meshca {socket.gethostname()}:{os.getpid()}"[:63]
    try:
        return create_engine(
            url,
            connect_args=connect_args,
            # After a server restart the pooled connections are dead; test each one on
            # checkout so the first batch after recovery does not fail needlessly.
            pool_pre_ping=True,
        )
    except ModuleNotFoundError as error:
        raise BackendUnavailable("PostgreSQL needs psycopg 3: install meshca[postgres]") from error


class _FileGate:
    """Serialises writers across processes with ``flock`` on a file beside the database.

    SQLite's own busy handler polls with sleeps that grow to 100 ms, so two processes
    committing at once stall each other for milliseconds; a blocked ``flock`` wakes the
    moment the holder lets go. Writers queue here and SQLite never sees them collide.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def __enter__(self) -> None:
        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_UN)


def write_gate(engine: Engine) -> AbstractContextManager[None]:
    """What a writer holds around each write transaction: a file lock for SQLite, else nothing.

    Only one thread per store writes, so the gate needs no thread lock of its own.
    """
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database:
        return _FileGate(Path(database).with_name(Path(database).name + ".write-lock"))
    return nullcontext()
