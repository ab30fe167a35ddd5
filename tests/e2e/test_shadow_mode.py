"""End to end, in a real Airflow: shadow mode on blocking_queries, then promotion on its evidence.

An operator puts the blocking_queries playbook in shadow (`fleetmedic shadow on`). A real blocked
query on pg3a is found by the sweep; its playbook run records what it would have done and escalates
with one page; the blocker is not touched and the queued updates keep waiting; `fleetmedic shadow
report` counts it as "would have resolved". The operator then takes the playbook out of shadow and
retries the incident: the same playbook ends the blocker and the queued updates commit.

Resources: pg3a (pg1a met blocking_queries earlier in the session, and its resource cooldown would
rightly make the shadow decision "would not act"), left healthy and unblocked.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import psycopg
import pytest

from fleetmedic.incidents.store import IncidentStore
from fleetmedic.inventory import Resource, get_resource
from fleetmedic.localfleet.faults import inject
from fleetmedic.localfleet.faults.queries import BLOCK_TABLE
from fleetmedic.safety.modes import clear_shadow, get_override

pytestmark = pytest.mark.e2e

DAG = "playbook_blocking_queries"
TYPE = "blocking_queries"


def _resource(stack, name: str) -> Resource:
    with psycopg.connect(stack.ops_dsn) as conn:
        return get_resource(conn, name)


def _pg(res: Resource) -> str:
    return f"postgresql://postgres@{res.host}:{res.port}/postgres"


def _counter(res: Resource) -> int:
    """The row the fault's queued clients update (0 before the first block created it)."""
    with psycopg.connect(_pg(res)) as conn:
        conn.execute("SET lock_timeout = '2s'")
        if conn.execute("SELECT to_regclass(%s)", (BLOCK_TABLE,)).fetchone() == (None,):
            return 0
        row = conn.execute(f"SELECT n FROM {BLOCK_TABLE} WHERE id = 1").fetchone()
    return int(row[0]) if row else 0


def _session_state(res: Resource, pid: int) -> str | None:
    with psycopg.connect(_pg(res)) as conn:
        row = conn.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return row[0] if row else None


def _waiting_on_locks(res: Resource, pids: list[int]) -> int:
    """How many of these sessions are still there, waiting on a lock (the blocker holds the table's)."""
    with psycopg.connect(_pg(res)) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s) AND wait_event_type = 'Lock'",
                           (pids,)).fetchone()
    return int(row[0]) if row else 0


def _trail(store: IncidentStore, incident_id: int) -> str:
    return "\n".join(f"{e.at:%H:%M:%S} {e.from_state}->{e.to_state} [{e.step}] {e.actor}: {e.reason}"
                     for e in store.events(incident_id))


def _finished(store: IncidentStore, resource_id: int, since: datetime):
    found = [i for i in store.list(resource_id=resource_id, type=TYPE, limit=20)
             if i.opened_at >= since and i.state in ("resolved", "escalated")]
    return found[0] if found else None




def test_shadow_blocking_queries_is_reported_and_escalated_not_terminated_then_promoted_it_resolves(
        stack, airflow, wait_until, cli):
    store = IncidentStore(stack.ops_dsn)
    pg3a = _resource(stack, "pg3a")
    out = cli("shadow", "on", TYPE, "--reason", "trial before promotion")
    assert "is in shadow mode now" in out.output
    since = datetime.now(UTC)
    before = _counter(pg3a)
    with psycopg.connect(stack.ops_dsn) as conn:
        pages_before = conn.execute("SELECT coalesce(max(id), 0) FROM pages").fetchone()[0]
    blocked = inject("block", stack.ops_dsn, "pg3a")  # app_user idle in transaction, 2 updates queued
    blocker = blocked.data["blocker_session_pid"]
    try:
        incident = wait_until(lambda: _finished(store, pg3a.id, since), 240,
                              "the blocking_queries incident on pg3a to finish", interval=3)
        trail = _trail(store, incident.id)
        assert incident.state == "escalated", trail
        # Reported: the incident names the blocker.
        assert str(blocker) in store.events(incident.id)[0].reason, trail
        # Its gate recorded the plan it would have run, and that nothing would have stopped it.
        gate = [e for e in store.events(incident.id) if e.step == "gate" and e.to_state == "remediating"][-1]
        assert gate.reason.startswith("shadow mode (put in shadow by human:e2e-oncall at "), trail
        assert ("trial before promotion): would run cancel (postgres.cancel_blockers) -> verify_cancel (wait for "
                "postgres.blocking_queries) -> resolve on pg3a") in gate.reason, trail
        assert gate.data["would"] == "act" and gate.data["would_resolve"] is True, gate.data
        assert not [e for e in store.events(incident.id) if (e.data or {}).get("step_status") == "acting"], trail
        assert incident.reason.startswith("automation could not fix it: shadow mode"), incident.reason
        assert airflow.wait_for_run(DAG, f"incident-{incident.id}", timeout=60, echo=False)["state"] == "success"
        # Escalated with exactly one page, which says why.
        with psycopg.connect(stack.ops_dsn) as conn:
            pages = conn.execute("SELECT incident_id, summary FROM pages WHERE id > %s AND action = 'trigger'",
                                 (pages_before,)).fetchall()
        assert len(pages) == 1 and pages[0][0] == incident.id and "shadow mode" in pages[0][1], pages
        # Not terminated: the blocker still sits idle in its transaction and the queued updates still wait.
        assert _session_state(pg3a, blocker) == "idle in transaction"
        assert _waiting_on_locks(pg3a, blocked.data["waiting_session_pids"]) == len(blocked.data["waiting_session_pids"])
        # The evidence to promote it: one incident, would have acted, would have resolved.
        report = json.loads(cli("shadow", "report", "--json").output)
        [row] = [r for r in report if r["type"] == TYPE]
        assert (row["mode"], row["shadow_by"], row["incidents"], row["would_have_acted"],
                row["would_have_resolved"]) == ("shadow", "human:e2e-oncall", 1, 1, 1), report

        # Promoted on that evidence: out of shadow, the human retries, the playbook ends the blocker.
        out = cli("shadow", "off", TYPE, "--reason", "shadow report: would have resolved")
        assert "shadow override removed" in out.output
        out = cli("incidents", "retry", str(incident.id), "--reason",
                   "promoted; let the playbook end the blocker", "--json")
        retry_run = json.loads(out.output)["dag_run_id"]
        assert airflow.wait_for_run(DAG, retry_run, timeout=240)["state"] == "success"
        done = store.get(incident.id)
        assert done.state == "resolved", _trail(store, incident.id)
        steps = {e.step: e.reason for e in store.events(incident.id)
                 if e.step and (e.data or {}).get("step_status") == "done"}
        assert f"terminated pid {blocker} (app_user" in steps["terminate"], steps
        assert wait_until(lambda: _counter(pg3a) == before + 2, 30, "both queued updates to commit")
        assert _session_state(pg3a, blocker) is None
    finally:
        if get_override(stack.ops_dsn, TYPE) is not None:
            clear_shadow(stack.ops_dsn, TYPE, actor="human:e2e-cleanup", reason="test cleanup")
        inject("unblock", stack.ops_dsn, "pg3a")
