"""Circuit breakers, the gate and leases against real PostgreSQL and Redis: trips, half-open, fail-closed."""

from __future__ import annotations

import itertools
import time
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from helpers import add_resources, errors, query, run_concurrently

from fleetmedic.incidents.store import IncidentStore
from fleetmedic.localfleet.services import RedisServer, free_port
from fleetmedic.playbooks.loader import default_playbooks_dir, load_playbook
from fleetmedic.playbooks.schema import Limits, Playbook
from fleetmedic.safety.breakers import (
    GLOBAL,
    get_breaker,
    held_incidents,
    list_breakers,
    parse_breaker_name,
    redis_client,
    refresh,
    reserve_action,
    reset,
    trip,
    window_count,
    window_member,
)
from fleetmedic.safety.config import SafetyConfig
from fleetmedic.safety.gate import GateDecision, action_permit, evaluate_gate, hold_incident
from fleetmedic.safety.lease import LeaseBusy, acquire_lease, hold_lease, lease_holder, release_lease

ACTOR = "automation:playbook_resource_down/gate"
BREAKER = "playbook:resource_down"
CONFIG = SafetyConfig(lease_wait=0.0, redis_timeout=1.0)
_runs = itertools.count(1)


def playbook(**limits: object) -> Playbook:
    pb = load_playbook(default_playbooks_dir() / "resource_down.yaml")
    return pb.model_copy(update={"limits": Limits(**{**pb.limits.model_dump(), **limits})})


def open_claimed(dsn: str, count: int) -> list[tuple[int, str]]:
    """`count` incidents on as many resources, each claimed by its own run: (incident id, run id)."""
    store = IncidentStore(dsn)
    rids = add_resources(dsn, count)
    opened = store.open_or_refresh_many([(rid, "resource_down", "postgres.connect failed twice") for rid in rids],
                                        actor="detection:postgres.connect")
    out = []
    for incident_id, _created in opened:
        out.append((incident_id, claim(store, incident_id)))
    return out


def claim(store: IncidentStore, incident_id: int) -> str:
    run_id = f"incident-{incident_id}-run-{next(_runs)}"
    store.claim(incident_id, run_id=run_id, actor="automation:playbook_resource_down/claim",
                reason=f"claimed by run {run_id}", from_states=("open",))
    return run_id


def gate(dsn: str, redis_url: str, incident_id: int, run_id: str, pb: Playbook) -> GateDecision:
    """What the gate task does: decide, then record the decision on the incident (fenced by the claim)."""
    store = IncidentStore(dsn)
    decision = evaluate_gate(dsn, redis_url, incident_id, pb, run_id=run_id, actor=ACTOR, config=CONFIG)
    nxt = {"proceed": "reconfirm", "hold": "hold", "escalate": "escalate"}[decision.outcome]
    store.set_step(incident_id, run_id=run_id, step="gate", actor=ACTOR, reason=decision.reason,
                   data={**decision.event_data(), "run_id": run_id, "step_status": "done", "next": nxt})
    if decision.outcome == "hold":
        hold_incident(store, incident_id, run_id=run_id, actor="automation:playbook_resource_down/hold",
                      reason=f"held: {decision.reason}", held_by=decision.held_by)
    return decision


def may_act(dsn: str, redis_url: str, incident_id: int, run_id: str) -> bool | str:
    """What the step task asks right before acting: True, or the reason it may not."""
    incident = IncidentStore(dsn).get(incident_id)
    with action_permit(dsn, redis_url, incident, run_id=run_id, step="restart", action="resource.restart",
                       actor="automation:playbook_resource_down/step_restart", config=CONFIG) as permit:
        return True if permit.allowed else permit.reason


def pages(dsn: str) -> list[dict]:
    return query(dsn, "SELECT * FROM pages ORDER BY id")


def trips(dsn: str, name: str) -> list[dict]:
    return query(dsn, "SELECT * FROM breaker_events WHERE breaker = %s AND state = 'open' ORDER BY id", (name,))


@pytest.fixture
def own_redis(services_dir: Path):
    """A Redis of this test's own, so it can be stopped without disturbing the others."""
    server = RedisServer(services_dir / f"redis-{uuid.uuid4().hex[:8]}", free_port())
    server.start()
    yield server
    server.stop()


