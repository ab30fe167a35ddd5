"""Turn confirmed findings into incidents and the playbook runs they need (the sweep's last steps)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg

__all__ = ["SweepSummary", "open_incidents_for_findings", "playbook_run_for"]


@dataclass
class SweepSummary:
    probed: int = 0
    unhealthy: int = 0
    opened: int = 0
    refreshed: int = 0
    held: int = 0
    silenced: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return (f"sweep: probed={self.probed} unhealthy={self.unhealthy} opened={self.opened} "
                f"refreshed={self.refreshed} held={self.held} silenced={self.silenced} seconds={self.seconds:.1f}")


def playbook_run_for(incident_id: int, dag_id: str, version: int = 1) -> dict[str, Any]:
    """TriggerDagRunOperator kwargs: the run id is deterministic, so a repeated trigger is a no-op.

    An incident released back to open (a breaker reset, a silence lifted) is at a later version and
    gets a new run, `incident-<id>-v<version>`; while it stays open the version, and so the id, holds.
    """
    run_id = f"incident-{incident_id}" if version <= 1 else f"incident-{incident_id}-v{version}"
    return {"trigger_dag_id": dag_id, "trigger_run_id": run_id, "conf": {"incident_id": incident_id}}


def _active_silences(conn: psycopg.Connection) -> list[tuple[int | None, str | None]]:
    rows = conn.execute(
        "SELECT resource_id, type FROM silences WHERE removed_at IS NULL AND starts_at <= now() AND ends_at > now()"
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def open_incidents_for_findings(
    ops_dsn: str, shard_events: Iterable[Mapping[str, Any]], playbook_dags: Mapping[str, str]
) -> tuple[SweepSummary, list[dict[str, Any]]]:
    """Open or refresh one incident per confirmed (resource, type); return the playbook runs to start.

    Runs are requested for every incident still `open` (not only the new ones): a trigger lost
    between opening and starting is retried, and the deterministic run id keeps it to one run.
    """
    from fleetmedic.incidents.store import IncidentStore

    summary = SweepSummary()
    findings: dict[tuple[int, str], dict[str, Any]] = {}
    for ev in shard_events:
        if not ev:
            continue
        summary.probed += int(ev.get("probes", 0))
        summary.unhealthy += int(ev.get("unhealthy", 0))
        summary.seconds = max(summary.seconds, float(ev.get("seconds", 0)))
        for f in ev.get("findings", []):
            findings[(int(f["resource_id"]), str(f["type"]))] = f
    # The mass-failure guard (safety/guard.py): too much of the fleet failing at once trips the global
    # breaker, and new incidents open held until a human resets it (one page, no remediation).
    from fleetmedic.safety.guard import guard_sweep

    guard = guard_sweep(ops_dsn, findings.values())
    with psycopg.connect(ops_dsn) as conn:
        silences = _active_silences(conn)
    kept = []
    for (rid, typ), f in findings.items():
        if any((s_rid in (None, rid)) and (s_typ in (None, typ)) for s_rid, s_typ in silences):
            summary.silenced += 1
            continue
        kept.append(f)
    if kept:
        # A database on a server that is down waits for the server's playbook (detection/correlation.py).
        from fleetmedic.detection.correlation import defer_findings_explained_by_servers

        with psycopg.connect(ops_dsn) as conn:
            kept, _deferred = defer_findings_explained_by_servers(conn, kept)
    store = IncidentStore(ops_dsn)
    if kept:
        results = store.open_or_refresh_many(
            [(int(f["resource_id"]), f["type"], f["reason"], f.get("severity", "critical")) for f in kept],
            actor="detection:fleet_sweep", state=guard.initial_state,
        )
        for _incident_id, created in results:
            if created:
                summary.opened += 1
                summary.held += int(guard.hold_new)
            else:
                summary.refreshed += 1
    runs = [
        playbook_run_for(inc.id, playbook_dags[inc.type], inc.version)
        for inc in store.list(state="open", limit=10000)
        if inc.type in playbook_dags
    ]
    return summary, runs
