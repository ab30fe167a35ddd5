"""`fleetmedic db`: ops database schema migrations."""

from __future__ import annotations

import typer

from fleetmedic.console.common import DsnOption, JsonOption, console, fail, ops_dsn, print_json

app = typer.Typer(help="The ops database: schema migrations.", no_args_is_help=True)


@app.command("migrate")
def db_migrate(dsn: str | None = DsnOption) -> None:
    """Apply pending schema migrations (idempotent)."""
    from fleetmedic.db.migrate import MigrationError, migrate

    try:
        applied = migrate(ops_dsn(dsn))
    except MigrationError as exc:
        fail(str(exc))
    console.print(f"applied: {', '.join(applied)}" if applied else "schema up to date")


@app.command("status")
def db_status(dsn: str | None = DsnOption, as_json: bool = JsonOption) -> None:
    """List applied and pending migrations."""
    from fleetmedic.db.migrate import status

    rows = status(ops_dsn(dsn))
    if as_json:
        print_json(rows)
        return
    console.print(rows)