def test_breaker_names_parse():
    assert parse_breaker_name("global") == GLOBAL
    assert parse_breaker_name("resource_down") == BREAKER
    assert parse_breaker_name("playbook:resource_down") == BREAKER
    with pytest.raises(ValueError, match="not a breaker name"):
        parse_breaker_name("Playbook Resource Down")


def test_25_simultaneous_incidents_with_limit_20_act_20_hold_5_and_page_once(ops_dsn, redis_url):
    pb = playbook(max_actions_per_hour=20)
    claimed = open_claimed(ops_dsn, 25)

    results = run_concurrently(25, lambda i: gate(ops_dsn, redis_url, *claimed[i], pb))
    assert errors(results) == []
    outcomes = Counter(r.outcome for r in results)  # type: ignore[union-attr]
    assert outcomes == {"proceed": 20, "hold": 5}

    held = sorted(inc for (inc, _), r in zip(claimed, results, strict=True) if r.outcome == "hold")  # type: ignore[union-attr]
    store = IncidentStore(ops_dsn)
    assert all(store.get(i).state == "held" for i in held)
    assert held_incidents(ops_dsn, BREAKER) == held
    assert get_breaker(ops_dsn, BREAKER).state == "open"
    assert len(trips(ops_dsn, BREAKER)) == 1
    sent = pages(ops_dsn)
    assert len(sent) == 1, sent
    assert sent[0]["dedup_key"].startswith("fleetmedic-breaker-playbook-resource_down-trip-")
    assert "max_actions_per_hour" in sent[0]["summary"]
    # The 20 admitted runs are within the limit: the trip holds the runs over it, and the 20 still act.
    admitted = [c for c, r in zip(claimed, results, strict=True) if r.outcome == "proceed"]  # type: ignore[union-attr]
    permits = run_concurrently(20, lambda i: may_act(ops_dsn, redis_url, *admitted[i]))
    assert permits == [True] * 20, permits
    assert window_count(redis_client(redis_url), BREAKER) == 20
    held_events = [e for i in held for e in store.events(i) if e.to_state == "held"]
    assert all(e.data["held_by"] == BREAKER and "max_actions_per_hour" in e.reason for e in held_events)

    # A human checks, resets: the 5 are released, run again, pass the gate and resolve.
    change = reset(ops_dsn, BREAKER, actor="human:alice", reason="checked: 25 real failures after a bad deploy",
                   redis_url=redis_url)
    assert change.changed and sorted(change.released) == held
    assert get_breaker(ops_dsn, BREAKER).state == "closed"
    released = [store.get(i) for i in held]
    assert all(i.state == "open" for i in released)
    assert all(store.events(i)[-1].actor == "human:alice" for i in held)
    rerun = [(i, claim(store, i)) for i in held]
    again = run_concurrently(5, lambda k: gate(ops_dsn, redis_url, *rerun[k], pb))
    assert [r.outcome for r in again] == ["proceed"] * 5  # type: ignore[union-attr]
    for incident_id, run_id in rerun:
        store.resolve(incident_id, actor="automation:playbook_resource_down/resolve", reason="resolved: restarted",
                      expected_run_id=run_id)
    assert all(store.get(i).state == "resolved" for i in held)
    # Closing resolved the trip's page; still one trigger in all.
    assert [(p["action"]) for p in pages(ops_dsn)] == ["trigger", "resolve"]


def test_half_open_admits_exactly_one_run_under_concurrent_attempts(ops_dsn, redis_url):
    pb = playbook(max_actions_per_hour=20)
    trip(ops_dsn, BREAKER, actor=ACTOR, reason="test: tripped", cooldown=timedelta(0))
    claimed = open_claimed(ops_dsn, 10)

    results = run_concurrently(10, lambda i: gate(ops_dsn, redis_url, *claimed[i], pb))
    assert errors(results) == []
    proceeded = [inc for (inc, _), r in zip(claimed, results, strict=True) if r.outcome == "proceed"]  # type: ignore[union-attr]
    assert len(proceeded) == 1, [r.reason for r in results]  # type: ignore[union-attr]
    probe = proceeded[0]
    b = get_breaker(ops_dsn, BREAKER)
    assert b.state == "half_open" and b.probe_incident_id == probe
    assert all("probe" in r.reason for r in results)  # type: ignore[union-attr]

    # The probe's run resolves: the breaker closes and releases the nine it held.
    store = IncidentStore(ops_dsn)
    probe_run = next(run for inc, run in claimed if inc == probe)
    store.resolve(probe, actor="automation:playbook_resource_down/resolve", reason="resolved: restarted",
                  expected_run_id=probe_run)
    changes = refresh(ops_dsn)
    assert [c.breaker.state for c in changes] == ["closed"]
    assert sorted(changes[0].released) == sorted(inc for inc, _ in claimed if inc != probe)
    assert get_breaker(ops_dsn, BREAKER).state == "closed"
    states = [e["state"] for e in query(ops_dsn, "SELECT state FROM breaker_events WHERE breaker = %s ORDER BY id",
                                        (BREAKER,))]
    assert states == ["open", "half_open", "half_open", "closed"]  # tripped, half-open, probe admitted, closed


