"""Remediation actions on PostgreSQL resources."""

from __future__ import annotations

from fleetmedic.actions.base import ActionContext, ActionResult
from fleetmedic.actions.registry import register_action
from fleetmedic.localfleet.fleet import cluster_for
from fleetmedic.localfleet.services import ServiceError

__all__ = ["restart"]


@register_action("postgres.restart", "postgres", "start a stopped PostgreSQL server")
def restart(ctx: ActionContext) -> ActionResult:
    """Start the database server again (pg_ctl start); a running server is left as it is."""
    res = ctx.resource
    if res.attrs.get("provider", "local") != "local":
        return ActionResult(False, f"postgres.restart supports the local provider only, not {res.attrs.get('provider')}")
    cluster = cluster_for(res.attrs, res.port)
    if not cluster.datadir.exists() or not cluster.initialized():
        return ActionResult(
            False, f"cannot restart {res.name}: data directory {cluster.datadir} is missing or empty",
            {"datadir": str(cluster.datadir)},
        )
    was_running = cluster.running()
    try:
        cluster.start(timeout=60)
    except ServiceError as exc:
        return ActionResult(False, f"restart of {res.name} failed: {str(exc).splitlines()[0]}")
    if was_running:
        return ActionResult(True, f"{res.name} was already running on port {res.port}; nothing restarted",
                            {"restarted": False})
    return ActionResult(True, f"started {res.name} on port {res.port} with pg_ctl start", {"restarted": True})
