"""Ops-database migrations against real PostgreSQL: fresh apply, reruns, broken files, concurrent callers."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import errors, query, run_concurrently

from fleetmedic.db.migrate import MIGRATIONS_DIR, MigrationError, discover, migrate, status

TABLES = {"servers", "resources", "health", "incidents", "incident_events", "pages", "silences", "breaker_events"}


def tables(dsn: str) -> set[str]:
    rows = query(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r["tablename"] for r in rows}


def applied_versions(dsn: str) -> list[int]:
    return [r["version"] for r in query(dsn, "SELECT version FROM schema_migrations ORDER BY version")]


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_fresh_database_gets_every_migration_and_records_it(empty_db_dsn: str) -> None:
    applied = migrate(empty_db_dsn)

    assert applied == [m.name for m in discover()] and applied[0] == "0001_initial"
    assert TABLES | {"schema_migrations"} <= tables(empty_db_dsn)
    (row,) = query(empty_db_dsn, "SELECT version, name, checksum, applied_at FROM schema_migrations WHERE version = 1")
    assert row["name"] == "0001_initial"
    assert row["checksum"] == discover()[0].checksum and len(row["checksum"]) == 64
    assert row["applied_at"] is not None
    assert {s.state for s in status(empty_db_dsn)} == {"applied"}


def test_migrating_again_is_a_no_op(empty_db_dsn: str) -> None:
    migrate(empty_db_dsn)

    assert migrate(empty_db_dsn) == []
    assert applied_versions(empty_db_dsn) == [m.version for m in discover()]


def test_status_of_an_empty_database_lists_every_migration_as_pending(empty_db_dsn: str) -> None:
    pending = status(empty_db_dsn)

    assert [(s.name, s.state) for s in pending] == [(m.name, "pending") for m in discover()]
    assert "schema_migrations" not in tables(empty_db_dsn)  # status only reads


def test_a_broken_migration_names_its_file_and_the_database_error_and_keeps_the_previous_version(
    empty_db_dsn: str, tmp_path: Path
) -> None:
    write(tmp_path, "0001_widgets.sql", "CREATE TABLE widgets (id int PRIMARY KEY);\n")
    broken = write(
        tmp_path,
        "0002_gadgets.sql",
        "CREATE TABLE gadgets (id int PRIMARY KEY);\nINSERT INTO gadgets SELECT id FROM no_such_table;\n",
    )
    write(tmp_path, "0003_gizmos.sql", "CREATE TABLE gizmos (id int);\n")

    with pytest.raises(MigrationError) as caught:
        migrate(empty_db_dsn, migrations_dir=tmp_path)

    message = str(caught.value)
    assert str(broken) in message
    assert "line 2" in message
    assert 'relation "no_such_table" does not exist' in message
    assert "stays at version 0001" in message
    assert applied_versions(empty_db_dsn) == [1]
    assert "widgets" in tables(empty_db_dsn)
    assert not {"gadgets", "gizmos"} & tables(empty_db_dsn)  # the broken one rolled back, later ones not tried
    assert [s.state for s in status(empty_db_dsn, migrations_dir=tmp_path)] == ["applied", "pending", "pending"]

    # Fixing the file lets the next run carry on from where it stopped.
    broken.write_text("CREATE TABLE gadgets (id int PRIMARY KEY);\n")
    assert migrate(empty_db_dsn, migrations_dir=tmp_path) == ["0002_gadgets", "0003_gizmos"]
    assert applied_versions(empty_db_dsn) == [1, 2, 3]


def test_concurrent_migrate_calls_apply_each_migration_exactly_once(empty_db_dsn: str) -> None:
    results = run_concurrently(6, lambda _i: migrate(empty_db_dsn))

    assert errors(results) == []
    assert sorted(results, key=len) == [[]] * 5 + [[m.name for m in discover()]]
    assert applied_versions(empty_db_dsn) == [m.version for m in discover()]


def test_a_migration_edited_after_it_was_applied_is_refused(empty_db_dsn: str, tmp_path: Path) -> None:
    first = write(tmp_path, "0001_widgets.sql", "CREATE TABLE widgets (id int);\n")
    migrate(empty_db_dsn, migrations_dir=tmp_path)
    first.write_text("CREATE TABLE widgets (id bigint);\n")

    with pytest.raises(MigrationError, match=r"0001_widgets\.sql: changed after it was applied.*new migration"):
        migrate(empty_db_dsn, migrations_dir=tmp_path)
    assert [s.state for s in status(empty_db_dsn, migrations_dir=tmp_path)] == ["changed"]


def test_a_database_newer_than_the_code_is_refused(empty_db_dsn: str, tmp_path: Path) -> None:
    write(tmp_path, "0001_widgets.sql", "CREATE TABLE widgets (id int);\n")
    write(tmp_path, "0002_gadgets.sql", "CREATE TABLE gadgets (id int);\n")
    migrate(empty_db_dsn, migrations_dir=tmp_path)
    (tmp_path / "0002_gadgets.sql").unlink()

    with pytest.raises(MigrationError, match="has migration 0002_gadgets applied.*older than the database"):
        migrate(empty_db_dsn, migrations_dir=tmp_path)
    assert [(s.name, s.state) for s in status(empty_db_dsn, migrations_dir=tmp_path)] == [
        ("0001_widgets", "applied"),
        ("0002_gadgets", "missing"),
    ]


def test_a_badly_named_migration_file_is_refused_before_touching_the_database(
    empty_db_dsn: str, tmp_path: Path
) -> None:
    write(tmp_path, "0001_widgets.sql", "CREATE TABLE widgets (id int);\n")
    write(tmp_path, "2_gadgets.sql", "CREATE TABLE gadgets (id int);\n")
    (tmp_path / "README.md").write_text("not a migration, ignored\n")

    with pytest.raises(MigrationError, match=r"2_gadgets\.sql: migration files must be named NNNN_name\.sql"):
        migrate(empty_db_dsn, migrations_dir=tmp_path)
    assert "schema_migrations" not in tables(empty_db_dsn)


def test_two_files_with_one_version_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "0001_widgets.sql", "SELECT 1;\n")
    write(tmp_path, "0001_gadgets.sql", "SELECT 1;\n")

    with pytest.raises(MigrationError, match="share version 0001"):
        discover(tmp_path)


def test_the_packaged_migrations_directory_holds_the_initial_schema() -> None:
    assert MIGRATIONS_DIR.is_dir()
    assert discover()[0].path == MIGRATIONS_DIR / "0001_initial.sql"
