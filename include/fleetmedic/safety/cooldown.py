"""Resource cooldown (anti-flapping): automation acts on a (resource, type) at most once per `resource_cooldown`.

Computed from the ops DB's audit trail (the 'acting' step events every action records before it
acts), never from Redis alone: a second automated action within the cooldown escalates instead, and
the page says "cooldown".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg

from fleetmedic.db.connect import connection, dict_cursor

__all__ = ["RecentAction", "cooldown_reason", "last_automated_action"]


@dataclass(frozen=True)
class RecentAction:
    """The latest automated action on a (resource, type)."""

    incident_id: int
    run_id: str | None
    step: str | None
    action: str | None
    at: datetime
    age: timedelta
    actor: str
    resource_name: str


def last_automated_action(
    target: str | psycopg.Connection[Any],
    resource_id: int,
    incident_type: str,
    *,
    within: timedelta,
    exclude_run_id: str | None = None,
) -> RecentAction | None:
    """The latest action automation took on (resource, type) in the last `within`, or None.

    An action counts when its step recorded `step_status: acting` (it was about to act, so it may
    have acted), outside dry runs. `exclude_run_id`: the asking run's own earlier steps do not count.
    """
    with connection(target) as conn, dict_cursor(conn) as cur:
        cur.execute(
            """
            SELECT e.incident_id, e.data->>'run_id' AS run_id, e.step, e.data->>'action' AS action, e.at,
                   now() - e.at AS age, e.actor, r.name AS resource_name
            FROM incidents i
            JOIN incident_events e ON e.incident_id = i.id
            JOIN resources r ON r.id = i.resource_id
            WHERE i.resource_id = %(resource_id)s AND i.type = %(type)s
              AND e.data->>'step_status' = 'acting'
              AND NOT COALESCE((e.data->>'dry_run')::boolean, false)
              AND e.actor LIKE 'automation:%%'
              AND e.at > now() - %(within)s
              AND (%(run_id)s::text IS NULL OR e.data->>'run_id' IS DISTINCT FROM %(run_id)s::text)
            ORDER BY e.at DESC
            LIMIT 1
            """,
            {"resource_id": resource_id, "type": incident_type, "within": within, "run_id": exclude_run_id},
        )
        row = cur.fetchone()
    if row is None:
        return None
    return RecentAction(
        incident_id=int(row["incident_id"]), run_id=row["run_id"], step=row["step"], action=row["action"],
        at=row["at"], age=row["age"], actor=row["actor"], resource_name=row["resource_name"],
    )


def _human(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def cooldown_reason(hit: RecentAction, cooldown: timedelta, incident_type: str) -> str:
    """The Patroni-style reason a cooldown escalation records (and the page repeats)."""
    return (
        f"cooldown: automation already ran {hit.action or hit.step or 'an action'} on {hit.resource_name} "
        f"{_human(hit.age)} ago for {incident_type} (incident {hit.incident_id}"
        f"{', run ' + hit.run_id if hit.run_id else ''}); a second automated action within the "
        f"resource_cooldown of {_human(cooldown)} escalates instead of acting again (is it flapping?)"
    )
