"""`fleetmedic fleet` and `fleetmedic chaos`: the inventory, the demo fleet and fault injection."""

from __future__ import annotations

import typer
from rich.table import Table

from fleetmedic.console.common import DsnOption, JsonOption, console, fail, ops_dsn, print_json

app = typer.Typer(help="The demo fleet and the inventory.", no_args_is_help=True)


def _local_stack(pairs: int | None = None, redis_pairs: int | None = None):
    from fleetmedic.config import local_home
    from fleetmedic.localfleet.stack import LocalStack, StackConfig

    config = StackConfig.from_env(local_home())
    if pairs is not None:
        config.pairs = pairs
    if redis_pairs is not None:
        config.redis_pairs = redis_pairs
    return LocalStack(config)


@app.command("up")
def fleet_up(pairs: int = typer.Option(2, "--pairs", min=1, max=20, help="PostgreSQL primary/follower pairs"),
             redis: int = typer.Option(1, "--redis", min=0, max=10, help="Redis primary/replica pairs")) -> None:
    """Start the demo fleet (and the local ops database it registers into); idempotent."""
    import json
    from dataclasses import asdict

    from fleetmedic.db.migrate import migrate
    from fleetmedic.localfleet.services import ServiceError

    stack = _local_stack(pairs, redis)
    try:
        stack.home.mkdir(parents=True, exist_ok=True)
        stack.ops.start()
        stack.ops.create_database("fleetmedic_ops")
        migrate(stack.ops_dsn)
        stack.fleet.up(stack.ops_dsn, progress=lambda m: console.print(m, highlight=False))
    except ServiceError as exc:
        fail(str(exc))
    (stack.home / "stack.json").write_text(json.dumps(asdict(stack.config), indent=2))
    console.print(f"demo fleet up: {pairs} PostgreSQL pair(s), {redis} Redis pair(s); see `fleetmedic fleet ls`")


@app.command("down")
def fleet_down() -> None:
    """Stop every process of the demo fleet (the ops database and Airflow keep running)."""
    stack = _local_stack()
    stack.fleet.down(progress=lambda m: console.print(m, highlight=False))


# -- fleet ------------------------------------------------------------------------------------

@app.command("ls")
def fleet_ls(dsn: str | None = DsnOption, as_json: bool = JsonOption) -> None:
    """The inventory with each resource's latest health."""
    import psycopg

    with psycopg.connect(ops_dsn(dsn)) as conn:
        rows = conn.execute(
            "SELECT r.name, r.kind, r.role, s.name, r.host || coalesce(':' || r.port, ''), "
            "coalesce(string_agg(CASE WHEN h.healthy THEN h.check_name || ' ok' ELSE h.check_name || ' FAIL: ' "
            "|| h.reason END, '; '), 'not probed yet') "
            "FROM resources r LEFT JOIN servers s ON s.id = r.server_id LEFT JOIN health h ON h.resource_id = r.id "
            "GROUP BY r.id, s.name ORDER BY r.name"
        ).fetchall()
    keys = ["resource", "kind", "role", "server", "address", "health"]
    if as_json:
        print_json([dict(zip(keys, r, strict=True)) for r in rows])
        return
    table = Table(*keys)
    for r in rows:
        table.add_row(*[str(c) for c in r])
    console.print(table)



chaos_app = typer.Typer(help="Inject real faults into the demo fleet (each says how to undo it).",
                        no_args_is_help=True)


@chaos_app.command("list")
def chaos_list(as_json: bool = JsonOption) -> None:
    """The faults that can be injected."""
    from fleetmedic.localfleet.faults import FAULTS

    if as_json:
        print_json([{"fault": f.name, "applies_to": list(f.kinds), "description": f.description}
                    for f in FAULTS.values()])
        return
    table = Table("fault", "applies to", "what it does")
    for f in sorted(FAULTS.values(), key=lambda f: f.name):
        table.add_row(f.name, ", ".join(f.kinds), f.description)
    console.print(table)


def _fault_command(name: str, description: str):
    def run(target: str = typer.Argument(..., help="resource name from `fleetmedic fleet ls`"),
            yes: bool = typer.Option(False, "--yes", help="confirm a destructive fault"),
            dsn: str | None = DsnOption, as_json: bool = JsonOption) -> None:
        from fleetmedic.inventory import UnknownResource
        from fleetmedic.localfleet.faults import FaultError, inject

        try:
            result = inject(name, ops_dsn(dsn), target, yes=yes)
        except UnknownResource as exc:
            fail(str(exc), 2)
        except FaultError as exc:
            fail(str(exc), 2)
        if as_json:
            print_json({"fault": name, "target": target, "did": result.did, "undo": result.undo, **result.data})
            return
        console.print(result.did, highlight=False)
        console.print(f"undo: {result.undo}", highlight=False)

    run.__doc__ = description
    return run


def _register_faults() -> None:
    from fleetmedic.localfleet.faults import FAULTS

    for fault in FAULTS.values():
        chaos_app.command(fault.name)(_fault_command(fault.name, fault.description))


_register_faults()
