"""Shadow mode: what a playbook would have done, and the evidence to promote it (`fleetmedic shadow report`).

A playbook with `limits.mode: shadow`, or one a human put in shadow (`fleetmedic shadow on`,
safety/modes.py), acts on nothing: its gate records the path it would have
taken and escalates as if no automation existed. "Would have resolved" means the gate found nothing
that would have stopped it (breakers, cooldown, the action window) and the playbook's happy path
(every action ok, every wait healthy) ends in `resolve`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import psycopg

from fleetmedic.db.connect import connection, dict_cursor
from fleetmedic.playbooks.schema import TERMINALS, Playbook

__all__ = ["ShadowRow", "happy_path", "shadow_report"]

_HAPPY = ("ok", "healthy")


def happy_path(playbook: Playbook) -> tuple[list[str], str]:
    """The steps taken when every action succeeds and every wait turns healthy, and the terminal reached."""
    path: list[str] = []
    seen: set[str] = set()
    name = playbook.steps[0].name
    while name not in TERMINALS:
        if name in seen:  # the loader rejects cycles; guard anyway
            return path, "escalate"
        seen.add(name)
        step = playbook.step(name)
        path.append(f"{step.name} ({step.action})" if step.action else f"{step.name} (wait for {step.wait_healthy})")
        name = next((step.next[o] for o in _HAPPY if o in step.next), "escalate")
    return path, name


@dataclass(frozen=True)
class ShadowRow:
    """One playbook's shadow evidence over a period."""

    type: str
    mode: str | None  # the playbook's mode now (None: no such playbook any more)
    incidents: int
    would_have_acted: int
    would_have_resolved: int
    held_or_blocked: int
    resolved_since: int  # of those incidents, how many are resolved now (by a human, or on their own)
    shadow_by: str | None = None  # the human whose override keeps it in shadow (None: its YAML, or not in shadow)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def shadow_report(
    target: str | psycopg.Connection[Any], *, since: timedelta = timedelta(days=30),
    playbooks: list[Playbook] | None = None,
) -> list[ShadowRow]:
    """Per playbook with shadow decisions in the period: incidents, would have acted, would have resolved."""
    from fleetmedic.safety.modes import list_overrides

    modes: dict[str, str | None] = {pb.type: pb.limits.mode for pb in playbooks or []}
    overrides = {o.type: o.actor for o in list_overrides(target)}
    for t in overrides:
        modes[t] = "shadow"
    with connection(target) as conn, dict_cursor(conn) as cur:
        cur.execute(
            """
            WITH latest AS (
                SELECT DISTINCT ON (e.incident_id) e.incident_id, i.type, i.state, e.data
                FROM incident_events e JOIN incidents i ON i.id = e.incident_id
                WHERE e.step = 'gate' AND (e.data->>'shadow')::boolean AND e.at > now() - %s
                ORDER BY e.incident_id, e.id DESC
            )
            SELECT type,
                   count(*) AS incidents,
                   count(*) FILTER (WHERE data->>'would' = 'act') AS would_have_acted,
                   count(*) FILTER (WHERE data->>'would' = 'act' AND (data->>'would_resolve')::boolean)
                       AS would_have_resolved,
                   count(*) FILTER (WHERE data->>'would' <> 'act') AS held_or_blocked,
                   count(*) FILTER (WHERE state = 'resolved') AS resolved_since
            FROM latest GROUP BY type ORDER BY type
            """,
            (since,),
        )
        rows = cur.fetchall()
    found = {r["type"]: r for r in rows}
    out = [
        ShadowRow(type=t, mode=modes.get(t), incidents=int(r["incidents"]),
                  would_have_acted=int(r["would_have_acted"]), would_have_resolved=int(r["would_have_resolved"]),
                  held_or_blocked=int(r["held_or_blocked"]), resolved_since=int(r["resolved_since"]),
                  shadow_by=overrides.get(t))
        for t, r in found.items()
    ]
    for t, mode in modes.items():  # playbooks in shadow with no incident yet still show up
        if mode == "shadow" and t not in found:
            out.append(ShadowRow(t, mode, 0, 0, 0, 0, 0, overrides.get(t)))
    return sorted(out, key=lambda r: r.type)
