"""A real PostgreSQL server for the tests, started as the postgres user.

Fixtures:

``postgres_server``
    session-wide ``PostgresServer``, started once.
``postgres_url``
    session-wide SQLAlchemy URL of that server's ``postgres`` database.
``postgres_database_url``
    a fresh, empty database on that server for one test, dropped afterwards.
``dedicated_postgres``
    a ``PostgresServer`` of the test's own, which the test may stop, crash and restart.

The clusters live in throwaway directories under the system temp dir, listen on
127.0.0.1 on a free port (plus a Unix socket inside the directory), trust every local
connection and keep ``fsync`` on, because durability is what the storage tests check.
Missing binaries fail the tests that need them; they are never skipped.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

__all__ = ["PG_BINDIR", "PostgresServer"]

PG_BINDIR = Path("/usr/lib/postgresql/15/bin")
_PREFIX = "meshca-pg-"

_CONFIG = """
listen_addresses = '127.0.0.1'
unix_socket_directories = '{socket_dir}'
fsync = on
synchronous_commit = on
full_page_writes = on
max_connections = 100
shared_buffers = 32MB
"""


class PostgresServer:
    """One throwaway PostgreSQL cluster: ``create()``, then ``start``/``stop`` at will.

    As root the binaries run as the ``postgres`` OS user (initdb refuses root);
    otherwise as the current user.
    """

    def __init__(self, base: Path, run_as: pwd.struct_passwd | None) -> None:
        self.base = base
        self.data = base / "data"
        self.port = 0
        self._run_as = run_as

    @classmethod
    def create(cls) -> PostgresServer:
        """Run initdb in a new temp directory. Fails the test if it cannot."""
        missing = [name for name in ("initdb", "pg_ctl") if not (PG_BINDIR / name).is_file()]
        if missing:
            pytest.fail(
                f"PostgreSQL 15 binaries {missing} not found in {PG_BINDIR}; "
                "install postgresql-15 (these tests are never skipped)",
                pytrace=False,
            )
        run_as = None
        if os.geteuid() == 0:
            try:
                run_as = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("running as root, but there is no 'postgres' user for initdb")
        _reap_orphans(run_as)
        # Not tmp_path: pytest's directories are 0700 root, closed to the postgres user.
        base = Path(tempfile.mkdtemp(prefix=_PREFIX))
        (base / "owner.pid").write_text(str(os.getpid()))
        server = cls(base, run_as)
        if run_as is not None:
            os.chown(base, run_as.pw_uid, run_as.pw_gid)
        # --no-sync only skips initdb's own flush of the template files; the server runs
        # with fsync on, so every commit the tests make is really synced.
        server._run(
            "initdb",
            "-D",
            str(server.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        with (server.data / "postgresql.conf").open("a") as conf:
            conf.write(_CONFIG.format(socket_dir=base))
        return server

    def start(self) -> None:
        """Start on the same port as before, or on a free one the first time."""
        attempts = 1 if self.port else 3
        for attempt in range(attempts):
            port = self.port or _free_port()
            try:
                self._run(
                    "pg_ctl",
                    "start",
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.base / "server.log"),
                    "-w",
                    "-t",
                    "20",
                    "-o",
                    f"-p {port}",
                )
            except subprocess.CalledProcessError:
                # Another process may have taken the free port before the server bound it.
                if attempt == attempts - 1:
                    pytest.fail(f"PostgreSQL did not start:\n{self.log_tail()}", pytrace=False)
                continue
            self.port = port
            return

    def stop(self, *, crash: bool = False) -> None:
        """Stop the server; ``crash=True`` kills it without a checkpoint, as a power cut
        would (mode ``immediate``: the next start replays the WAL)."""
        mode = "immediate" if crash else "fast"
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "20")

    def destroy(self) -> None:
        """Stop (if running) and delete the cluster."""
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop(crash=True)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database`` over TCP."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def admin_connection(self) -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit connection to the ``postgres`` database, for DDL in fixtures."""
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.base / "server.log").read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def _run(self, program: str, *args: str, check: bool = True) -> None:
        run_as = self._run_as
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        try:
            subprocess.run(
                [str(PG_BINDIR / program), *args],
                check=check,
                cwd=self.base,  # the postgres user may not be allowed into our cwd
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=60,
                user=None if run_as is None else run_as.pw_uid,
                group=None if run_as is None else run_as.pw_gid,
                extra_groups=None if run_as is None else [],
            )
        except subprocess.CalledProcessError as error:
            if program == "pg_ctl" and args[0] == "start":
                raise
            pytest.fail(
                f"{program} failed ({error.returncode}):\n{error.stdout.decode(errors='replace')}",
                pytrace=False,
            )


def _reap_orphans(run_as: pwd.struct_passwd | None) -> None:
    """Stop and delete clusters left by test runs that were killed before teardown.

    Only directories whose recorded owner process no longer exists are touched, so
    concurrent test runs keep their servers.
    """
    for base in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*"):
        try:
            owner = int((base / "owner.pid").read_text())
            os.kill(owner, 0)
            continue  # its owner is alive
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue  # not one of ours, or being created right now
        orphan = PostgresServer(base, run_as)
        if (orphan.data / "postmaster.pid").exists():
            orphan._run("pg_ctl", "stop", "-D", str(orphan.data), "-m", "immediate", check=False)
        shutil.rmtree(base, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _started_server() -> PostgresServer:
    server = PostgresServer.create()
    try:
        server.start()
    except BaseException:
        server.destroy()
        raise
    return server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The PostgreSQL server shared by the whole session."""
    server = _started_server()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """``postgresql+psycopg://postgres@127.0.0.1:<port>/postgres`` on the shared server."""
    return postgres_server.url()


@pytest.fixture
def postgres_database_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A new empty database for one test; dropped (connections and all) afterwards."""
    name = f"test_{secrets.token_hex(6)}"
    with postgres_server.admin_connection() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield postgres_server.url(name)
    finally:
        with postgres_server.admin_connection() as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def dedicated_postgres() -> Iterator[PostgresServer]:
    """A started server of the test's own, to stop, crash and restart."""
    server = _started_server()
    try:
        yield server
    finally:
        server.destroy()
