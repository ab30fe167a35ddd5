"""Settle incidents that wait in await_resolution: resolve them when their check passes again.

A playbook that starts something slow (a base backup) ends at `await_resolution`: automation has
acted, and health must come back by itself. The sweep writes every probe to `health`; this module
reads it after each sweep and resolves each waiting incident whose detect check passed on a probe
taken after the incident started waiting. One that waits longer than `give_up_after` escalates (a
human is paged once): what automation started did not fix it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

__all__ = ["DEFAULT_GIVE_UP_AFTER", "SettleSummary", "settle_awaiting_incidents"]

DEFAULT_GIVE_UP_AFTER = timedelta(hours=2)
ACTOR = "detection:fleet_sweep"


@dataclass
class SettleSummary:
    resolved: list[int] = field(default_factory=list)
    escalated: list[int] = field(default_factory=list)
    waiting: int = 0

    def line(self) -> str:
        return (f"await_resolution: resolved={len(self.resolved)} escalated={len(self.escalated)} "
                f"still_waiting={self.waiting}")


def _checks_by_type(rules: Iterable[Any]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in rules:
        typ = r["type"] if isinstance(r, Mapping) else r.type
        check = r["check"] if isinstance(r, Mapping) else r.check
        out.setdefault(str(typ), set()).add(str(check))
    return out


_WAITING_SQL = """
SELECT i.id, i.type, i.version,
       (SELECT max(e.at) FROM incident_events e WHERE e.incident_id = i.id AND e.to_state = 'await_resolution')
           AS since,
       h.check_name, h.healthy, h.reason, h.checked_at
FROM incidents i
LEFT JOIN health h ON h.resource_id = i.resource_id
WHERE i.state = 'await_resolution'
ORDER BY i.id
"""


def settle_awaiting_incidents(
    ops_dsn: str,
    rules: Iterable[Any],
    *,
    give_up_after: timedelta = DEFAULT_GIVE_UP_AFTER,
    now: datetime | None = None,
) -> SettleSummary:
    """Resolve await_resolution incidents whose detect check passes again; escalate ones waiting too long.

    `rules` are the sweep's DetectRules (or their dicts): they say which check watches which type.
    """
    from fleetmedic.incidents.lifecycle import IncidentError
    from fleetmedic.incidents.store import IncidentStore

    checks = _checks_by_type(rules)
    now = now or datetime.now(UTC)
    with psycopg.connect(ops_dsn) as conn:
        rows = conn.execute(_WAITING_SQL).fetchall()
    waiting: dict[int, dict[str, Any]] = {}
    for inc_id, typ, version, since, check, healthy, reason, checked_at in rows:
        w = waiting.setdefault(inc_id, {"type": typ, "version": version, "since": since, "health": []})
        if check is not None and check in checks.get(typ, ()):
            w["health"].append((check, healthy, reason, checked_at))
    store = IncidentStore(ops_dsn)
    summary = SettleSummary()
    for inc_id, w in waiting.items():
        since = w["since"] or now
        fresh = [h for h in w["health"] if h[3] > since]
        passing = [h for h in fresh if h[1]]
        try:
            if fresh and len(passing) == len(fresh):
                check, _, reason, checked_at = passing[0]
                store.resolve(inc_id, actor=ACTOR, expected_state="await_resolution", expected_version=w["version"],
                              reason=f"{check} passes again (probe at {checked_at:%H:%M:%S} UTC): {reason}")
                summary.resolved.append(inc_id)
            elif now - since > give_up_after:
                last = fresh[-1] if fresh else (w["health"][-1] if w["health"] else None)
                why = f"{last[0]}: {last[2]}" if last else "no probe of its check since"
                store.escalate(
                    inc_id, actor=ACTOR,
                    reason=(f"still not healthy {(now - since).total_seconds() / 60:.0f} min after automation acted "
                            f"(limit {give_up_after.total_seconds() / 60:.0f} min): {why}"),
                    details={"waited_seconds": round((now - since).total_seconds()), "last_check": why},
                )
                summary.escalated.append(inc_id)
            else:
                summary.waiting += 1
        except IncidentError:
            # Someone (a human, another sweep) moved it meanwhile; the next sweep looks again.
            continue
    return summary
