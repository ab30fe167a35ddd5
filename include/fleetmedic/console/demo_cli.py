"""`fleetmedic demo`: the local system (ops DB, Redis, demo fleet, Airflow)."""

from __future__ import annotations

import typer

from fleetmedic.config import local_home
from fleetmedic.console.common import console, fail, ops_dsn

app = typer.Typer(help="The local system: ops DB, Redis, demo fleet and Airflow.", no_args_is_help=True)


# -- demo -------------------------------------------------------------------------------------

def _stack():
    from fleetmedic.localfleet.stack import LocalStack, StackConfig

    return LocalStack(StackConfig.from_env(local_home()))


@app.command("up")
def demo_up(no_airflow: bool = typer.Option(False, "--no-airflow", help="only databases and the fleet")) -> None:
    """Start everything (idempotent) and print the Airflow UI URL and login."""
    from fleetmedic.localfleet.services import ServiceError

    stack = _stack()
    if no_airflow:
        stack.config.airflow = False
    try:
        stack.up(progress=lambda m: console.print(m, highlight=False))
    except ServiceError as exc:
        fail(str(exc))
    if stack.config.airflow:
        console.print(f"\n[bold]Airflow UI[/bold]: {stack.airflow.url}   login: {stack.airflow.user} / "
                      f"{stack.airflow.password}")
    console.print(f"settings: {stack.home / 'demo.env'}    stop everything with: make stop")


@app.command("down")
def demo_down() -> None:
    """Stop everything `demo up` started; no process is left behind."""
    home = local_home()
    if not (home / "stack.json").exists():
        console.print("nothing to stop (no .local/stack.json)")
        return
    _stack().down(progress=lambda m: console.print(m, highlight=False))


@app.command("show")
def demo_show(resource: str = typer.Argument("pg1a", help="resource to break"),
              timeout: float = typer.Option(240, help="seconds to wait for the fix")) -> None:
    """Stop one PostgreSQL and watch fleetmedic find and fix it."""
    import time

    from fleetmedic.incidents.store import IncidentStore

    dsn = ops_dsn(None)
    store = IncidentStore(dsn)
    before = {i.id for i in store.list(limit=100000)}
    from fleetmedic.localfleet.faults import inject

    result = inject("stop-postgres", dsn, resource)
    console.print(f"{result.did}; undo: {result.undo}", highlight=False)
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
    fail(f"no resolution within {timeout:.0f}s; see `fleetmedic incidents list` and the Airflow UI")


