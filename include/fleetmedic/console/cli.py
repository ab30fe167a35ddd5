"""The `fleetmedic` command line: one typer app assembled from one module per command group.

Exit codes: 0 ok, 1 error, 2 usage (bad arguments, unknown names).
"""

from __future__ import annotations

import importlib
import sys

import typer

app = typer.Typer(help="fleetmedic: automatic incident resolution for PostgreSQL and Redis fleets.",
                  no_args_is_help=True, add_completion=False)

# (command group, module with a typer `app`). Add a group by adding a line here.
GROUPS = [
    ("db", "fleetmedic.console.db_cli"),
    ("demo", "fleetmedic.console.demo_cli"),
    ("fleet", "fleetmedic.console.inventory_cli"),  # fleet_cli's app plus `fleet import` / `fleet discover`
    ("chaos", "fleetmedic.console.fleet_cli:chaos_app"),
    ("incidents", "fleetmedic.console.incidents_cli"),
    ("pages", "fleetmedic.console.pages_cli"),
    ("changeover", "fleetmedic.console.changeover_cli"),
    ("breakers", "fleetmedic.console.breakers_cli"),
    ("shadow", "fleetmedic.console.breakers_cli:shadow_app"),
    ("silences", "fleetmedic.console.silences_cli"),
    ("pools", "fleetmedic.console.pools_cli"),
    ("status", "fleetmedic.console.status_cli"),
    ("report", "fleetmedic.console.report_cli"),
    ("console", "fleetmedic.console.repl"),
]

for _name, _target in GROUPS:
    _module, _, _attr = _target.partition(":")
    app.add_typer(getattr(importlib.import_module(_module), _attr or "app"), name=_name)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
