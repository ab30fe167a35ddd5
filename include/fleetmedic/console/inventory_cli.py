"""`fleetmedic fleet import` and `fleetmedic fleet discover`: the inventory beyond the demo fleet.

These commands join the `fleet` group: this module adds them to fleet_cli's typer app and
re-exports it, and console/cli.py mounts this module's `app` as `fleet`.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from fleetmedic.console.common import DsnOption, JsonOption, console, err, fail, ops_dsn, print_json
from fleetmedic.console.fleet_cli import app

__all__ = ["app"]


@app.command("import")
def fleet_import(
    path: Path = typer.Argument(..., help="a .csv or .yaml inventory file (see fleetmedic/inventory_io.py)"),
    dsn: str | None = DsnOption,
    as_json: bool = JsonOption,
) -> None:
    """Import servers and resources from a CSV or YAML file: all of it, or nothing and every problem."""
    from fleetmedic.inventory_io import InventoryFileError, import_inventory

    if not path.exists():
        fail(f"{path} does not exist", 2)
    try:
        summary = import_inventory(ops_dsn(dsn), path)
    except InventoryFileError as exc:
        for line in str(exc).splitlines():
            err.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)  # one problem, one line
        err.print(f"nothing was imported ({len(exc.problems)} problem(s)); fix the file and run it again",
                  highlight=False)
        raise typer.Exit(1) from None
    if as_json:
        print_json(vars(summary))
        return
    console.print(summary.line(), highlight=False)


@app.command("discover")
def fleet_discover(
    provider: str = typer.Argument(..., help="where to look: aws"),
    region: str | None = typer.Option(None, help="AWS region (default: AWS_DEFAULT_REGION or the profile's)"),
    tag: str = typer.Option("fleetmedic=managed", help="only what carries this tag, KEY=VALUE"),
    endpoint_url: str | None = typer.Option(None, help="another endpoint than AWS (e.g. a moto server)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="show what would be registered, write nothing"),
    dsn: str | None = DsnOption,
    as_json: bool = JsonOption,
) -> None:
    """Register EC2 instances (servers), RDS PostgreSQL and ElastiCache Redis that carry a tag."""
    import psycopg

    from fleetmedic.cloud import ProviderError
    from fleetmedic.inventory_io import InventoryFileError, apply_plan, discover_aws

    if provider != "aws":
        fail(f"cannot discover in {provider!r}: discovery knows aws only", 2)
    key, sep, value = tag.partition("=")
    if not sep or not key:
        fail(f"--tag {tag!r} is not KEY=VALUE", 2)
    try:
        found = discover_aws(tag=(key, value), region=region, endpoint_url=endpoint_url)
    except ProviderError as exc:
        fail(str(exc))
    except Exception as exc:  # botocore's credential and endpoint errors: say what failed, no traceback
        fail(f"AWS discovery failed: {type(exc).__name__}: {exc}")
    plan = found.plan
    rows = ([{"kind": "server", "name": s.name, "role": "", "address": s.address, "found": s.where}
             for s in plan.servers]
            + [{"kind": r.kind, "name": r.name, "role": r.role, "address": f"{r.host}:{r.port}", "found": r.where}
               for r in plan.resources])
    summary = None
    if not dry_run:
        try:
            with psycopg.connect(ops_dsn(dsn)) as conn:
                summary = apply_plan(conn, plan)
        except InventoryFileError as exc:
            fail(f"nothing was registered:\n{exc}")
    if as_json:
        print_json({"found": rows, "skipped": found.skipped, "dry_run": dry_run,
                    "summary": vars(summary) if summary else None})
        return
    table = Table("kind", "name", "role", "address", "found as")
    for row in rows:
        table.add_row(*(str(row[k] or "") for k in ("kind", "name", "role", "address", "found")))
    console.print(table)
    for line in found.skipped:
        console.print(f"skipped {line}", highlight=False)
    console.print(summary.line() if summary else f"dry run: {len(rows)} entries would be registered",
                  highlight=False)
