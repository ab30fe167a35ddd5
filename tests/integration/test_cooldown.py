"""Resource cooldown against real PostgreSQL and Redis: a flapping resource gets one action, then escalations."""

from __future__ import annotations

import itertools

from helpers import add_resource, query

from fleetmedic.incidents.store import IncidentStore
from fleetmedic.playbooks.loader import default_playbooks_dir, load_playbook
from fleetmedic.playbooks.schema import Playbook
from fleetmedic.safety.config import SafetyConfig
from fleetmedic.safety.gate import GateDecision, action_permit, evaluate_gate

DAG = "playbook_resource_down"
CONFIG = SafetyConfig(lease_wait=0.0, redis_timeout=1.0)
_runs = itertools.count(1)


def playbook(incident_type: str = "resource_down") -> Playbook:
    pb = load_playbook(default_playbooks_dir() / "resource_down.yaml")
    return pb if incident_type == pb.type else pb.model_copy(update={"type": incident_type})


class Flow:
    """What a playbook run does around the gate and one action, through the real store and safety code."""

    def __init__(self, dsn: str, redis_url: str) -> None:
        self.dsn = dsn
        self.redis_url = redis_url
        self.store = IncidentStore(dsn)
        self.restarts: list[int] = []

    def detect(self, resource_id: int, incident_type: str = "resource_down") -> int:
        incident, _ = self.store.open_or_refresh_incident(resource_id, incident_type, actor="detection:postgres.connect",
                                                          reason="postgres.connect failed twice over 10s")
        return incident.id

    def run(self, incident_id: int, pb: Playbook, *, manual: bool = False) -> tuple[GateDecision, str]:
        """claim -> gate -> (restart -> resolve | escalate); the final state."""
        run_id = f"incident-{incident_id}-{next(_runs)}"
        store = self.store
        if manual:  # a human retry re-opens the incident, then its run claims it
            store.transition(incident_id, "open", actor=f"automation:{DAG}/claim",
                             reason="re-opened for a manual run (manual: try again, by human:alice)")
        store.claim(incident_id, run_id=run_id, actor=f"automation:{DAG}/claim", reason=f"claimed by run {run_id}")
        decision = evaluate_gate(self.dsn, self.redis_url, incident_id, pb, run_id=run_id,
                                 actor=f"automation:{DAG}/gate", manual=manual, config=CONFIG)
        store.set_step(incident_id, run_id=run_id, step="gate", actor=f"automation:{DAG}/gate", reason=decision.reason,
                       data={**decision.event_data(), "run_id": run_id, "step_status": "done"})
        if decision.outcome == "escalate":
            incident, _page = store.escalate(incident_id, actor=f"automation:{DAG}/escalate", details={},
                                             reason=f"automation could not fix it: {decision.reason}")
            return decision, incident.state
        assert decision.outcome == "proceed", decision
        actor = f"automation:{DAG}/step_restart"
        with action_permit(self.dsn, self.redis_url, store.get(incident_id), run_id=run_id, step="restart",
                           action="resource.restart", actor=actor, config=CONFIG) as permit:
            assert permit.allowed, permit
            store.set_step(incident_id, run_id=run_id, step="restart", actor=actor, reason="running resource.restart",
                           data={"run_id": run_id, "step_status": "acting", "action": "resource.restart"})
            self.restarts.append(incident_id)
        store.set_step(incident_id, run_id=run_id, step="restart", actor=actor, reason="started it",
                       data={"run_id": run_id, "step_status": "done", "outcome": "ok"})
        return decision, store.resolve(incident_id, actor=f"automation:{DAG}/resolve", reason="resolved: healthy").state


def test_flapping_resource_gets_one_action_then_escalations_that_say_cooldown(ops_dsn, redis_url):
    flow = Flow(ops_dsn, redis_url)
    pb = playbook()
    rid = add_resource(ops_dsn, "pg-flappy")

    outcomes = []
    for _ in range(3):  # the same fault three times within the hour
        incident_id = flow.detect(rid)
        decision, state = flow.run(incident_id, pb)
        outcomes.append((decision.outcome, state))
        if state == "escalated":  # the human brings it back and closes the incident; then it flaps again
            flow.store.resolve(incident_id, actor="human:alice", reason="restarted it by hand; healthy")

    assert outcomes == [("proceed", "resolved"), ("escalate", "escalated"), ("escalate", "escalated")]
    assert len(flow.restarts) == 1
    pages = query(ops_dsn, "SELECT incident_id, summary, details FROM pages WHERE action = 'trigger' ORDER BY id")
    assert len(pages) == 2  # one per escalated incident, none for the fixed one
    for page in pages:
        assert "cooldown" in page["summary"] and "pg-flappy" in page["summary"]
        assert f"incident {flow.restarts[0]}" in page["summary"]  # names the action it already took
        assert "resource.restart" in page["summary"]


def test_cooldown_is_per_resource_and_type(ops_dsn, redis_url):
    flow = Flow(ops_dsn, redis_url)
    first, other = add_resource(ops_dsn, "pg-a"), add_resource(ops_dsn, "pg-b")
    assert flow.run(flow.detect(first), playbook())[0].outcome == "proceed"
    assert flow.run(flow.detect(other), playbook())[0].outcome == "proceed"
    assert flow.run(flow.detect(first, "follower_behind"), playbook("follower_behind"))[0].outcome == "proceed"
    assert flow.run(flow.detect(first), playbook())[0].outcome == "escalate"


def test_an_action_older_than_the_cooldown_does_not_count(ops_dsn, redis_url):
    flow = Flow(ops_dsn, redis_url)
    rid = add_resource(ops_dsn)
    assert flow.run(flow.detect(rid), playbook())[0].outcome == "proceed"
    query(ops_dsn, "UPDATE incident_events SET at = at - interval '61 minutes'")  # resource_cooldown is 1h
    assert flow.run(flow.detect(rid), playbook())[0].outcome == "proceed"
    assert len(flow.restarts) == 2


def test_a_human_retry_passes_the_cooldown(ops_dsn, redis_url):
    flow = Flow(ops_dsn, redis_url)
    rid = add_resource(ops_dsn)
    flow.run(flow.detect(rid), playbook())
    incident_id = flow.detect(rid)
    assert flow.run(incident_id, playbook())[0].outcome == "escalate"
    decision, state = flow.run(incident_id, playbook(), manual=True)
    assert decision.outcome == "proceed" and state == "resolved"
    assert len(flow.restarts) == 2


def test_dry_runs_and_waits_do_not_count_as_actions(ops_dsn, redis_url):
    flow = Flow(ops_dsn, redis_url)
    rid = add_resource(ops_dsn)
    incident_id = flow.detect(rid)
    flow.store.note(incident_id, actor=f"automation:{DAG}/step_restart", step="restart",
                    reason="dry run: would run resource.restart",
                    data={"run_id": "manual-dry", "step_status": "acting", "dry_run": True})
    assert flow.run(incident_id, playbook())[0].outcome == "proceed"
