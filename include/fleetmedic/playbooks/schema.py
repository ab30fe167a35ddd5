"""Playbook YAML schema (pydantic): the runbook a human reads and the steps automation runs."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.functional_validators import BeforeValidator

__all__ = [
    "TERMINALS",
    "Confirm",
    "Detect",
    "Limits",
    "Playbook",
    "Step",
    "parse_duration",
]

# Where a path through a playbook may end.
TERMINALS = ("resolve", "await_resolution", "escalate")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> timedelta:
    """'10s', '2m', '1h', '1.5d' or a number of seconds -> timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration; write e.g. 30s, 5m, 1h")
    if isinstance(value, int | float):
        return timedelta(seconds=float(value))
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    raise ValueError(f"{value!r} is not a duration; write e.g. 30s, 5m, 1h")


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Confirm(_Model):
    """How many consecutive failed probes, spanning at least how long, confirm an incident."""

    failures: int = Field(2, ge=1, description="consecutive failed probes needed")
    over: Duration = Field(timedelta(seconds=10), description="time from first to latest failure")


class Detect(_Model):
    check: str = Field(description="the check whose failure opens this incident type, e.g. postgres.connect")
    confirm: Confirm = Field(default_factory=Confirm)


class Limits(_Model):
    max_actions_per_hour: int = Field(20, ge=1)
    resource_cooldown: Duration = Field(timedelta(hours=1))
    concurrency: int = Field(5, ge=1)
    mode: Literal["active", "shadow"] = "active"


class Step(_Model):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    action: str | None = None
    wait_healthy: str | None = None
    timeout: Duration
    next: dict[str, str]
    approval: Literal["required", "none"] = "none"
    approval_timeout: Duration = Field(timedelta(minutes=30), description="no answer by then escalates")
    attempts: int = Field(1, ge=1, le=10)
    params: dict[str, object] = Field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "action" if self.action else "wait_healthy"


class Playbook(_Model):
    type: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    title: str
    severity: Literal["critical", "error", "warning", "info"] = "critical"
    applies_to: list[Literal["postgres", "redis", "server"]]
    runbook: str
    detect: Detect | list[Detect] | None = None
    limits: Limits = Field(default_factory=Limits)
    steps: list[Step] = Field(min_length=1)

    @field_validator("runbook")
    @classmethod
    def _runbook_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("runbook is empty; say what the incident means and what to do when paged")
        return v

    @property
    def detects(self) -> list[Detect]:
        """The detect blocks as a list (a playbook may cover several kinds, one check each)."""
        if self.detect is None:
            return []
        return list(self.detect) if isinstance(self.detect, list) else [self.detect]

    def detect_for_kind(self, kind: str) -> Detect | None:
        from fleetmedic.detection.checks import CHECKS

        for d in self.detects:
            if d.check in CHECKS and CHECKS[d.check][0] == kind:
                return d
        return None

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def dag_id(self) -> str:
        return f"playbook_{self.type}"
