"""Every action a playbook step may name, in one table."""

from __future__ import annotations

from fleetmedic.actions import postgres, redis
from fleetmedic.actions.base import ActionSpec

__all__ = ["ACTIONS"]

ACTIONS: dict[str, ActionSpec] = {
    spec.name: spec
    for spec in (
        ActionSpec("postgres.restart", "postgres", postgres.restart, "start a stopped PostgreSQL server"),
        ActionSpec("redis.restart", "redis", redis.restart, "start a stopped redis-server"),
    )
}
