"""`fleetmedic incidents`: incidents and their audit trails."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.table import Table

from fleetmedic.console.common import DsnOption, JsonOption, console, fail, ops_dsn, print_json

app = typer.Typer(help="Incidents and their audit trails.", no_args_is_help=True)
T = TypeVar("T")


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


# -- human overrides (each an audited event: human:<name> and a reason) -------------------------

def _override(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one override with the human actor; its errors exit 1 with their message."""
    from fleetmedic.airflow_api import AirflowApiError
    from fleetmedic.incidents.lifecycle import IncidentError
    from fleetmedic.safety.overrides import OverrideError, human_actor

    try:
        return fn(*args, actor=human_actor(), **kwargs)
    except (OverrideError, IncidentError, AirflowApiError) as exc:
        fail(str(exc))


ReasonOption = typer.Option(..., "--reason", "-r", help="why (recorded with your name)")


@app.command("ack")
def incidents_ack(incident_id: int, reason: str = ReasonOption, dsn: str | None = DsnOption,
                  as_json: bool = JsonOption) -> None:
    """Acknowledge: record that you own this incident now (its state does not change)."""
    from fleetmedic.safety.overrides import acknowledge

    event = _override(acknowledge, ops_dsn(dsn), incident_id, reason=reason)
    if as_json:
        print_json(event.as_dict())
    else:
        console.print(event.reason, highlight=False)


@app.command("ignore")
def incidents_ignore(incident_id: int, until: str = typer.Option(..., "--until", help="2h, 1d, or an ISO time"),
                     reason: str = ReasonOption, dsn: str | None = DsnOption, as_json: bool = JsonOption) -> None:
    """Ignore until a time: re-detections only refresh it, automation leaves it alone."""
    from fleetmedic.safety.overrides import OverrideError, ignore, parse_until

    try:
        when = parse_until(until)
    except OverrideError as exc:
        fail(str(exc), 2)
    inc = _override(ignore, ops_dsn(dsn), incident_id, reason=reason, until=when)
    if as_json:
        print_json(inc.as_dict())
    else:
        console.print(f"incident {inc.id}: {inc.reason}", highlight=False)


@app.command("resolve")
def incidents_resolve(incident_id: int, reason: str = ReasonOption, dsn: str | None = DsnOption,
                      as_json: bool = JsonOption) -> None:
    """Resolve: it is fixed (a page sent for it resolves too)."""
    from fleetmedic.safety.overrides import resolve

    inc = _override(resolve, ops_dsn(dsn), incident_id, reason=reason)
    if as_json:
        print_json(inc.as_dict())
    else:
        console.print(f"incident {inc.id}: {inc.reason}", highlight=False)


@app.command("retry")
def incidents_retry(incident_id: int, reason: str = ReasonOption,
                    start_at: str | None = typer.Option(None, "--start-at", help="start at this step"),
                    dry_run: bool = typer.Option(False, "--dry-run", help="record what would be done, change nothing"),
                    dsn: str | None = DsnOption, as_json: bool = JsonOption) -> None:
    """Start the incident's playbook again through Airflow (run incident-<id>-retry-<n>, with your reason)."""
    from fleetmedic.console.common import airflow_client
    from fleetmedic.safety.overrides import retry

    dsn = ops_dsn(dsn)
    with airflow_client() as client:
        run = _override(retry, dsn, client, incident_id, reason=reason, start_at=start_at, dry_run=dry_run)
    if as_json:
        print_json(run)
        return
    console.print(f"started {run['dag_id']} run {run['dag_run_id']} for incident {incident_id}", highlight=False)
