"""`fleetmedic pages`: the pager outbox."""

from __future__ import annotations

import typer
from rich.table import Table

from fleetmedic.console.common import DsnOption, JsonOption, console, ops_dsn, print_json

app = typer.Typer(help="The pager outbox.", no_args_is_help=True)


@app.command("list")
def pages_list(dsn: str | None = DsnOption, as_json: bool = JsonOption,
               limit: int = typer.Option(50, help="at most this many")) -> None:
    """Pages in the outbox, newest first."""
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(ops_dsn(dsn), row_factory=dict_row) as conn:
        rows = conn.execute(
            "SELECT id, incident_id, dedup_key, action, status, attempts, summary, created_at, delivered_at "
            "FROM pages ORDER BY id DESC LIMIT %s", (limit,)
        ).fetchall()
    if as_json:
        print_json(rows)
        return
    table = Table("id", "incident", "action", "status", "attempts", "summary")
    for r in rows:
        table.add_row(str(r["id"]), str(r["incident_id"] or ""), r["action"], r["status"], str(r["attempts"]),
                      r["summary"][:90])
    console.print(table)
