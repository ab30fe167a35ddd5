"""Kind-generic actions: dispatch to the action of the same name for the resource's kind."""

from __future__ import annotations

from fleetmedic.actions.base import ActionContext, ActionResult
from fleetmedic.actions.registry import ACTIONS, register_action

__all__ = ["restart"]


def _dispatch(verb: str, ctx: ActionContext) -> ActionResult:
    name = f"{ctx.resource.kind}.{verb}"
    spec = ACTIONS.get(name)
    if spec is None:
        return ActionResult(False, f"no {verb} action for a {ctx.resource.kind} resource ({name} is not an action)")
    return spec.fn(ctx)


@register_action("resource.restart", "resource", "restart the database server, whatever its kind")
def restart(ctx: ActionContext) -> ActionResult:
    return _dispatch("restart", ctx)
