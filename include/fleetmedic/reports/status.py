"""The live status of the fleet for operators: health, active incidents, breakers, undelivered pages.

One read-only snapshot shared by `fleetmedic status`, the REPL and the Airflow UI page.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import psycopg

from fleetmedic.db.connect import connect

__all__ = ["active_incidents", "breaker_states", "fleet_status"]

log = logging.getLogger("fleetmedic.reports")

ACTIVE = ("open", "remediating", "await_resolution", "held", "escalated")

_FLEET = """
SELECT r.kind, count(*) AS resources,
       count(*) FILTER (WHERE NOT r.enabled) AS disabled,
       count(*) FILTER (WHERE r.enabled AND h.failing > 0) AS unhealthy,
       count(*) FILTER (WHERE r.enabled AND h.checks IS NULL) AS not_probed
FROM resources r
LEFT JOIN (SELECT resource_id, count(*) AS checks, count(*) FILTER (WHERE NOT healthy) AS failing
           FROM health GROUP BY resource_id) h ON h.resource_id = r.id
GROUP BY r.kind ORDER BY r.kind
"""

_UNHEALTHY = """
SELECT r.name AS resource, r.kind, h.check_name AS "check", h.reason, h.consecutive_failures AS failures,
       h.first_failure_at AS failing_since, h.checked_at
FROM health h JOIN resources r ON r.id = h.resource_id
WHERE NOT h.healthy AND r.enabled
ORDER BY h.first_failure_at NULLS LAST, r.name, h.check_name
LIMIT %(limit)s
"""

_BY_STATE = """
SELECT state, count(*) AS incidents, min(opened_at) AS oldest_opened_at
FROM incidents WHERE state = ANY(%(active)s) GROUP BY state
"""

_ACTIVE_LIST = """
SELECT i.id, i.type, r.name AS resource, i.state, i.step, i.owner_run_id, i.severity, i.opened_at,
       i.last_seen_at, i.detections, i.reason
FROM incidents i JOIN resources r ON r.id = i.resource_id
WHERE i.state = ANY(%(active)s)
ORDER BY CASE i.state WHEN 'escalated' THEN 0 WHEN 'held' THEN 1 WHEN 'open' THEN 2 ELSE 3 END, i.opened_at
LIMIT %(limit)s
"""

_PAGES = """
SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       min(created_at) FILTER (WHERE status = 'pending') AS oldest_pending_at,
       (array_agg(last_error ORDER BY id DESC) FILTER (WHERE last_error IS NOT NULL AND status <> 'delivered'))[1]
           AS last_error
FROM pages WHERE status <> 'delivered'
"""

# When the safety module's `breakers` table is not there: the latest breaker_events row per breaker.
_BREAKERS_FROM_EVENTS = """
SELECT DISTINCT ON (breaker) breaker AS name, state, reason, at AS changed_at, actor AS changed_by
FROM breaker_events ORDER BY breaker, id DESC
"""


def active_incidents(dsn: str | psycopg.Connection[Any], limit: int = 50) -> list[dict[str, Any]]:
    """Active incidents (escalated and held first, then oldest first) with their resource's name."""
    from fleetmedic.db.connect import connection

    with connection(dsn) as conn:
        return list(conn.execute(_ACTIVE_LIST, {"active": list(ACTIVE), "limit": limit}).fetchall())


def breaker_states(dsn: str) -> list[dict[str, Any]]:
    """Every breaker with its state (open ones first); [] when there are none or no breaker tables yet.

    Uses fleetmedic.safety.breakers when it is there (the `breakers` table is the truth), and falls
    back to the latest `breaker_events` row per breaker otherwise.
    """
    try:
        from fleetmedic.safety.breakers import list_breakers
    except ImportError:
        list_breakers = None  # type: ignore[assignment]
    if list_breakers is not None:
        try:
            rows = [b.as_dict() for b in list_breakers(dsn)]
            return sorted(rows, key=lambda b: (b["state"] == "closed", b["name"]))
        except psycopg.errors.UndefinedTable:
            pass
        except Exception as exc:  # the status page must not die with the safety module
            log.warning("breakers unavailable through fleetmedic.safety (%s); reading breaker_events", exc)
    try:
        with connect(dsn) as conn:
            rows = list(conn.execute(_BREAKERS_FROM_EVENTS).fetchall())
    except psycopg.errors.UndefinedTable:
        return []
    return sorted(rows, key=lambda b: (b["state"] == "closed", b["name"]))


def _shadow_overrides(dsn: str) -> list[dict[str, Any]]:
    """Playbooks a human put in shadow (`fleetmedic shadow on`): they act on nothing until `shadow off`."""
    from fleetmedic.safety.modes import list_overrides

    return [o.as_dict() for o in list_overrides(dsn)]


def fleet_status(dsn: str, *, limit: int = 20) -> dict[str, Any]:
    """The fleet right now: health per kind (and what is failing), active incidents by state (and the
    most urgent ones), breakers, and pages not delivered yet."""
    now = datetime.now(UTC)
    with connect(dsn, application_name="fleetmedic-status") as conn:
        kinds = list(conn.execute(_FLEET).fetchall())
        unhealthy = list(conn.execute(_UNHEALTHY, {"limit": limit}).fetchall())
        by_state = {r["state"]: r for r in conn.execute(_BY_STATE, {"active": list(ACTIVE)}).fetchall()}
        incidents = active_incidents(conn, limit)
        pages = conn.execute(_PAGES).fetchone() or {}
    breakers = breaker_states(dsn)
    states = [
        {"state": s, "incidents": int(by_state[s]["incidents"]) if s in by_state else 0,
         "oldest_opened_at": by_state[s]["oldest_opened_at"] if s in by_state else None}
        for s in ACTIVE
    ]
    return {
        "at": now,
        "fleet": {
            "resources": sum(int(k["resources"]) for k in kinds),
            "unhealthy": sum(int(k["unhealthy"]) for k in kinds),
            "not_probed": sum(int(k["not_probed"]) for k in kinds),
            "disabled": sum(int(k["disabled"]) for k in kinds),
            "by_kind": [{k: (int(v) if isinstance(v, int) else v) for k, v in row.items()} for row in kinds],
            "failing_checks": unhealthy,
        },
        "incidents": {
            "active": sum(s["incidents"] for s in states),
            "by_state": states,
            "most_urgent": incidents,
        },
        "breakers": breakers,
        "breakers_open": [b["name"] for b in breakers if b["state"] != "closed"],
        "shadow_overrides": _shadow_overrides(dsn),
        "pages": {
            "pending": int(pages.get("pending") or 0),
            "failed": int(pages.get("failed") or 0),
            "undelivered": int(pages.get("pending") or 0) + int(pages.get("failed") or 0),
            "oldest_pending_at": pages.get("oldest_pending_at"),
            "last_error": pages.get("last_error"),
        },
    }
