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
