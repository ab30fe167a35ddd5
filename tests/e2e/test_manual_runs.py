"""Manual playbook runs with Params, in a real Airflow: refusals, dry runs and start_at."""

from __future__ import annotations

import psycopg
import pytest

from fleetmedic.incidents.store import IncidentStore

pytestmark = pytest.mark.e2e

DAG = "playbook_resource_down"


def _resource_id(stack, name: str) -> int:
    with psycopg.connect(stack.ops_dsn) as conn:
        row = conn.execute("SELECT id FROM resources WHERE name = %s", (name,)).fetchone()
    assert row is not None
    return int(row[0])


def _held_incident(stack, name: str) -> int:
    """A held incident on a healthy resource: the sweep starts runs only for open ones."""
    store = IncidentStore(stack.ops_dsn)
    incident, created = store.open_or_refresh_incident(
        _resource_id(stack, name), "resource_down", actor="human:e2e", reason="opened by the test", state="held")
    assert created
    return incident.id


def _postmaster_pid(stack, name: str) -> int:
    from fleetmedic.inventory import get_resource
    from fleetmedic.localfleet.fleet import cluster_for

    with psycopg.connect(stack.ops_dsn) as conn:
        res = get_resource(conn, name)
    return int(cluster_for(res.attrs, res.port).pidfile.read_text().splitlines()[0])


def test_manual_run_for_a_resolved_incident_is_refused_and_pages_nobody(stack, airflow):
    store = IncidentStore(stack.ops_dsn)
    incident, _ = store.open_or_refresh_incident(_resource_id(stack, "pg1b"), "resource_down",
                                                 actor="human:e2e", reason="for the refusal test", state="held")
    store.resolve(incident.id, actor="human:e2e", reason="fixed by hand")
    events_before = len(store.events(incident.id))

    airflow.trigger(DAG, run_id=f"manual-refused-{incident.id}", conf={"incident_id": incident.id,
                                                                      "reason": "try again"})
    run = airflow.wait_for_run(DAG, f"manual-refused-{incident.id}", timeout=180)
    assert run["state"] == "failed"
    log = airflow.task_log(DAG, f"manual-refused-{incident.id}", "claim")
    assert f"refusing to run playbook_resource_down for incident {incident.id}: it is resolved" in log
    assert store.get(incident.id).state == "resolved"
    assert len(store.events(incident.id)) == events_before
    with psycopg.connect(stack.ops_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pages WHERE incident_id = %s", (incident.id,)).fetchone() == (0,)


def test_dry_run_changes_nothing_and_records_what_it_would_do(stack, airflow):
    store = IncidentStore(stack.ops_dsn)
    incident_id = _held_incident(stack, "pg1b")
    before = store.get(incident_id)
    pid_before = _postmaster_pid(stack, "pg1b")

    run_id = f"manual-dry-{incident_id}"
    airflow.trigger(DAG, run_id=run_id, conf={"incident_id": incident_id, "dry_run": True, "reason": "rehearsal",
                                              "start_at": "restart"})
    assert airflow.wait_for_run(DAG, run_id, timeout=180)["state"] == "success"

    after = store.get(incident_id)
    assert (after.state, after.version, after.owner_run_id) == (before.state, before.version, before.owner_run_id)
    assert _postmaster_pid(stack, "pg1b") == pid_before, "a dry run restarted nothing"
    notes = [ev for ev in store.events(incident_id) if (ev.data or {}).get("dry_run")]
    reasons = [ev.reason for ev in notes]
    assert any("would claim" in r for r in reasons), reasons
    assert any("would run resource.restart on pg1b" in r for r in reasons), reasons
    assert any("would resolve the incident" in r for r in reasons), reasons
    assert all(ev.from_state == ev.to_state == "held" for ev in notes)
    store.resolve(incident_id, actor="human:e2e", reason="test done")


def test_start_at_skips_the_earlier_steps(stack, airflow):
    store = IncidentStore(stack.ops_dsn)
    incident_id = _held_incident(stack, "pg1b")
    pid_before = _postmaster_pid(stack, "pg1b")

    run_id = f"manual-start-at-{incident_id}"
    airflow.trigger(DAG, run_id=run_id, conf={"incident_id": incident_id, "start_at": "verify",
                                              "reason": "operator restarted it by hand"})
    assert airflow.wait_for_run(DAG, run_id, timeout=180)["state"] == "success"

    incident = store.get(incident_id)
    assert incident.state == "resolved"
    steps = [ev.step for ev in store.events(incident_id) if ev.step]
    assert "restart" not in steps and "verify" in steps
    reconfirm = [ev for ev in store.events(incident_id) if ev.step == "reconfirm"]
    assert "start at step 'verify'" in reconfirm[0].reason
    states = [(ev.from_state, ev.to_state) for ev in store.events(incident_id) if ev.from_state != ev.to_state]
    assert states == [(None, "held"), ("held", "open"), ("open", "remediating"), ("remediating", "resolved")]
    reopen = [ev for ev in store.events(incident_id) if ev.to_state == "open"]
    assert "operator restarted it by hand" in reopen[0].reason
    assert _postmaster_pid(stack, "pg1b") == pid_before
    tis = {ti["task_id"]: ti["state"] for ti in airflow.task_instances(DAG, run_id)}
    assert tis["step_restart"] == "skipped" and tis["step_verify"] == "success" and tis["resolve"] == "success"
