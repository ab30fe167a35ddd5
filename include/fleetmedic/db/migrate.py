"""Ordered ops-database schema migrations (`NNNN_name.sql`), applied once each and recorded in `schema_migrations`."""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg
from psycopg.rows import tuple_row

from fleetmedic.db.connect import connect, redact_dsn

__all__ = [
    "MIGRATIONS_DIR",
    "Migration",
    "MigrationError",
    "MigrationStatus",
    "discover",
    "migrate",
    "status",
]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Session-level advisory lock key ("fleetmed" in ASCII) serialising concurrent migrate() calls.
MIGRATE_LOCK_KEY = 0x666C6565746D6564

_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9][a-z0-9_]*)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """A migration could not be found, checked or applied; the message names the file and what to do."""


@dataclass(frozen=True)
class Migration:
    """One migration file: `0001_initial.sql` is version 1, name `0001_initial`."""

    version: int
    name: str
    path: Path
    checksum: str

    def sql(self) -> bytes:
        return self.path.read_bytes()


@dataclass(frozen=True)
class MigrationStatus:
    """Where one migration stands in one database.

    state: `applied`, `pending`, `changed` (the file differs from what was applied) or
    `missing` (applied in the database, but no such file here: this code is older than the database).
    """

    version: int
    name: str
    state: str
    applied_at: datetime | None = None


def discover(migrations_dir: Path | str | None = None) -> list[Migration]:
    """The migration files in `migrations_dir`, in version order; other files than `*.sql` are ignored."""
    directory = Path(migrations_dir) if migrations_dir is not None else MIGRATIONS_DIR
    if not directory.is_dir():
        raise MigrationError(f"migrations directory {directory} does not exist")
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(
                f"{path}: migration files must be named NNNN_name.sql (four digits, lowercase name), "
                "e.g. 0002_add_breaker_index.sql; rename it"
            )
        version = int(match["version"])
        if version in found:
            raise MigrationError(
                f"{path} and {found[version].path.name} share version {match['version']}; "
                "give the newer one the next free number"
            )
        found[version] = Migration(
            version=version,
            name=path.stem,
            path=path,
            checksum=hashlib.sha256(path.read_bytes()).hexdigest(),
        )
    return [found[v] for v in sorted(found)]


def migrate(
    dsn: str,
    *,
    migrations_dir: Path | str | None = None,
    lock_timeout: float = 120.0,
) -> list[str]:
    """Apply the pending migrations in order and return their names (empty when already up to date).

    Each migration runs in its own transaction together with its `schema_migrations` row, so a failing
    one raises `MigrationError` (naming the file and the database error) and leaves the database at
    the previous version. A session advisory lock makes concurrent calls safe: the second waits, then
    finds nothing left to do. A migration changed after it was applied is an error, not re-applied.
    """
    migrations = discover(migrations_dir)
    applied_names: list[str] = []
    with connect(dsn, autocommit=True, row_factory=tuple_row, application_name="fleetmedic-migrate") as conn:
        _acquire_lock(conn, dsn, lock_timeout)
        try:
            conn.execute(_CREATE_TABLE)
            applied = _applied(conn)
            _check_history(migrations, applied, migrations_dir)
            current = max(applied, default=0)
            for migration in migrations:
                if migration.version in applied:
                    continue
                _apply_one(conn, migration, current)
                current = migration.version
                applied_names.append(migration.name)
        finally:
            if not conn.closed and not conn.broken:
                conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK_KEY,))
    return applied_names


def status(dsn: str, *, migrations_dir: Path | str | None = None) -> list[MigrationStatus]:
    """Every migration known to the files or the database, with its state, in version order."""
    migrations = {m.version: m for m in discover(migrations_dir)}
    with connect(dsn, autocommit=True, row_factory=tuple_row) as conn:
        row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
        applied = _applied(conn) if row and row[0] else {}
    result: list[MigrationStatus] = []
    for version in sorted(set(migrations) | set(applied)):
        file = migrations.get(version)
        if version not in applied:
            assert file is not None
            result.append(MigrationStatus(version, file.name, "pending"))
            continue
        name, checksum, applied_at = applied[version]
        if file is None:
            result.append(MigrationStatus(version, name, "missing", applied_at))
        elif file.checksum != checksum:
            result.append(MigrationStatus(version, file.name, "changed", applied_at))
        else:
            result.append(MigrationStatus(version, file.name, "applied", applied_at))
    return result


def _acquire_lock(conn: psycopg.Connection[tuple], dsn: str, lock_timeout: float) -> None:
    deadline = time.monotonic() + lock_timeout
    while True:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (MIGRATE_LOCK_KEY,)).fetchone()
        if row and row[0]:
            return
        if time.monotonic() >= deadline:
            raise MigrationError(
                f"another migrate is still running on {redact_dsn(dsn)} after {lock_timeout:.0f}s "
                f"(advisory lock {MIGRATE_LOCK_KEY}); wait for it, or find it in pg_stat_activity "
                "(application_name fleetmedic-migrate)"
            )
        time.sleep(0.1)


def _applied(conn: psycopg.Connection[tuple]) -> dict[int, tuple[str, str, datetime]]:
    rows = conn.execute("SELECT version, name, checksum, applied_at FROM schema_migrations").fetchall()
    return {int(r[0]): (r[1], r[2], r[3]) for r in rows}


def _check_history(
    migrations: list[Migration],
    applied: dict[int, tuple[str, str, datetime]],
    migrations_dir: Path | str | None,
) -> None:
    by_version = {m.version: m for m in migrations}
    for version, (name, checksum, _at) in sorted(applied.items()):
        file = by_version.get(version)
        if file is None:
            raise MigrationError(
                f"the database has migration {name} applied, but {migrations_dir or MIGRATIONS_DIR} has no "
                f"file with version {version:04d}: this fleetmedic is older than the database; upgrade it"
            )
        if file.checksum != checksum:
            raise MigrationError(
                f"{file.path}: changed after it was applied to this database (checksum {checksum[:12]} "
                f"applied, {file.checksum[:12]} now); applied migrations are append-only: revert the edit "
                "and put the change in a new migration file (or recreate a throwaway dev database)"
            )


def _apply_one(conn: psycopg.Connection[tuple], migration: Migration, current: int) -> None:
    sql = migration.sql()
    try:
        with conn.transaction():
            conn.execute(sql)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
    except psycopg.Error as exc:
        raise MigrationError(
            f"{migration.path}{_where(sql, exc)}: {_describe(exc)}; nothing of it was applied and the "
            f"database stays at version {current:04d}; fix the file and run migrate again"
        ) from exc


def _where(sql: bytes, exc: psycopg.Error) -> str:
    position = getattr(exc.diag, "statement_position", None)
    if not position:
        return ""
    text = sql.decode("utf-8", errors="replace")
    return f" line {text[: int(position) - 1].count(chr(10)) + 1}"


def _describe(exc: psycopg.Error) -> str:
    diag = exc.diag
    message = diag.message_primary or str(exc).splitlines()[0]
    parts = [f"{type(exc).__name__}: {message}"]
    if diag.message_detail:
        parts.append(f"detail: {diag.message_detail}")
    if diag.message_hint:
        parts.append(f"hint: {diag.message_hint}")
    return parts[0] if len(parts) == 1 else f"{parts[0]} ({'; '.join(parts[1:])})"
