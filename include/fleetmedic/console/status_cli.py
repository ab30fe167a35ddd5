"""`fleetmedic status`: fleet health, active incidents by state, breakers, undelivered pages, at a glance."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
import typer
from rich.table import Table
from typer.core import TyperGroup

from fleetmedic.console.common import DsnOption, JsonOption, console, fail, ops_dsn, print_json

__all__ = ["SingleCommand", "app", "age"]


class SingleCommand(TyperGroup):
    """A command group that is one command (`fleetmedic status`, `fleetmedic report NAME`): no
    sub-commands, options anywhere on the line, and a usage line without `COMMAND [ARGS]...`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allow_interspersed_args = True

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return click.Command.collect_usage_pieces(self, ctx)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        return None


app = typer.Typer(cls=SingleCommand, invoke_without_command=True, add_completion=False)


def age(when: datetime | None, now: datetime | None = None) -> str:
    """'3m', '2h 05m', '4d 03h' since `when`; '' for None."""
    if when is None:
        return ""
    seconds = int(((now or datetime.now(UTC)) - when).total_seconds())
    if seconds < 0:
        return "in the future"
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600:02d}h"


@app.callback()
def status(
    limit: int = typer.Option(10, "--limit", min=1, help="at most this many failing checks and incidents listed"),
    dsn: str | None = DsnOption,
    as_json: bool = JsonOption,
) -> None:
    """Fleet health, active incidents by state, breakers and undelivered pages.

    Exit code 0 whatever the fleet looks like (1 only when the ops database cannot be read), so
    scripts read the state from --json.
    """
    from fleetmedic.db.connect import OpsDatabaseUnavailable
    from fleetmedic.reports.status import fleet_status

    try:
        snapshot = fleet_status(ops_dsn(dsn), limit=limit)
    except OpsDatabaseUnavailable as exc:
        fail(str(exc))
    if as_json:
        print_json(snapshot)
        return
    _print(snapshot)


def _print(s: dict[str, Any]) -> None:
    now = s["at"]
    fleet, incidents, pages = s["fleet"], s["incidents"], s["pages"]
    healthy = fleet["resources"] - fleet["unhealthy"] - fleet["not_probed"] - fleet["disabled"]
    colour = "green" if fleet["unhealthy"] == 0 else "red"
    console.print(f"[bold]Fleet[/bold]: {fleet['resources']} resources, [{colour}]{fleet['unhealthy']} unhealthy"
                  f"[/{colour}], {healthy} healthy, {fleet['not_probed']} not probed yet, "
                  f"{fleet['disabled']} disabled", highlight=False)
    if fleet["by_kind"]:
        table = Table("kind", "resources", "unhealthy", "not probed", "disabled", title=None)
        for k in fleet["by_kind"]:
            table.add_row(k["kind"], str(k["resources"]), str(k["unhealthy"]), str(k["not_probed"]),
                          str(k["disabled"]))
        console.print(table)
    if fleet["failing_checks"]:
        table = Table("resource", "check", "failing for", "failures", "reason", title="Failing checks")
        for f in fleet["failing_checks"]:
            table.add_row(f["resource"], f["check"], age(f["failing_since"], now), str(f["failures"]),
                          (f["reason"] or "")[:80])
        console.print(table)

    console.print(f"\n[bold]Incidents[/bold]: {incidents['active']} active", highlight=False)
    table = Table("state", "incidents", "oldest")
    for st in incidents["by_state"]:
        table.add_row(st["state"], str(st["incidents"]), age(st["oldest_opened_at"], now))
    console.print(table)
    if incidents["most_urgent"]:
        table = Table("id", "type", "resource", "state", "step", "age", "reason", title="Most urgent")
        for i in incidents["most_urgent"]:
            table.add_row(str(i["id"]), i["type"], i["resource"], i["state"], i["step"] or "",
                          age(i["opened_at"], now), (i["reason"] or "")[:70])
        console.print(table)

    opened = s["breakers_open"]
    console.print("\n[bold]Breakers[/bold]: "
                  + (f"[red]{len(opened)} not closed: {', '.join(opened)}[/red]" if opened else "all closed"),
                  highlight=False)
    shown = [b for b in s["breakers"] if b["state"] != "closed" or b.get("changed_at")]
    if shown:
        table = Table("breaker", "state", "since", "by", "reason")
        for b in shown:
            table.add_row(b["name"], b["state"], age(b.get("changed_at"), now), b.get("changed_by") or "",
                          (b.get("reason") or "")[:70])
        console.print(table)

    for o in s.get("shadow_overrides", []):
        console.print(f"[yellow]playbook {o['type']} is in shadow[/yellow] (acts on nothing): put there by "
                      f"{o['actor']} {age(o['set_at'], now)} ago: {o['reason']}", highlight=False)

    undelivered = pages["undelivered"]
    colour = "green" if undelivered == 0 else "yellow"
    line = f"\n[bold]Pages[/bold]: [{colour}]{undelivered} undelivered[/{colour}] ({pages['pending']} pending, " \
           f"{pages['failed']} failed)"
    if pages["oldest_pending_at"]:
        line += f", oldest pending for {age(pages['oldest_pending_at'], now)}"
    console.print(line, highlight=False)
    if pages["last_error"]:
        console.print(f"  last delivery error: {pages['last_error']}", highlight=False)
