"""Every action a playbook step may name, in one table.

Families of actions live in fleetmedic.actions.<family> modules and add themselves with
`register_action`; this module imports them all so the table is complete.
"""

from __future__ import annotations

from collections.abc import Callable

from fleetmedic.actions.base import ActionContext, ActionResult, ActionSpec

__all__ = ["ACTIONS", "register_action"]

ACTIONS: dict[str, ActionSpec] = {}

ActionFn = Callable[[ActionContext], ActionResult]


def register_action(name: str, kind: str, description: str) -> Callable[[ActionFn], ActionFn]:
    """Decorator: add `fn(ctx) -> ActionResult` to ACTIONS under `name` (kind: the resource kind it acts on)."""

    def add(fn: ActionFn) -> ActionFn:
        if name in ACTIONS:
            raise ValueError(f"action {name!r} is registered twice")
        ACTIONS[name] = ActionSpec(name, kind, fn, description)
        return fn

    return add


def _load_action_families() -> None:
    import importlib
    import pkgutil

    import fleetmedic.actions as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("base", "registry"):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")


_load_action_families()