def test_half_open_probe_that_escalates_opens_the_breaker_again_with_a_new_page(ops_dsn, redis_url):
    pb = playbook()
    trip(ops_dsn, BREAKER, actor=ACTOR, reason="test: tripped", cooldown=timedelta(hours=1))
    query(ops_dsn, "UPDATE breakers SET half_open_after = now() - interval '1 second' WHERE name = %s", (BREAKER,))
    [(probe, run_id)] = open_claimed(ops_dsn, 1)
    assert gate(ops_dsn, redis_url, probe, run_id, pb).outcome == "proceed"
    IncidentStore(ops_dsn).escalate(probe, actor="automation:playbook_resource_down/escalate",
                                    reason="automation could not fix it: restart failed", details={})
    [change] = refresh(ops_dsn)
    assert change.breaker.state == "open" and f"probe incident {probe} ended escalated" in change.breaker.reason
    assert change.page is not None
    breaker_pages = [p for p in pages(ops_dsn) if p["incident_id"] is None]
    assert len(breaker_pages) == 2 and len({p["dedup_key"] for p in breaker_pages}) == 2  # one per trip
    # It waits another cooldown (an hour) before the next probe.
    assert refresh(ops_dsn) == []
    assert get_breaker(ops_dsn, BREAKER).half_open_after is not None


def test_redis_stopped_fails_closed_hold_and_one_page_then_reset_resumes(ops_dsn, own_redis):
    pb = playbook()
    claimed = open_claimed(ops_dsn, 3)
    own_redis.stop()

    decisions = [gate(ops_dsn, own_redis.url, inc, run, pb) for inc, run in claimed]
    assert [d.outcome for d in decisions] == ["hold"] * 3
    assert "unreachable" in decisions[0].reason and "fails closed" in decisions[0].reason
    assert all(d.held_by == GLOBAL for d in decisions)
    g = get_breaker(ops_dsn, GLOBAL)
    assert g.state == "open" and g.half_open_after is None  # only a human resets it
    assert len(pages(ops_dsn)) == 1 and "breaker global open" in pages(ops_dsn)[0]["summary"]

    # Redis back: still held until a human resets the global breaker; then the runs go through.
    own_redis.start()
    store = IncidentStore(ops_dsn)
    change = reset(ops_dsn, GLOBAL, actor="human:bob", reason="redis restarted", redis_url=own_redis.url)
    assert sorted(change.released) == sorted(inc for inc, _ in claimed)
    rerun = [(inc, claim(store, inc)) for inc, _ in claimed]
    assert [gate(ops_dsn, own_redis.url, inc, run, pb).outcome for inc, run in rerun] == ["proceed"] * 3
    assert len([p for p in pages(ops_dsn) if p["action"] == "trigger"]) == 1


def test_redis_lost_between_gate_and_action_takes_no_action(ops_dsn, own_redis):
    pb = playbook()
    [(incident_id, run_id)] = open_claimed(ops_dsn, 1)
    assert gate(ops_dsn, own_redis.url, incident_id, run_id, pb).outcome == "proceed"
    own_redis.stop()

    acted = []
    incident = IncidentStore(ops_dsn).get(incident_id)
    with action_permit(ops_dsn, own_redis.url, incident, run_id=run_id, step="restart", action="resource.restart",
                       actor="automation:playbook_resource_down/step_restart", config=CONFIG) as permit:
        if permit.allowed:
            acted.append(incident_id)
    assert acted == []
    assert not permit.allowed and permit.outcome == "hold" and permit.held_by == GLOBAL
    assert "unreachable" in permit.reason
    assert get_breaker(ops_dsn, GLOBAL).state == "open"
    assert len(pages(ops_dsn)) == 1


