"""Remediation actions on Redis resources."""

from __future__ import annotations

from fleetmedic.actions.base import ActionContext, ActionResult
from fleetmedic.actions.registry import register_action
from fleetmedic.localfleet.fleet import redis_for
from fleetmedic.localfleet.services import ServiceError

__all__ = ["restart"]


@register_action("redis.restart", "redis", "start a stopped redis-server")
def restart(ctx: ActionContext) -> ActionResult:
    """Start redis-server again; a running server is left as it is."""
    res = ctx.resource
    server = redis_for(res.attrs, res.port)
    was_running = server.running()
    try:
        server.start()
    except ServiceError as exc:
        return ActionResult(False, f"restart of {res.name} failed: {exc}")
    if was_running:
        return ActionResult(True, f"{res.name} was already running; nothing restarted", {"restarted": False})
    return ActionResult(True, f"started redis-server {res.name} on port {res.port}", {"restarted": True})
