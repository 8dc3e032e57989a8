"""The shipped migrations build exactly tables.py's schema, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, select, text

from meshca.adapters.storage import create_schema, make_engine, sqlite_url_for
from meshca.adapters.storage.migrate import (
    SchemaUnknown,
    head_revision,
    prepare_schema,
    schema_state,
    upgrade,
)
from meshca.adapters.storage.tables import Base, LogStateRow

UPGRADE = "meshca db upgrade --data-dir somewhere"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url_for(tmp_path / "data")
    url: str = request.getfixturevalue("postgres_database_url")
    return url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def test_migrated_schema_matches_the_metadata(engine: Engine) -> None:
    state = prepare_schema(engine, UPGRADE)

    assert state.up_to_date and state.current == head_revision()
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        assert compare_metadata(context, Base.metadata) == []
        # Every table of the metadata, whoever added it, is created by the migrations.
        assert set(Base.metadata.tables) <= set(inspect(connection).get_table_names())
        state_row = connection.execute(select(LogStateRow.tree_size, LogStateRow.pruned_below))
        assert state_row.all() == [(0, 0)]


def test_an_up_to_date_database_is_used_as_it_is(engine: Engine) -> None:
    prepare_schema(engine, UPGRADE)
    before, after = upgrade(engine)
    assert before == after
    assert prepare_schema(engine, UPGRADE).up_to_date


def test_an_unknown_revision_is_refused(engine: Engine) -> None:
    prepare_schema(engine, UPGRADE)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))

    with pytest.raises(SchemaUnknown, match="f00d, which this meshca does not know"):
        prepare_schema(engine, UPGRADE)
    with pytest.raises(SchemaUnknown, match="does not know"):
        upgrade(engine)


def test_an_older_revision_is_refused_with_the_upgrade_command(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshca.adapters.storage import migrate

    prepare_schema(engine, UPGRADE)
    current = head_revision()
    # As if this meshca shipped a newer revision than the database has.
    monkeypatch.setattr(migrate, "head_revision", lambda: "0099")

    with pytest.raises(SchemaUnknown) as caught:
        prepare_schema(engine, UPGRADE)
    assert f"at schema revision {current}, and this meshca needs 0099" in str(caught.value)
    assert UPGRADE in str(caught.value)


def test_unversioned_meshca_tables_are_refused(engine: Engine) -> None:
    create_schema(engine)  # as a meshca from before migrations did
    with pytest.raises(SchemaUnknown, match="no schema revision"):
        prepare_schema(engine, UPGRADE)
    assert not schema_state(engine).empty


def test_processes_starting_together_migrate_once(database_url: str) -> None:
    engines = [make_engine(database_url) for _ in range(4)]
    barrier = threading.Barrier(len(engines))
    errors: list[BaseException] = []

    def start(engine: Engine) -> None:
        barrier.wait()
        try:
            prepare_schema(engine, UPGRADE)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=start, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert errors == []
        assert schema_state(engines[0]).up_to_date
    finally:
        for engine in engines:
            engine.dispose()


def test_db_commands_read_the_url_from_the_environment(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """As `meshca serve` does: a Job passes MESHCA_DATABASE_URL, not a password argument."""
    from meshca.cli import main as meshca_main

    monkeypatch.chdir(tmp_path)  # where ./meshca-data would be, were the variable ignored
    monkeypatch.setenv("MESHCA_DATABASE_URL", database_url)
    assert meshca_main(["db", "status"]) == 1
    assert "revision (none)" in capsys.readouterr().out
    assert meshca_main(["db", "upgrade"]) == 0
    assert f"to {head_revision()}" in capsys.readouterr().out
    assert meshca_main(["db", "status"]) == 0
    engine = make_engine(database_url)
    assert schema_state(engine).up_to_date
    engine.dispose()
    assert not (tmp_path / "meshca-data").exists()
