"""A playbook step that hangs past its timeout pages exactly once (real Airflow, real frozen server)."""

from __future__ import annotations

import os
import signal

import psycopg
import pytest

from fleetmedic.incidents.store import IncidentStore
from fleetmedic.inventory import get_resource
from fleetmedic.localfleet.fleet import cluster_for

pytestmark = pytest.mark.e2e

DAG = "playbook_hang_drill"


def test_step_that_hangs_past_its_timeout_escalates_and_pages_once(stack, airflow):
    airflow.wait_for_dags([DAG], timeout=180)
    with psycopg.connect(stack.ops_dsn) as conn:
        res = get_resource(conn, "pg2b")
        # Keep the sweep's own resource_down playbook off this server while it is frozen.
        conn.execute("INSERT INTO silences (resource_id, type, ends_at, reason, created_by) "
                     "VALUES (%s, 'resource_down', now() + interval '10 minutes', 'step timeout drill', "
                     "'human:e2e')", (res.id,))
    cluster = cluster_for(res.attrs, res.port)
    postmaster = int(cluster.pidfile.read_text().splitlines()[0])
    store = IncidentStore(stack.ops_dsn)
    incident, _ = store.open_or_refresh_incident(res.id, "hang_drill", actor="human:e2e",
                                                 reason="drill: frozen server", state="held")
    os.kill(postmaster, signal.SIGSTOP)
    try:
        run_id = f"drill-{incident.id}"
        airflow.trigger(DAG, run_id=run_id, conf={"incident_id": incident.id, "reason": "timeout drill"})
        run = airflow.wait_for_run(DAG, run_id, timeout=240)
    finally:
        os.kill(postmaster, signal.SIGCONT)
        with psycopg.connect(stack.ops_dsn) as conn:
            conn.execute("UPDATE silences SET removed_at = now() WHERE reason = 'step timeout drill'")
    assert run["state"] == "failed"
    tis = {ti["task_id"]: ti["state"] for ti in airflow.task_instances(DAG, run_id)}
    assert tis["step_restart"] == "failed"
    log = airflow.task_log(DAG, run_id, "step_restart")
    assert "Timeout" in log or "timeout" in log

    final = store.get(incident.id)
    assert final.state == "escalated"
    assert "step_restart failed" in final.reason and "Timeout" in final.reason
    with psycopg.connect(stack.ops_dsn) as conn:
        pages = conn.execute("SELECT action, details FROM pages WHERE incident_id = %s", (incident.id,)).fetchall()
    assert len(pages) == 1 and pages[0][0] == "trigger"
    assert pages[0][1]["run_url"].endswith(f"/dags/{DAG}/runs/{run_id}")
    assert any("running postgres.restart on pg2b" in t for t in pages[0][1]["tried"])
    store.resolve(incident.id, actor="human:e2e", reason="drill over")