def test_action_permit_holds_the_lease_and_counts_the_action(ops_dsn, redis_url):
    pb = playbook()
    [(incident_id, run_id)] = open_claimed(ops_dsn, 1)
    assert gate(ops_dsn, redis_url, incident_id, run_id, pb).outcome == "proceed"
    incident = IncidentStore(ops_dsn).get(incident_id)
    client = redis_client(redis_url)
    with action_permit(ops_dsn, redis_url, incident, run_id=run_id, step="restart", action="resource.restart",
                       actor="automation:playbook_resource_down/step_restart", config=CONFIG) as permit:
        assert permit.allowed and permit.lease is not None
        assert lease_holder(client, incident.resource_id) == permit.lease.token
        # A second action on the same resource meanwhile is refused (and escalates, not waits forever).
        with action_permit(ops_dsn, redis_url, incident, run_id="another-run", step="restart",
                           action="resource.restart", actor="automation:playbook_resource_down/step_restart",
                           config=CONFIG) as second:
            assert not second.allowed and second.outcome == "escalate"
            assert "leased by incident-" in second.reason
    assert lease_holder(client, incident.resource_id) is None
    # Counted once: the gate's reservation and the action are the same run.
    assert window_count(client, BREAKER) == 1


def test_action_permit_refuses_once_a_human_tripped_the_breaker_after_the_gate(ops_dsn, redis_url):
    pb = playbook()
    [(incident_id, run_id)] = open_claimed(ops_dsn, 1)
    assert gate(ops_dsn, redis_url, incident_id, run_id, pb).outcome == "proceed"
    trip(ops_dsn, BREAKER, actor="human:carol", reason="bad deploy rolling out, stop restarts")
    incident = IncidentStore(ops_dsn).get(incident_id)
    with action_permit(ops_dsn, redis_url, incident, run_id=run_id, step="restart", action="resource.restart",
                       actor="automation:playbook_resource_down/step_restart", config=CONFIG) as permit:
        pass
    assert not permit.allowed and permit.held_by == BREAKER and "bad deploy" in permit.reason


def test_lease_is_released_only_by_its_token_and_expires(redis_url):
    client = redis_client(redis_url)
    first = acquire_lease(client, 7, owner="run-a", ttl=timedelta(seconds=30))
    assert first is not None
    assert acquire_lease(client, 7, owner="run-b", ttl=timedelta(seconds=30)) is None
    impostor = type(first)(first.resource_id, first.key, "run-b#not-the-token", first.ttl)
    assert release_lease(client, impostor) is False
    assert lease_holder(client, 7) == first.token
    with pytest.raises(LeaseBusy, match="leased by run-a"):
        with hold_lease(client, 7, owner="run-b", ttl=timedelta(seconds=30), wait=0.3, interval=0.1):
            pass
    assert release_lease(client, first) is True
    short = acquire_lease(client, 8, owner="run-c", ttl=timedelta(milliseconds=200))
    assert short is not None
    time.sleep(0.4)
    assert acquire_lease(client, 8, owner="run-d", ttl=timedelta(seconds=5)) is not None


def test_window_lost_in_redis_is_rebuilt_from_the_gate_decisions(ops_dsn, redis_url):
    pb = playbook(max_actions_per_hour=3)
    claimed = open_claimed(ops_dsn, 4)
    assert [gate(ops_dsn, redis_url, inc, run, pb).outcome for inc, run in claimed[:3]] == ["proceed"] * 3
    redis.Redis.from_url(redis_url).flushdb()  # Redis restarted empty
    inc, run = claimed[3]
    assert gate(ops_dsn, redis_url, inc, run, pb).outcome == "hold"
    assert get_breaker(ops_dsn, BREAKER).state == "open"


def test_a_retried_gate_does_not_take_a_second_slot(ops_dsn, redis_url):
    client = redis_client(redis_url)
    member = window_member(1, "incident-1")
    first = reserve_action(client, ops_dsn, BREAKER, member, limit=2)
    again = reserve_action(client, ops_dsn, BREAKER, member, limit=2)
    assert (first.admitted, first.count) == (True, 1)
    assert (again.admitted, again.count) == (True, 1)


def test_breakers_list_shows_global_and_playbooks_closed_by_default(ops_dsn):
    listed = list_breakers(ops_dsn, also=[BREAKER])
    assert [(b.name, b.state) for b in listed] == [(GLOBAL, "closed"), (BREAKER, "closed")]
    assert trip(ops_dsn, GLOBAL, actor="human:dave", reason="maintenance").changed
    again = trip(ops_dsn, GLOBAL, actor="human:erin", reason="again")
    assert not again.changed and "already open" in again.message
    assert len(pages(ops_dsn)) == 1


