"""The mass-failure guard: when a sweep sees too much of the fleet fail at once, suspect the monitoring.

When more than `guard_share` of the enabled fleet (default 20%) and at least `guard_min_unhealthy`
resources (default 5) are unhealthy at once, or a canary resource (`attrs.canary: true`) fails, the
global breaker trips (its reason recorded, exactly one page) and new incidents open as `held`, so no
remediation starts. `fleetmedic breakers reset global` releases them (held -> open) and the sweep
starts their playbook runs; after such a human reset the guard does not trip again on a mass failure
for `guard_rearm` (30 minutes: the human judged the failures real), though a failing canary still does.

"Unhealthy now" is every enabled resource with a failing `health` row from the last `guard_recent`
(so resources failing in the same sweep count even before their confirmation rule is met), plus the
sweep's confirmed findings; resources whose incident a human already owns (escalated, or ignored)
do not count: they are known problems, not a sign that the monitor lies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg

from fleetmedic.db.connect import connection, dict_cursor
from fleetmedic.safety.breakers import GLOBAL, BreakerChange, get_breaker, refresh, trip
from fleetmedic.safety.config import SafetyConfig
from fleetmedic.safety.silences import release_lapsed

__all__ = ["FleetHealth", "GuardDecision", "assess_fleet", "guard_sweep", "trip_reason"]

ACTOR = "automation:fleet_sweep/open_incidents"


@dataclass(frozen=True)
class FleetHealth:
    """How much of the fleet a sweep sees failing."""

    fleet: int
    unhealthy: tuple[str, ...]  # resource names
    canaries: tuple[str, ...]
    canaries_failing: tuple[str, ...]

    @property
    def share(self) -> float:
        return len(self.unhealthy) / self.fleet if self.fleet else 0.0


@dataclass
class GuardDecision:
    """What the guard decided for this sweep: whether new incidents open held, and why."""

    hold_new: bool
    tripped: bool
    reason: str
    health: FleetHealth
    breaker_state: str
    changes: list[BreakerChange] = field(default_factory=list)
    released: list[int] = field(default_factory=list)

    @property
    def initial_state(self) -> str:
        """The state new incidents open in: `held` while the global breaker is not closed."""
        return "held" if self.hold_new else "open"


def _finding_resource_id(f: Any) -> int:
    return int(f["resource_id"] if isinstance(f, Mapping) else f.resource_id)


def assess_fleet(
    target: str | psycopg.Connection[Any], findings: Iterable[Any] = (), *, config: SafetyConfig | None = None,
) -> FleetHealth:
    """Count the enabled fleet, the resources unhealthy now, and the canaries failing."""
    cfg = config or SafetyConfig.from_env()
    finding_ids = sorted({_finding_resource_id(f) for f in findings})
    with connection(target) as conn, dict_cursor(conn) as cur:
        cur.execute(
            """
            WITH failing AS (
                SELECT h.resource_id FROM health h
                WHERE NOT h.healthy AND h.checked_at > now() - %(recent)s
                UNION
                SELECT unnest(%(findings)s::bigint[])
            ), owned AS (
                SELECT resource_id FROM incidents
                WHERE state = 'escalated' OR (state = 'ignored' AND ignored_until > now())
            )
            SELECT r.name, COALESCE(r.attrs->>'canary', 'false') = 'true' AS canary,
                   r.id IN (SELECT resource_id FROM failing) AS failing,
                   r.id IN (SELECT resource_id FROM owned) AS owned
            FROM resources r WHERE r.enabled
            ORDER BY r.name
            """,
            {"recent": cfg.guard_recent, "findings": finding_ids},
        )
        rows = cur.fetchall()
    return FleetHealth(
        fleet=len(rows),
        unhealthy=tuple(r["name"] for r in rows if r["failing"] and not r["owned"]),
        canaries=tuple(r["name"] for r in rows if r["canary"]),
        canaries_failing=tuple(r["name"] for r in rows if r["canary"] and r["failing"]),
    )


def trip_reason(health: FleetHealth, config: SafetyConfig) -> str | None:
    """Why the guard trips for this fleet health, or None when it does not."""
    if health.canaries_failing:
        return (f"canary check failed on {', '.join(health.canaries_failing)}: a resource that must always be "
                "healthy is not, so the monitoring is the likelier suspect; remediation stopped")
    n = len(health.unhealthy)
    if n >= config.guard_min_unhealthy and health.share > config.guard_share:
        shown = ", ".join(health.unhealthy[:10]) + (f" and {n - 10} more" if n > 10 else "")
        return (f"mass failure: {n} of {health.fleet} resources ({health.share:.0%}) unhealthy at once, more than "
                f"{config.guard_share:.0%} and at least {config.guard_min_unhealthy} ({shown}); the monitoring is the "
                "likelier suspect, remediation stopped")
    return None


def guard_sweep(
    ops_dsn: str, findings: Iterable[Any] = (), *, config: SafetyConfig | None = None, actor: str = ACTOR,
) -> GuardDecision:
    """Run the guard for one sweep's findings (call it before opening incidents).

    Also moves the breakers along their own clock (half-open after a cooldown, closed after a
    resolved probe) and releases incidents held by silences that ended. When the decision says
    `hold_new`, open the sweep's new incidents in `initial_state` (held).
    """
    cfg = config or SafetyConfig.from_env()
    changes = refresh(ops_dsn, actor=actor)
    released = [i for c in changes for i in c.released]
    released += release_lapsed(ops_dsn, actor=actor)
    health = assess_fleet(ops_dsn, findings, config=cfg)
    reason = trip_reason(health, cfg)
    before = get_breaker(ops_dsn, GLOBAL)
    rearm_at = before.changed_at + cfg.guard_rearm if before.changed_at else None
    if (reason is not None and not health.canaries_failing and before.closed
            and before.changed_by.startswith("human:") and rearm_at and datetime.now(UTC) < rearm_at):
        # A human reset the guard after judging the failures real: let remediation run for a while.
        reason = None
    tripped = False
    if reason is not None:
        change = trip(ops_dsn, GLOBAL, actor=actor, reason=reason, data={
            "fleet": health.fleet, "unhealthy": list(health.unhealthy), "canaries_failing": list(health.canaries_failing),
            "guard_share": cfg.guard_share, "guard_min_unhealthy": cfg.guard_min_unhealthy,
        })
        tripped = change.changed
        changes.append(change)
    g = get_breaker(ops_dsn, GLOBAL)
    if g.closed:
        why = f"{len(health.unhealthy)} of {health.fleet} resources unhealthy: below the guard"
        if trip_reason(health, cfg) is not None:
            why = (f"{len(health.unhealthy)} of {health.fleet} resources unhealthy, but {g.changed_by} reset the "
                   f"global breaker at {g.changed_at:%H:%M:%S}; the guard re-arms at {rearm_at:%H:%M:%S}")
    else:
        why = reason if tripped and reason else f"global breaker is {g.state}: {g.reason}"
    return GuardDecision(hold_new=not g.closed, tripped=tripped, reason=why, health=health,
                         breaker_state=g.state, changes=changes, released=released)
