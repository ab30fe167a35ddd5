"""What every remediation action receives and returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fleetmedic.inventory import Resource

__all__ = ["ActionContext", "ActionResult", "ActionSpec"]


@dataclass(frozen=True)
class ActionContext:
    incident_id: int
    incident_type: str
    resource: Resource
    ops_dsn: str
    dry_run: bool = False
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ActionResult:
    """`ok` picks the step's next branch; `reason` is recorded on the audit event (Patroni style)."""

    ok: bool
    reason: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ActionSpec:
    name: str
    kind: str  # the resource kind it acts on
    fn: Callable[[ActionContext], ActionResult]
    description: str

    def describe(self, ctx: ActionContext) -> str:
        return f"{self.name} on {ctx.resource.name} ({ctx.resource.host}:{ctx.resource.port})"