def test_breakers_cli_trip_list_reset_is_audited_with_the_human(ops_dsn, redis_url, monkeypatch):
    import json

    from typer.testing import CliRunner

    from fleetmedic.console.cli import app

    monkeypatch.setenv("FLEETMEDIC_USER", "frank")
    runner = CliRunner()
    [(incident_id, run_id)] = open_claimed(ops_dsn, 1)

    tripped = runner.invoke(app, ["breakers", "trip", "resource_down", "--reason", "bad deploy", "--dsn", ops_dsn])
    assert tripped.exit_code == 0 and "breaker playbook:resource_down tripped: bad deploy" in tripped.output
    assert gate(ops_dsn, redis_url, incident_id, run_id, playbook()).held_by == BREAKER

    listed = runner.invoke(app, ["breakers", "list", "--dsn", ops_dsn, "--redis-url", redis_url, "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {r["name"]: r for r in json.loads(listed.output)}
    assert rows[BREAKER]["state"] == "open" and rows[BREAKER]["changed_by"] == "human:frank"
    assert rows[BREAKER]["held"] == [incident_id] and rows[GLOBAL]["state"] == "closed"

    reset_ = runner.invoke(app, ["breakers", "reset", "playbook:resource_down", "--reason", "rolled back",
                                 "--dsn", ops_dsn, "--redis-url", redis_url])
    assert reset_.exit_code == 0 and f"released 1 held incident(s): {incident_id}" in reset_.output
    events = query(ops_dsn, "SELECT state, actor, reason FROM breaker_events ORDER BY id")
    assert [(e["state"], e["actor"]) for e in events] == [("open", "human:frank"), ("closed", "human:frank")]
    assert events[1]["reason"] == "reset: rolled back"
    last = IncidentStore(ops_dsn).events(incident_id)[-1]
    assert (last.to_state, last.actor) == ("open", "human:frank") and "rolled back" in last.reason

    wrong = runner.invoke(app, ["breakers", "reset", "Not A Breaker", "--reason", "x", "--dsn", ops_dsn])
    assert wrong.exit_code == 2 and "not a breaker name" in wrong.output
    history = runner.invoke(app, ["breakers", "history", "resource_down", "--dsn", ops_dsn, "--json"])
    assert [e["state"] for e in json.loads(history.output)] == ["closed", "open"]


def test_incident_overrides_from_the_console_are_audited(ops_dsn, monkeypatch):
    import json

    from typer.testing import CliRunner

    from fleetmedic.console.cli import app

    monkeypatch.setenv("FLEETMEDIC_USER", "grace")
    runner = CliRunner()
    store = IncidentStore(ops_dsn)
    rids = add_resources(ops_dsn, 2)
    (first, _), (second, _) = store.open_or_refresh_many(
        [(rid, "resource_down", "postgres.connect failed") for rid in rids], actor="detection:postgres.connect")

    ack = runner.invoke(app, ["incidents", "ack", str(first), "--reason", "looking at it", "--dsn", ops_dsn])
    assert ack.exit_code == 0, ack.output
    note = store.events(first)[-1]
    assert (note.actor, note.data.get("ack"), store.get(first).state) == ("human:grace", True, "open")

    ignored = runner.invoke(app, ["incidents", "ignore", str(first), "--until", "2h", "--reason", "known flaky host",
                                  "--dsn", ops_dsn, "--json"])
    assert ignored.exit_code == 0, ignored.output
    assert json.loads(ignored.output)["state"] == "ignored" and store.get(first).ignored_until is not None

    resolved = runner.invoke(app, ["incidents", "resolve", str(second), "--reason", "fixed the disk",
                                   "--dsn", ops_dsn])
    assert resolved.exit_code == 0 and store.get(second).state == "resolved"
    assert store.events(second)[-1].actor == "human:grace"

    again = runner.invoke(app, ["incidents", "ignore", str(second), "--until", "2h", "--reason", "x", "--dsn", ops_dsn])
    assert again.exit_code == 1 and "resolved: nothing to override" in again.output
    past = runner.invoke(app, ["incidents", "ignore", str(second), "--until", "2001-01-01T00:00+00:00",
                               "--reason", "x", "--dsn", ops_dsn])
    assert past.exit_code == 2 and "in the past" in past.output
