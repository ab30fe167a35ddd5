"""`fleetmedic changeover`: move a live PostgreSQL primary to a new server (the changeover procedure)."""

from __future__ import annotations

import getpass
from typing import Any

import typer
from rich.table import Table

from fleetmedic.console.common import (
    DsnOption,
    JsonOption,
    airflow_client,
    console,
    fail,
    ops_dsn,
    print_json,
)

app = typer.Typer(help="Move a database to a new server without losing a committed row.", no_args_is_help=True)

DAG_ID = "playbook_changeover"
TYPE = "changeover"


def open_changeover(dsn: str, resource: str, *, reason: str, requested_by: str) -> tuple[Any, bool]:
    """Open the `changeover` incident of a primary (or return the open one); (incident, created).

    Raises ValueError with the reason when the resource cannot be changed over.
    """
    import psycopg

    from fleetmedic.incidents.store import IncidentStore
    from fleetmedic.inventory import get_resource

    with psycopg.connect(dsn) as conn:
        res = get_resource(conn, resource)
    if res.kind != "postgres" or res.role != "primary" or not res.enabled:
        raise ValueError(f"{res.name} is a{'' if res.enabled else ' disabled'} {res.kind} {res.role}; a changeover "
                         "moves an enabled PostgreSQL primary")
    store = IncidentStore(dsn)
    incident, created = store.open_or_refresh_incident(
        res.id, TYPE, actor=f"human:{requested_by}", severity="info",
        reason=f"changeover of {res.name} requested by {requested_by}: {reason}",
        data={"requested_by": requested_by, "reason": reason},
    )
    if not created and incident.state != "open":
        raise ValueError(f"a changeover of {res.name} is already {incident.state} (incident {incident.id}); "
                         f"see `fleetmedic incidents show {incident.id}`")
    return incident, created


@app.command("start")
def changeover_start(
    resource: str = typer.Argument(..., help="the primary to move, e.g. pg4a"),
    reason: str = typer.Option(..., "--reason", help="why (recorded on the incident and the run)"),
    by: str = typer.Option(None, "--by", help="who asks (default: the OS user)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="record what would be done, change nothing"),
    wait: bool = typer.Option(False, "--wait", help="follow the run until it ends"),
    timeout: float = typer.Option(900, help="with --wait: give up after this many seconds"),
    dsn: str | None = DsnOption,
    as_json: bool = JsonOption,
) -> None:
    """Open a changeover incident for RESOURCE and start playbook_changeover for it."""
    from fleetmedic.airflow_api import AirflowApiError
    from fleetmedic.incidents.store import IncidentStore
    from fleetmedic.inventory import UnknownResource

    if not reason.strip():
        fail("--reason must say why the database moves", 2)
    who = by or getpass.getuser()
    dsn = ops_dsn(dsn)
    try:
        incident, created = open_changeover(dsn, resource, reason=reason, requested_by=who)
    except UnknownResource as exc:
        fail(str(exc), 2)
    except ValueError as exc:
        fail(str(exc), 2)
    run_id = f"incident-{incident.id}"
    with airflow_client() as client:
        try:
            client.trigger(DAG_ID, run_id=run_id, conf={"incident_id": incident.id, "reason": reason,
                                                         "requested_by": who, "dry_run": dry_run})
            triggered = True
        except AirflowApiError as exc:
            if exc.status_code != 409:
                fail(f"could not start {DAG_ID} for incident {incident.id}: {exc}")
            triggered = False  # the sweep (or an earlier call) already started this incident's run
        run = client.wait_for_run(DAG_ID, run_id, timeout=timeout, echo=not as_json) if wait else None
    final = IncidentStore(dsn).get(incident.id)
    out = {"incident_id": incident.id, "created": created, "dag_id": DAG_ID, "run_id": run_id,
           "triggered": triggered, "run_state": run["state"] if run else None, "incident_state": final.state,
           "reason": final.reason}
    if as_json:
        print_json(out)
    else:
        console.print(f"changeover of {resource}: incident {incident.id} ({'opened' if created else 'already open'}), "
                      f"run {DAG_ID}/{run_id} {'started' if triggered else 'already exists'}", highlight=False)
        if run:
            console.print(f"run {run['state']}; incident {final.state}: {final.reason}", highlight=False)
        else:
            console.print(f"follow it with: fleetmedic incidents show {incident.id}", highlight=False)
    if wait and final.state != "resolved":
        raise typer.Exit(1)


@app.command("status")
def changeover_status(resource: str = typer.Argument(..., help="the database"),
                      dsn: str | None = DsnOption, as_json: bool = JsonOption) -> None:
    """The database's changeover in progress (attrs.changeover), past changeovers and their incidents."""
    import psycopg

    from fleetmedic.incidents.store import IncidentStore
    from fleetmedic.inventory import UnknownResource, get_resource

    dsn = ops_dsn(dsn)
    try:
        with psycopg.connect(dsn) as conn:
            res = get_resource(conn, resource)
    except UnknownResource as exc:
        fail(str(exc), 2)
    incidents = IncidentStore(dsn).list(type=TYPE, resource_id=res.id, limit=20)
    out = {
        "resource": res.name, "server": res.server.name if res.server else None, "port": res.port,
        "in_progress": res.attrs.get("changeover"), "past": res.attrs.get("changeovers") or [],
        "incidents": [{"id": i.id, "state": i.state, "step": i.step, "opened_at": i.opened_at, "reason": i.reason}
                      for i in incidents],
    }
    if as_json:
        print_json(out)
        return
    console.print(f"{res.name} is on {out['server']} (127.0.0.1:{res.port}); "
                  f"{'a changeover is in progress' if out['in_progress'] else 'no changeover in progress'}",
                  highlight=False)
    table = Table("incident", "state", "step", "opened", "reason")
    for i in incidents:
        table.add_row(str(i.id), i.state, i.step or "", f"{i.opened_at:%m-%d %H:%M:%S}", i.reason[:80])
    console.print(table)
