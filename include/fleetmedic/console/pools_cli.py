"""`fleetmedic pools`: one Airflow pool per playbook, sized from `limits.concurrency`, synced through the REST API."""

from __future__ import annotations

import typer
from rich.table import Table

from fleetmedic.console.common import JsonOption, airflow_client, console, fail, print_json

app = typer.Typer(help="Airflow pools per playbook (concurrency caps), kept in sync with the playbooks.",
                  no_args_is_help=True)


@app.command("sync")
def pools_sync(prune: bool = typer.Option(True, help="delete playbook_* pools of playbooks that are gone"),
               as_json: bool = JsonOption) -> None:
    """Create or resize `playbook_<type>` pools from each playbook's limits.concurrency."""
    from fleetmedic.airflow_api import AirflowApiError
    from fleetmedic.playbooks.loader import load_all
    from fleetmedic.safety.pools import sync_pools

    loaded = load_all()
    for path, error in loaded.errors.items():
        console.print(f"[yellow]skipped[/yellow] {path}: {error}", highlight=False)
    try:
        with airflow_client() as client:
            # While a playbook is broken, keep every pool: pruning would only hide the breakage.
            changes = sync_pools(client, loaded.playbooks.values(), prune=prune and not loaded.errors)
    except AirflowApiError as exc:
        fail(str(exc))
    if as_json:
        print_json([c.as_dict() for c in changes])
        return
    table = Table("pool", "action", "slots", "before")
    for c in changes:
        table.add_row(c.pool, c.action, "" if c.slots is None else str(c.slots), "" if c.before is None else str(c.before))
    console.print(table)


@app.command("list")
def pools_list(as_json: bool = JsonOption) -> None:
    """The playbook pools with their slots and usage."""
    from fleetmedic.airflow_api import AirflowApiError

    try:
        with airflow_client() as client:
            pools = [p for p in client.list_pools() if str(p["name"]).startswith("playbook_")]
    except AirflowApiError as exc:
        fail(str(exc))
    if as_json:
        print_json(pools)
        return
    table = Table("pool", "slots", "running", "queued", "open", "description")
    for p in pools:
        table.add_row(p["name"], str(p["slots"]), str(p.get("running_slots", "")), str(p.get("queued_slots", "")),
                      str(p.get("open_slots", "")), (p.get("description") or "")[:70])
    console.print(table)
