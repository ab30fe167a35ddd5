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


def playbook_run_for(incident_id: int, dag_id: str) -> dict[str, Any]:
    """TriggerDagRunOperator kwargs: the run id is deterministic, so a repeated trigger is a no-op."""
    return {"trigger_dag_id": dag_id, "trigger_run_id": f"incident-{incident_id}",
            "conf": {"incident_id": incident_id}}


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
            actor="detection:fleet_sweep",
        )
        for _incident_id, created in results:
            if created:
                summary.opened += 1
            else:
                summary.refreshed += 1
    runs = [
        playbook_run_for(inc.id, playbook_dags[inc.type])
        for inc in store.list(state="open", limit=10000)
        if inc.type in playbook_dags
    ]
    return summary, runs
