"""Silences against real PostgreSQL and Redis: the sweep opens nothing, the gate holds, lifting releases; the CLI."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from helpers import add_resource, query
from typer.testing import CliRunner

from fleetmedic.console.cli import app
from fleetmedic.detection.incidents import open_incidents_for_findings
from fleetmedic.incidents.store import IncidentStore
from fleetmedic.playbooks.loader import default_playbooks_dir, load_playbook
from fleetmedic.safety.config import SafetyConfig
from fleetmedic.safety.gate import evaluate_gate, hold_incident
from fleetmedic.safety.guard import guard_sweep
from fleetmedic.safety.silences import (
    SilenceError,
    active_silence_for,
    add_silence,
    list_silences,
    remove_silence,
)

DAGS = {"resource_down": "playbook_resource_down"}
CONFIG = SafetyConfig(redis_timeout=1.0)


def sweep(dsn: str, resource_id: int):
    finding = {"resource_id": resource_id, "type": "resource_down", "check": "postgres.connect",
               "severity": "critical", "reason": "postgres.connect failed 2 times over 12s"}
    return open_incidents_for_findings(dsn, [{"probes": 1, "unhealthy": 1, "findings": [finding]}], DAGS)


def expire(dsn: str, silence_id: int) -> None:
    query(dsn, "UPDATE silences SET starts_at = now() - interval '2 hours', ends_at = now() - interval '1 second' "
               "WHERE id = %s", (silence_id,))


def test_a_silenced_resource_with_a_fault_opens_nothing_until_the_silence_expires(ops_dsn):
    rid = add_resource(ops_dsn, "pg-maint")
    silence = add_silence(ops_dsn, resource="pg-maint", incident_type=None, duration=timedelta(hours=2),
                          reason="kernel upgrade, OPS-42", created_by="human:alice")
    assert silence.active and silence.resource_id == rid

    summary, runs = sweep(ops_dsn, rid)
    assert (summary.silenced, summary.opened, runs) == (1, 0, [])
    assert IncidentStore(ops_dsn).list(resource_id=rid) == []

    expire(ops_dsn, silence.id)
    summary, runs = sweep(ops_dsn, rid)
    assert (summary.silenced, summary.opened, len(runs)) == (0, 1, 1)


def test_the_gate_holds_a_silenced_incident_and_lifting_the_silence_releases_it(ops_dsn, redis_url):
    rid = add_resource(ops_dsn, "pg-quiet")
    store = IncidentStore(ops_dsn)
    incident, _ = store.open_or_refresh_incident(rid, "resource_down", actor="detection:postgres.connect",
                                                 reason="down")
    store.claim(incident.id, run_id="incident-1", actor="automation:playbook_resource_down/claim", reason="claimed")
    # The silence arrives after the incident opened, before its run reaches the gate.
    silence = add_silence(ops_dsn, resource=rid, incident_type="resource_down", duration=timedelta(minutes=30),
                          reason="migrating the volume", created_by="human:bob")
    pb = load_playbook(default_playbooks_dir() / "resource_down.yaml")
    decision = evaluate_gate(ops_dsn, redis_url, incident.id, pb, run_id="incident-1",
                             actor="automation:playbook_resource_down/gate", config=CONFIG)
    assert decision.outcome == "hold" and decision.held_by == f"silence:{silence.id}"
    assert "migrating the volume" in decision.reason and "pg-quiet" in decision.reason
    hold_incident(store, incident.id, run_id="incident-1", actor="automation:playbook_resource_down/hold",
                  reason=f"held: {decision.reason}", held_by=decision.held_by)

    # A human run passes a silence (they asked for it).
    manual = evaluate_gate(ops_dsn, redis_url, incident.id, pb, run_id="incident-1-retry-1", manual=True,
                           actor="automation:playbook_resource_down/gate", config=CONFIG)
    assert manual.outcome == "proceed"

    lifted, released = remove_silence(ops_dsn, silence.id, actor="human:bob", reason="volume migrated")
    assert released == [incident.id] and store.get(incident.id).state == "open"
    assert (lifted.removed_by, lifted.removed_reason, lifted.active) == ("human:bob", "volume migrated", False)
    with pytest.raises(SilenceError, match="already removed"):
        remove_silence(ops_dsn, silence.id, actor="human:bob", reason="again")


def test_an_expired_silence_releases_what_it_held_on_the_next_sweep(ops_dsn):
    rid = add_resource(ops_dsn)
    store = IncidentStore(ops_dsn)
    incident, _ = store.open_or_refresh_incident(rid, "resource_down", actor="detection:postgres.connect",
                                                 reason="down")
    store.claim(incident.id, run_id="r1", actor="automation:playbook_resource_down/claim", reason="claimed")
    silence = add_silence(ops_dsn, resource=rid, incident_type=None, duration=timedelta(minutes=5),
                          reason="maintenance", created_by="human:carol")
    hold_incident(store, incident.id, run_id="r1", actor="automation:playbook_resource_down/hold",
                  reason="held: silenced", held_by=silence.held_by)
    assert guard_sweep(ops_dsn).released == []
    expire(ops_dsn, silence.id)
    assert guard_sweep(ops_dsn).released == [incident.id]
    assert store.get(incident.id).state == "open"


def test_silence_scope_and_mistakes(ops_dsn):
    rid = add_resource(ops_dsn, "pg-scope")
    add_silence(ops_dsn, resource="pg-scope", incident_type="follower_behind", duration=timedelta(hours=1),
                reason="rebuilding the follower", created_by="human:dave")
    assert active_silence_for(ops_dsn, rid, "follower_behind") is not None
    assert active_silence_for(ops_dsn, rid, "resource_down") is None
    every = add_silence(ops_dsn, resource="*", incident_type="blocking_queries", duration=timedelta(hours=1),
                        reason="batch window", created_by="human:dave")
    assert active_silence_for(ops_dsn, rid, "blocking_queries") == every
    with pytest.raises(SilenceError, match="no resource 'pg-nope' in the inventory"):
        add_silence(ops_dsn, resource="pg-nope", incident_type=None, duration=timedelta(hours=1), reason="x",
                    created_by="human:dave")
    with pytest.raises(SilenceError, match="must last some time"):
        add_silence(ops_dsn, resource=rid, incident_type=None, duration=timedelta(0), reason="x",
                    created_by="human:dave")
    with pytest.raises(SilenceError, match="trip the global breaker instead"):
        add_silence(ops_dsn, resource="*", incident_type=None, duration=timedelta(hours=1), reason="x",
                    created_by="human:dave")
    assert len(list_silences(ops_dsn)) == 2


def test_silences_cli_add_list_remove_is_audited(ops_dsn, monkeypatch):
    add_resource(ops_dsn, "pg-cli")
    monkeypatch.setenv("FLEETMEDIC_USER", "erin")
    runner = CliRunner()
    added = runner.invoke(app, ["silences", "add", "--resource", "pg-cli", "--type", "resource_down", "--for", "2h",
                                "--reason", "disk swap", "--dsn", ops_dsn, "--json"])
    assert added.exit_code == 0, added.output
    silence = json.loads(added.output)
    assert silence["created_by"] == "human:erin" and silence["reason"] == "disk swap"

    listed = runner.invoke(app, ["silences", "list", "--dsn", ops_dsn, "--json"])
    assert [s["id"] for s in json.loads(listed.output)] == [silence["id"]]

    bad = runner.invoke(app, ["silences", "add", "--resource", "pg-cli", "--for", "soon", "--reason", "x",
                              "--dsn", ops_dsn])
    assert bad.exit_code == 2 and "not a duration" in bad.output

    removed = runner.invoke(app, ["silences", "remove", str(silence["id"]), "--reason", "done early",
                                  "--dsn", ops_dsn])
    assert removed.exit_code == 0, removed.output
    assert json.loads(runner.invoke(app, ["silences", "list", "--dsn", ops_dsn, "--json"]).output) == []
    row = query(ops_dsn, "SELECT removed_by, removed_reason FROM silences WHERE id = %s", (silence["id"],))[0]
    assert row == {"removed_by": "human:erin", "removed_reason": "done early"}
