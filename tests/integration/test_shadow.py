"""Shadow mode on blocking_queries against a real blocked PostgreSQL session: reported, escalated, not terminated."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import psycopg
from helpers import add_resource, query
from psycopg.conninfo import conninfo_to_dict
from typer.testing import CliRunner

from fleetmedic.console.cli import app
from fleetmedic.detection.checks import Target, run_one
from fleetmedic.detection.incidents import open_incidents_for_findings
from fleetmedic.incidents.store import IncidentStore
from fleetmedic.playbooks.loader import default_playbooks_dir, load_playbook
from fleetmedic.playbooks.schema import Limits
from fleetmedic.safety.config import SafetyConfig
from fleetmedic.safety.gate import evaluate_gate
from fleetmedic.safety.shadow import happy_path, shadow_report

DAG = "playbook_blocking_queries"


def shadow_playbook():
    pb = load_playbook(default_playbooks_dir() / "blocking_queries.yaml")
    return pb.model_copy(update={"limits": Limits(**{**pb.limits.model_dump(), "mode": "shadow"})})


def test_happy_path_follows_ok_and_healthy_to_a_terminal():
    path, terminal = happy_path(shadow_playbook())
    assert path == ["cancel (postgres.cancel_blockers)", "verify_cancel (wait for postgres.blocking_queries)"]
    assert terminal == "resolve"


def test_shadow_blocking_queries_is_reported_escalated_not_terminated_and_would_have_resolved(ops_dsn, redis_url):
    params = conninfo_to_dict(ops_dsn)
    port, dbname = int(params["port"]), str(params["dbname"])
    query(ops_dsn, "CREATE TABLE accounts (id int PRIMARY KEY, balance int)")
    rid = add_resource(ops_dsn, "pg-busy", port=port)
    attrs = {"dbname": dbname, "user": "postgres", "blocking_threshold_seconds": 0.5}
    query(ops_dsn, "UPDATE resources SET attrs = %s::jsonb WHERE id = %s", (json.dumps(attrs), rid))

    # A session takes a lock and sits idle in its transaction; a customer's query queues behind it.
    blocker = psycopg.connect(ops_dsn, application_name="shadow-test-blocker")
    blocker.execute("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
    blocker_pid = blocker.info.backend_pid
    victim_done = threading.Event()

    def victim() -> None:
        with psycopg.connect(ops_dsn, application_name="shadow-test-victim") as conn:
            conn.execute("SELECT count(*) FROM accounts")
        victim_done.set()

    thread = threading.Thread(target=victim, daemon=True)
    thread.start()
    try:
        time.sleep(1.5)
        result = asyncio.run(run_one(Target(rid, "pg-busy", "postgres", "127.0.0.1", port, attrs),
                                     "postgres.blocking_queries", 5.0))
        assert not result.healthy and f"pid(s) {blocker_pid}" in result.reason  # reported, naming the blocker

        finding = {"resource_id": rid, "type": "blocking_queries", "check": "postgres.blocking_queries",
                   "severity": "error", "reason": result.reason}
        summary, runs = open_incidents_for_findings(ops_dsn, [{"probes": 1, "unhealthy": 1, "findings": [finding]}],
                                                    {"blocking_queries": DAG})
        assert summary.opened == 1 and len(runs) == 1
        store = IncidentStore(ops_dsn)
        [incident] = store.list(type="blocking_queries")
        run_id = runs[0]["trigger_run_id"]
        store.claim(incident.id, run_id=run_id, actor=f"automation:{DAG}/claim", reason=f"claimed by run {run_id}")

        decision = evaluate_gate(ops_dsn, redis_url, incident.id, shadow_playbook(), run_id=run_id,
                                 actor=f"automation:{DAG}/gate", config=SafetyConfig(redis_timeout=1.0))
        assert decision.outcome == "escalate"
        assert decision.reason.startswith("shadow mode (limits.mode: shadow): would run cancel (postgres.cancel_blockers)")
        assert decision.data["would"] == "act" and decision.data["would_resolve"] is True
        store.set_step(incident.id, run_id=run_id, step="gate", actor=f"automation:{DAG}/gate", reason=decision.reason,
                       data={**decision.event_data(), "run_id": run_id, "step_status": "done", "next": "escalate"})
        store.escalate(incident.id, actor=f"automation:{DAG}/escalate", details={},
                       reason=f"automation could not fix it: {decision.reason}")

        # Escalated with one page that says shadow, and the blocker is still there: nothing was terminated.
        assert store.get(incident.id).state == "escalated"
        pages = query(ops_dsn, "SELECT summary FROM pages WHERE incident_id = %s", (incident.id,))
        assert len(pages) == 1 and "shadow mode" in pages[0]["summary"]
        alive = query(ops_dsn, "SELECT state FROM pg_stat_activity WHERE pid = %s", (blocker_pid,))
        assert alive == [{"state": "idle in transaction"}]
        assert not victim_done.is_set()

        [row] = shadow_report(ops_dsn, playbooks=[shadow_playbook()])
        assert (row.type, row.mode, row.incidents, row.would_have_acted, row.would_have_resolved) == (
            "blocking_queries", "shadow", 1, 1, 1)
        cli = CliRunner().invoke(app, ["shadow", "report", "--dsn", ops_dsn, "--json"])
        assert cli.exit_code == 0, cli.output
        assert [(r["type"], r["would_have_resolved"]) for r in json.loads(cli.output)] == [("blocking_queries", 1)]
    finally:
        blocker.rollback()
        blocker.close()
        thread.join(10)
    assert victim_done.is_set()


def active_playbook():
    pb = load_playbook(default_playbooks_dir() / "blocking_queries.yaml")
    assert pb.limits.mode == "active"
    return pb


def _claimed(ops_dsn: str, name: str) -> tuple[int, str]:
    store = IncidentStore(ops_dsn)
    rid = add_resource(ops_dsn, name)
    incident, created = store.open_or_refresh_incident(rid, "blocking_queries", actor="detection:test",
                                                       reason="blocked 12s behind pid 4242")
    assert created
    run_id = f"incident-{incident.id}"
    store.claim(incident.id, run_id=run_id, actor=f"automation:{DAG}/claim", reason=f"claimed by run {run_id}")
    return incident.id, run_id


def _gate(ops_dsn: str, redis_url: str, incident_id: int, run_id: str):
    return evaluate_gate(ops_dsn, redis_url, incident_id, active_playbook(), run_id=run_id,
                         actor=f"automation:{DAG}/gate", config=SafetyConfig(redis_timeout=1.0))


def test_a_human_puts_an_active_playbook_in_shadow_now_and_takes_it_out_audited(ops_dsn, redis_url):
    from fleetmedic.safety.gate import action_permit
    from fleetmedic.safety.modes import clear_shadow, get_override, set_shadow

    first = _claimed(ops_dsn, "pg-a")
    assert _gate(ops_dsn, redis_url, *first).outcome == "proceed"

    change = set_shadow(ops_dsn, "blocking_queries", actor="human:alice", reason="cancelled a batch job by mistake")
    assert change.changed and change.override is not None and change.override.actor == "human:alice"
    again = set_shadow(ops_dsn, "blocking_queries", actor="human:bob", reason="me too")
    assert not again.changed and "already in shadow mode" in again.message and "human:alice" in again.message

    # A new run meets the override at its gate: it records what it would do and escalates.
    second = _claimed(ops_dsn, "pg-b")
    decision = _gate(ops_dsn, redis_url, *second)
    assert decision.outcome == "escalate"
    assert decision.reason.startswith("shadow mode (put in shadow by human:alice at ")
    assert "cancelled a batch job by mistake): would run cancel (postgres.cancel_blockers)" in decision.reason
    assert decision.data["would_resolve"] is True and decision.data["shadow_by"] == "human:alice"

    # The run that passed its gate before the override stops before its action.
    store = IncidentStore(ops_dsn)
    with action_permit(ops_dsn, redis_url, store.get(first[0]), run_id=first[1], step="cancel",
                       action="postgres.cancel_blockers", actor=f"automation:{DAG}/step_cancel",
                       config=SafetyConfig(redis_timeout=1.0, lease_wait=0.0)) as permit:
        assert not permit.allowed and permit.outcome == "escalate"
        assert permit.reason.startswith("not running postgres.cancel_blockers: playbook_blocking_queries was put in "
                                        "shadow by human:alice")

    # The shadow report shows the override and who set it, with the evidence it collects.
    store.set_step(second[0], run_id=second[1], step="gate", actor=f"automation:{DAG}/gate", reason=decision.reason,
                   data={**decision.event_data(), "run_id": second[1], "step_status": "done", "next": "escalate"})
    [row] = shadow_report(ops_dsn, playbooks=[active_playbook()])
    assert (row.type, row.mode, row.shadow_by, row.incidents, row.would_have_resolved) == (
        "blocking_queries", "shadow", "human:alice", 1, 1)

    # Out of shadow: the YAML's mode (active) applies again; both changes are in the audit table.
    off = clear_shadow(ops_dsn, "blocking_queries", actor="human:alice", reason="job fixed")
    assert off.changed and get_override(ops_dsn, "blocking_queries") is None
    assert not clear_shadow(ops_dsn, "blocking_queries", actor="human:alice", reason="again").changed
    third = _claimed(ops_dsn, "pg-c")
    assert _gate(ops_dsn, redis_url, *third).outcome == "proceed"
    events = query(ops_dsn, "SELECT type, mode, actor, reason FROM playbook_mode_events ORDER BY id")
    assert events == [
        {"type": "blocking_queries", "mode": "shadow", "actor": "human:alice", "reason": "cancelled a batch job by mistake"},
        {"type": "blocking_queries", "mode": "playbook", "actor": "human:alice", "reason": "job fixed"},
    ]


def test_shadow_overrides_need_a_human_and_a_reason(ops_dsn):
    import pytest

    from fleetmedic.safety.modes import set_shadow

    with pytest.raises(ValueError, match="needs a reason"):
        set_shadow(ops_dsn, "blocking_queries", actor="human:alice", reason="  ")
    with pytest.raises(ValueError, match=r"overridden by a human \(actor human:<name>\), not 'automation:x'"):
        set_shadow(ops_dsn, "blocking_queries", actor="automation:x", reason="why")
    assert query(ops_dsn, "SELECT count(*) AS n FROM playbook_mode_events") == [{"n": 0}]


def test_console_shadow_on_off_and_report(ops_dsn, monkeypatch):
    monkeypatch.setenv("FLEETMEDIC_USER", "carol")
    runner = CliRunner()
    bad = runner.invoke(app, ["shadow", "on", "blocking_query", "--dsn", ops_dsn, "--reason", "typo"])
    assert bad.exit_code == 2 and "no playbook 'blocking_query' (playbooks: " in bad.output
    assert "blocking_queries" in bad.output
    no_reason = runner.invoke(app, ["shadow", "on", "blocking_queries", "--dsn", ops_dsn])
    assert no_reason.exit_code == 2 and "--reason" in no_reason.output

    on = runner.invoke(app, ["shadow", "on", "blocking_queries", "--dsn", ops_dsn, "--reason", "trial", "--json"])
    assert on.exit_code == 0, on.output
    assert json.loads(on.output)["override"]["actor"] == "human:carol"
    report = runner.invoke(app, ["shadow", "report", "--dsn", ops_dsn, "--json"])
    rows = {r["type"]: r for r in json.loads(report.output)}
    assert (rows["blocking_queries"]["mode"], rows["blocking_queries"]["shadow_by"]) == ("shadow", "human:carol")

    off = runner.invoke(app, ["shadow", "off", "blocking_queries", "--dsn", ops_dsn, "--reason", "done"])
    assert off.exit_code == 0 and "shadow override removed" in off.output
    report = runner.invoke(app, ["shadow", "report", "--dsn", ops_dsn, "--json"])
    assert "blocking_queries" not in {r["type"] for r in json.loads(report.output)}
