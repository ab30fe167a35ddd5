"""`fleetmedic incidents`: incidents and their audit trails."""

from __future__ import annotations

import typer
from rich.table import Table

from fleetmedic.console.common import DsnOption, JsonOption, console, fail, ops_dsn, print_json

app = typer.Typer(help="Incidents and their audit trails.", no_args_is_help=True)


# -- incidents and pages ----------------------------------------------------------------------

@app.command("list")
def incidents_list(state: str | None = typer.Option(None, help="only this state"),
                   type_: str | None = typer.Option(None, "--type", help="only this incident type"),
                   limit: int = typer.Option(50, help="at most this many"),
                   dsn: str | None = DsnOption, as_json: bool = JsonOption) -> None:
    """Incidents, newest first."""
    from fleetmedic.incidents.store import IncidentStore

    rows = IncidentStore(ops_dsn(dsn)).list(state=state, type=type_, limit=limit)
    if as_json:
        print_json([i.as_dict() for i in rows])
        return
    table = Table("id", "type", "resource", "state", "step", "opened", "seen", "reason")
    for i in rows:
        table.add_row(str(i.id), i.type, str(i.resource_id), i.state, i.step or "",
                      f"{i.opened_at:%m-%d %H:%M:%S}", str(i.detections), (i.reason or "")[:70])
    console.print(table)


@app.command("show")
def incidents_show(incident_id: int, dsn: str | None = DsnOption, as_json: bool = JsonOption) -> None:
    """One incident with its audit trail."""
    from fleetmedic.incidents.lifecycle import IncidentNotFound
    from fleetmedic.incidents.store import IncidentStore

    store = IncidentStore(ops_dsn(dsn))
    try:
        inc = store.get(incident_id)
    except IncidentNotFound as exc:
        fail(str(exc))
    events = store.events(incident_id)
    if as_json:
        print_json({"incident": inc.as_dict(), "events": [e.as_dict() for e in events]})
        return
    console.print(f"[bold]incident {inc.id}[/bold] {inc.type} on resource {inc.resource_id}: {inc.state}"
                  f" (version {inc.version}, detections {inc.detections})")
    table = Table("at", "from", "to", "step", "actor", "reason")
    for e in events:
        table.add_row(f"{e.at:%H:%M:%S}", e.from_state or "", e.to_state, e.step or "", e.actor, e.reason)
    console.print(table)
