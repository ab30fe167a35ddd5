"""End to end, in a real Airflow: a stopped PostgreSQL is found by the sweep and fixed by its playbook."""

from __future__ import annotations

import shutil

import psycopg
import pytest

from fleetmedic.incidents.store import IncidentStore
from fleetmedic.localfleet.fleet import cluster_for

pytestmark = pytest.mark.e2e


def _cluster(stack, name):
    from fleetmedic.inventory import get_resource

    with psycopg.connect(stack.ops_dsn) as conn:
        res = get_resource(conn, name)
    return res, cluster_for(res.attrs, res.port)


def _incident_for(store, resource_id, states):
    for inc in store.list(type="resource_down", resource_id=resource_id, limit=50):
        if inc.state in states:
            return inc
    return None


def test_airflow_ui_answers_and_every_dag_loads(stack, airflow):
    import httpx

    assert httpx.get(stack.airflow.url + "/", timeout=10).status_code == 200
    assert airflow.import_errors() == []
    dags = {d["dag_id"]: d for d in airflow.list_dags()}
    for dag_id in ("fleet_sweep", "pager_outbox", "playbook_resource_down"):
        assert dag_id in dags and not dags[dag_id]["is_paused"]


def test_stopped_postgres_is_restarted_and_resolved(stack, airflow, wait_until):
    store = IncidentStore(stack.ops_dsn)
    res, cluster = _cluster(stack, "pg1a")
    assert cluster.stop(mode="fast")

    incident = wait_until(lambda: _incident_for(store, res.id, {"resolved"}), 300,
                          "the resource_down incident on pg1a to resolve", interval=3)
    run = airflow.wait_for_run("playbook_resource_down", f"incident-{incident.id}", timeout=120)
    assert run["state"] == "success"
    sweeps = airflow.list_runs("fleet_sweep", state="success", limit=50)
    assert sweeps, "no successful fleet_sweep run"

    events = store.events(incident.id)
    assert all(ev.reason.strip() for ev in events), "every event has a reason"
    states = [ev.to_state for ev in events]
    collapsed = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
    assert collapsed == ["open", "remediating", "resolved"], [(e.to_state, e.step, e.reason) for e in events]
    steps = [ev.step for ev in events if ev.step]
    assert "restart" in steps and "verify" in steps
    restart_done = [ev for ev in events if ev.step == "restart" and ev.data.get("step_status") == "done"]
    assert restart_done and "started pg1a" in restart_done[0].reason

    with psycopg.connect(res_dsn := f"postgresql://postgres@127.0.0.1:{res.port}/postgres", connect_timeout=5) as c:
        assert c.execute("SELECT 1").fetchone() == (1,), res_dsn
    with psycopg.connect(stack.ops_dsn) as conn:
        pages = conn.execute("SELECT count(*) FROM pages WHERE incident_id = %s", (incident.id,)).fetchone()
    assert pages == (0,), "a fault automation fixed pages nobody"


@pytest.mark.e2e_last
def test_postgres_that_cannot_restart_escalates_with_exactly_one_page(stack, airflow, wait_until):
    store = IncidentStore(stack.ops_dsn)
    # No follower to fail over to: pg2b loses its data directory too (a follower that answers would
    # be promoted by the failover step, see tests/e2e/test_replication.py).
    _follower, follower_cluster = _cluster(stack, "pg2b")
    follower_cluster.stop(mode="immediate")
    shutil.rmtree(follower_cluster.datadir)
    res, cluster = _cluster(stack, "pg2a")
    cluster.stop(mode="immediate")
    shutil.rmtree(cluster.datadir)

    incident = wait_until(lambda: _incident_for(store, res.id, {"escalated"}), 300,
                          "the resource_down incident on pg2a to escalate", interval=3)
    run = wait_until(
        lambda: (r := airflow.get_run("playbook_resource_down", f"incident-{incident.id}"))["state"]
        in ("success", "failed") and r, 120, "the playbook run to finish")
    assert run["state"] == "success", "the playbook itself escalated (escalate terminal), not a crash"
    events = store.events(incident.id)
    restart = [ev for ev in events if ev.step == "restart" and ev.data.get("step_status") == "done"]
    assert restart and "data directory" in restart[0].reason
    failover = [ev for ev in events if ev.step == "failover" and ev.data.get("step_status") == "done"]
    assert failover and failover[0].reason.startswith("no follower of pg2a can be promoted: pg2b does not answer")
    assert events[-1].to_state == "escalated" and "automation could not fix it" in events[-1].reason

    # Re-detection keeps refreshing the same incident; the page is still one.
    detections = incident.detections
    wait_until(lambda: store.get(incident.id).detections > detections, 180, "a later sweep to refresh it")
    with psycopg.connect(stack.ops_dsn) as conn:
        pages = conn.execute("SELECT action, summary, details FROM pages WHERE incident_id = %s",
                             (incident.id,)).fetchall()
        active = conn.execute("SELECT count(*) FROM incidents WHERE resource_id = %s AND state <> 'resolved'",
                              (res.id,)).fetchone()
    assert len(pages) == 1, pages
    assert pages[0][0] == "trigger" and "pg2a" in pages[0][1]
    assert pages[0][2]["run_url"].endswith(f"/dags/playbook_resource_down/runs/incident-{incident.id}")
    assert active == (1,)
