"""The `fleetmedic` command line: the local stack, the ops database, the fleet, chaos and incidents."""

from __future__ import annotations

import json
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from fleetmedic.config import load_settings, local_home

app = typer.Typer(help="fleetmedic: automatic incident resolution for PostgreSQL and Redis fleets.",
                  no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="The ops database: schema migrations.", no_args_is_help=True)
demo_app = typer.Typer(help="The local system: ops DB, Redis, demo fleet and Airflow.", no_args_is_help=True)
fleet_app = typer.Typer(help="The demo fleet and the inventory.", no_args_is_help=True)
chaos_app = typer.Typer(help="Inject real faults into the demo fleet (each says how to undo it).",
                        no_args_is_help=True)
incidents_app = typer.Typer(help="Incidents and their audit trails.", no_args_is_help=True)
pages_app = typer.Typer(help="The pager outbox.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(demo_app, name="demo")
app.add_typer(fleet_app, name="fleet")
app.add_typer(chaos_app, name="chaos")
app.add_typer(incidents_app, name="incidents")
app.add_typer(pages_app, name="pages")

console = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _ops_dsn(dsn: str | None) -> str:
    if dsn:
        return dsn
    try:
        return load_settings().ops_dsn
    except RuntimeError as exc:
        _fail(str(exc))
        raise  # unreachable


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    return value


def _print_json(rows: Any) -> None:
    print(json.dumps(rows, default=_jsonable, indent=2))


DsnOption = typer.Option(None, "--dsn", help="ops database DSN (default: FLEETMEDIC_OPS_DSN or .local/demo.env)")
JsonOption = typer.Option(False, "--json", help="print JSON for scripts")


# -- db ---------------------------------------------------------------------------------------

@db_app.command("migrate")
def db_migrate(dsn: str | None = DsnOption) -> None:
    """Apply pending schema migrations (idempotent)."""
    from fleetmedic.db.migrate import MigrationError, migrate

    try:
        applied = migrate(_ops_dsn(dsn))
    except MigrationError as exc:
        _fail(str(exc))
    console.print(f"applied: {', '.join(applied)}" if applied else "schema up to date")


@db_app.command("status")
def db_status(dsn: str | None = DsnOption, as_json: bool = JsonOption) -> None:
    """List applied and pending migrations."""
    from fleetmedic.db.migrate import status

    rows = status(_ops_dsn(dsn))
    if as_json:
        _print_json(rows)
        return
    console.print(rows)


# -- demo -------------------------------------------------------------------------------------

def _stack():
    from fleetmedic.localfleet.stack import LocalStack, StackConfig

    return LocalStack(StackConfig.from_env(local_home()))


@demo_app.command("up")
def demo_up(no_airflow: bool = typer.Option(False, "--no-airflow", help="only databases and the fleet")) -> None:
    """Start everything (idempotent) and print the Airflow UI URL and login."""
    from fleetmedic.localfleet.services import ServiceError

    stack = _stack()
    if no_airflow:
        stack.config.airflow = False
    try:
        stack.up(progress=lambda m: console.print(m, highlight=False))
    except ServiceError as exc:
        _fail(str(exc))
    if stack.config.airflow:
        console.print(f"\n[bold]Airflow UI[/bold]: {stack.airflow.url}   login: {stack.airflow.user} / "
                      f"{stack.airflow.password}")
    console.print(f"settings: {stack.home / 'demo.env'}    stop everything with: make stop")


@demo_app.command("down")
def demo_down() -> None:
    """Stop everything `demo up` started; no process is left behind."""
    home = local_home()
    if not (home / "stack.json").exists():
        console.print("nothing to stop (no .local/stack.json)")
        return
    _stack().down(progress=lambda m: console.print(m, highlight=False))


@demo_app.command("show")
def demo_show(resource: str = typer.Argument("pg1a", help="resource to break"),
              timeout: float = typer.Option(240, help="seconds to wait for the fix")) -> None:
    """Stop one PostgreSQL and watch fleetmedic find and fix it."""
    import time

    from fleetmedic.incidents.store import IncidentStore

    dsn = _ops_dsn(None)
    store = IncidentStore(dsn)
    before = {i.id for i in store.list(limit=100000)}
    chaos_stop_postgres(resource, dsn=None)
    console.print("waiting for the sweep to confirm the failure and the playbook to fix it ...")
    t0 = time.monotonic()
    seen: set[tuple[int, int]] = set()
    while time.monotonic() - t0 < timeout:
        for inc in store.list(limit=100):
            if inc.id in before:
                continue
            for ev in store.events(inc.id):
                if (inc.id, ev.id) in seen:
                    continue
                seen.add((inc.id, ev.id))
                console.print(f"  +{time.monotonic() - t0:5.1f}s incident {inc.id} "
                              f"{ev.from_state or '-'} -> {ev.to_state} [{ev.step or ''}] {ev.reason}",
                              highlight=False)
            if inc.state in ("resolved", "escalated"):
                console.print(f"incident {inc.id} {inc.state} after {time.monotonic() - t0:.0f}s")
                return
        time.sleep(2)
    _fail(f"no resolution within {timeout:.0f}s; see `fleetmedic incidents list` and the Airflow UI")


# -- fleet ------------------------------------------------------------------------------------

@fleet_app.command("ls")
def fleet_ls(dsn: str | None = DsnOption, as_json: bool = JsonOption) -> None:
    """The inventory with each resource's latest health."""
    import psycopg

    with psycopg.connect(_ops_dsn(dsn)) as conn:
        rows = conn.execute(
            "SELECT r.name, r.kind, r.role, s.name, r.host || ':' || r.port, "
            "coalesce(string_agg(CASE WHEN h.healthy THEN h.check_name || ' ok' ELSE h.check_name || ' FAIL: ' "
            "|| h.reason END, '; '), 'not probed yet') "
            "FROM resources r LEFT JOIN servers s ON s.id = r.server_id LEFT JOIN health h ON h.resource_id = r.id "
            "GROUP BY r.id, s.name ORDER BY r.name"
        ).fetchall()
    keys = ["resource", "kind", "role", "server", "address", "health"]
    if as_json:
        _print_json([dict(zip(keys, r, strict=True)) for r in rows])
        return
    table = Table(*keys)
    for r in rows:
        table.add_row(*[str(c) for c in r])
    console.print(table)


# -- chaos ------------------------------------------------------------------------------------

def _local_cluster(resource: str, dsn: str | None):
    import psycopg

    from fleetmedic.inventory import UnknownResource, get_resource
    from fleetmedic.localfleet.fleet import cluster_for

    with psycopg.connect(_ops_dsn(dsn)) as conn:
        try:
            res = get_resource(conn, resource)
        except UnknownResource as exc:
            _fail(str(exc), 2)
    if res.kind != "postgres":
        _fail(f"{resource} is a {res.kind} resource, not postgres", 2)
    return res, cluster_for(res.attrs, res.port)


@chaos_app.command("stop-postgres")
def chaos_stop_postgres(resource: str, dsn: str | None = DsnOption) -> None:
    """Stop a PostgreSQL server cleanly (pg_ctl stop -m fast)."""
    res, cluster = _local_cluster(resource, dsn)
    stopped = cluster.stop(mode="fast")
    console.print(f"{'stopped' if stopped else 'already stopped:'} postgres {res.name} on port {res.port}",
                  highlight=False)
    console.print(f"undo: fleetmedic chaos start-postgres {res.name}", highlight=False)


@chaos_app.command("kill-postgres")
def chaos_kill_postgres(resource: str, dsn: str | None = DsnOption) -> None:
    """SIGKILL the postmaster, leaving a stale pid file (a crash)."""
    res, cluster = _local_cluster(resource, dsn)
    pid = cluster.kill()
    console.print(f"killed postmaster {pid} of {res.name} (pid file left behind)" if pid
                  else f"{res.name} was not running", highlight=False)
    console.print(f"undo: fleetmedic chaos start-postgres {res.name}", highlight=False)


@chaos_app.command("destroy-postgres")
def chaos_destroy_postgres(resource: str, dsn: str | None = DsnOption,
                           yes: bool = typer.Option(False, "--yes", help="really remove the data directory")) -> None:
    """Stop a PostgreSQL server and remove its data directory (it cannot restart)."""
    if not yes:
        _fail("destroy-postgres removes a data directory; pass --yes to confirm", 2)
    res, cluster = _local_cluster(resource, dsn)
    cluster.stop(mode="immediate")
    shutil.rmtree(cluster.datadir, ignore_errors=True)
    console.print(f"stopped {res.name} and removed {cluster.datadir}", highlight=False)
    console.print("undo: `make stop && rm -rf .local/fleet && make demo` rebuilds the demo fleet", highlight=False)


@chaos_app.command("start-postgres")
def chaos_start_postgres(resource: str, dsn: str | None = DsnOption) -> None:
    """Start a PostgreSQL server again (undo for stop-postgres and kill-postgres)."""
    from fleetmedic.localfleet.services import ServiceError

    res, cluster = _local_cluster(resource, dsn)
    try:
        cluster.start()
    except ServiceError as exc:
        _fail(str(exc))
    console.print(f"postgres {res.name} is running on port {res.port}", highlight=False)


# -- incidents and pages ----------------------------------------------------------------------

@incidents_app.command("list")
def incidents_list(state: str | None = typer.Option(None, help="only this state"),
                   type_: str | None = typer.Option(None, "--type", help="only this incident type"),
                   limit: int = typer.Option(50, help="at most this many"),
                   dsn: str | None = DsnOption, as_json: bool = JsonOption) -> None:
    """Incidents, newest first."""
    from fleetmedic.incidents.store import IncidentStore

    rows = IncidentStore(_ops_dsn(dsn)).list(state=state, type=type_, limit=limit)
    if as_json:
        _print_json([i.as_dict() for i in rows])
        return
    table = Table("id", "type", "resource", "state", "step", "opened", "seen", "reason")
    for i in rows:
        table.add_row(str(i.id), i.type, str(i.resource_id), i.state, i.step or "",
                      f"{i.opened_at:%m-%d %H:%M:%S}", str(i.detections), (i.reason or "")[:70])
    console.print(table)


@incidents_app.command("show")
def incidents_show(incident_id: int, dsn: str | None = DsnOption, as_json: bool = JsonOption) -> None:
    """One incident with its audit trail."""
    from fleetmedic.incidents.lifecycle import IncidentNotFound
    from fleetmedic.incidents.store import IncidentStore

    store = IncidentStore(_ops_dsn(dsn))
    try:
        inc = store.get(incident_id)
    except IncidentNotFound as exc:
        _fail(str(exc))
    events = store.events(incident_id)
    if as_json:
        _print_json({"incident": inc.as_dict(), "events": [e.as_dict() for e in events]})
        return
    console.print(f"[bold]incident {inc.id}[/bold] {inc.type} on resource {inc.resource_id}: {inc.state}"
                  f" (version {inc.version}, detections {inc.detections})")
    table = Table("at", "from", "to", "step", "actor", "reason")
    for e in events:
        table.add_row(f"{e.at:%H:%M:%S}", e.from_state or "", e.to_state, e.step or "", e.actor, e.reason)
    console.print(table)


@pages_app.command("list")
def pages_list(dsn: str | None = DsnOption, as_json: bool = JsonOption,
               limit: int = typer.Option(50, help="at most this many")) -> None:
    """Pages in the outbox, newest first."""
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(_ops_dsn(dsn), row_factory=dict_row) as conn:
        rows = conn.execute(
            "SELECT id, incident_id, dedup_key, action, status, attempts, summary, created_at, delivered_at "
            "FROM pages ORDER BY id DESC LIMIT %s", (limit,)
        ).fetchall()
    if as_json:
        _print_json(rows)
        return
    table = Table("id", "incident", "action", "status", "attempts", "summary")
    for r in rows:
        table.add_row(str(r["id"]), str(r["incident_id"] or ""), r["action"], r["status"], str(r["attempts"]),
                      r["summary"][:90])
    console.print(table)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
