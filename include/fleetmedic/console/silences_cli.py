"""`fleetmedic silences`: keep automation and new incidents off a resource until a time (audited)."""

from __future__ import annotations

import typer
from rich.table import Table

from fleetmedic.console.common import DsnOption, JsonOption, console, fail, ops_dsn, print_json

app = typer.Typer(help="Silences and maintenance windows: no new incidents, no automation, until they end.",
                  no_args_is_help=True)


def _actor() -> str:
    from fleetmedic.safety.overrides import OverrideError, human_actor

    try:
        return human_actor()
    except OverrideError as exc:
        fail(str(exc))


@app.command("add")
def silences_add(
    resource: str = typer.Option(..., "--resource", help="resource name or id ('*': every resource)"),
    type_: str | None = typer.Option(None, "--type", help="only this incident type (default: every type)"),
    for_: str = typer.Option(..., "--for", help="how long, e.g. 30m, 2h, 1d"),
    reason: str = typer.Option(..., "--reason", "-r", help="why (recorded with your name)"),
    dsn: str | None = DsnOption,
    as_json: bool = JsonOption,
) -> None:
    """Silence a resource (or one incident type on it) for a while."""
    from fleetmedic.playbooks.schema import parse_duration
    from fleetmedic.safety.silences import SilenceError, add_silence

    try:
        duration = parse_duration(for_)
    except ValueError as exc:
        fail(f"--for: {exc}", 2)
    try:
        silence = add_silence(ops_dsn(dsn), resource=resource, incident_type=type_, duration=duration,
                              reason=reason, created_by=_actor())
    except SilenceError as exc:
        fail(str(exc), 2)
    if as_json:
        print_json(silence.as_dict())
        return
    console.print(f"added {silence.describe()}", highlight=False)


@app.command("list")
def silences_list(all_: bool = typer.Option(False, "--all", help="also expired and removed ones"),
                  dsn: str | None = DsnOption, as_json: bool = JsonOption) -> None:
    """Silences in force (newest first)."""
    from fleetmedic.safety.silences import list_silences

    rows = list_silences(ops_dsn(dsn), include_inactive=all_)
    if as_json:
        print_json([s.as_dict() for s in rows])
        return
    table = Table("id", "resource", "type", "until", "by", "active", "reason")
    for s in rows:
        table.add_row(str(s.id), s.resource_name or "*", s.type or "*", f"{s.ends_at:%m-%d %H:%M:%S}", s.created_by,
                      "yes" if s.active else ("removed" if s.removed_at else "no"), s.reason[:70])
    console.print(table)


@app.command("remove")
def silences_remove(silence_id: int, reason: str = typer.Option(..., "--reason", "-r", help="why lift it early"),
                    dsn: str | None = DsnOption, as_json: bool = JsonOption) -> None:
    """Lift a silence now; incidents it held go back to open and the sweep starts their runs."""
    from fleetmedic.safety.silences import SilenceError, remove_silence

    try:
        silence, released = remove_silence(ops_dsn(dsn), silence_id, actor=_actor(), reason=reason)
    except SilenceError as exc:
        fail(str(exc))
    if as_json:
        print_json({"silence": silence.as_dict(), "released": released})
        return
    console.print(f"removed silence {silence.id}" + (f"; released incident(s) {', '.join(map(str, released))}"
                                                     if released else ""), highlight=False)
