"""The mass-failure guard through the sweep's real incident step, against real PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from helpers import add_resources, query

from fleetmedic.detection.incidents import open_incidents_for_findings
from fleetmedic.incidents.store import IncidentStore
from fleetmedic.safety.breakers import GLOBAL, get_breaker, reset
from fleetmedic.safety.config import SafetyConfig
from fleetmedic.safety.guard import assess_fleet, guard_sweep

DAGS = {"resource_down": "playbook_resource_down"}


def fail_health(dsn: str, resource_ids: list[int], *, age: str = "0 seconds") -> None:
    """What the probes write when these resources stop answering."""
    for rid in resource_ids:
        query(dsn, """
            INSERT INTO health (resource_id, check_name, healthy, reason, checked_at, consecutive_failures,
                                first_failure_at)
            VALUES (%s, 'postgres.connect', false, 'connection refused', now() - %s::interval, 2, now() - interval '15s')
            ON CONFLICT (resource_id, check_name) DO UPDATE SET healthy = false, checked_at = EXCLUDED.checked_at
        """, (rid, age))


def sweep(dsn: str, resource_ids: list[int]):
    """One sweep whose probes confirmed resource_down on these resources."""
    findings = [{"resource_id": rid, "type": "resource_down", "check": "postgres.connect", "severity": "critical",
                 "reason": "postgres.connect failed 2 times over 12s: connection refused"} for rid in resource_ids]
    return open_incidents_for_findings(dsn, [{"probes": 20, "unhealthy": len(resource_ids), "findings": findings}],
                                       DAGS)


def trigger_pages(dsn: str) -> list[dict]:
    return query(dsn, "SELECT * FROM pages WHERE action = 'trigger' ORDER BY id")


def test_half_the_fleet_failing_at_once_holds_every_incident_and_pages_once(ops_dsn):
    fleet = add_resources(ops_dsn, 10)
    down = fleet[:5]
    fail_health(ops_dsn, down)

    summary, runs = sweep(ops_dsn, down)
    assert (summary.opened, summary.held, runs) == (5, 5, [])  # no remediation starts
    store = IncidentStore(ops_dsn)
    assert {i.state for i in store.list(limit=50)} == {"held"}
    g = get_breaker(ops_dsn, GLOBAL)
    assert g.state == "open" and "mass failure: 5 of 10 resources (50%)" in g.reason
    pages = trigger_pages(ops_dsn)
    assert len(pages) == 1 and "breaker global open" in pages[0]["summary"]
    assert query(ops_dsn, "SELECT count(*) AS n FROM breaker_events WHERE state = 'open'")[0]["n"] == 1

    # More sweeps while it stays broken: the same incidents refresh, still held, still one page.
    summary, runs = sweep(ops_dsn, down)
    assert (summary.opened, summary.refreshed, runs) == (0, 5, [])
    assert len(trigger_pages(ops_dsn)) == 1

    # A human clears the breaker: the held incidents go back to open and the sweep starts their runs.
    change = reset(ops_dsn, GLOBAL, actor="human:alice", reason="the failures are real: a rack lost power")
    assert sorted(change.released) == sorted(i.id for i in store.list(limit=50))
    summary, runs = sweep(ops_dsn, down)
    assert get_breaker(ops_dsn, GLOBAL).state == "closed"  # the human's judgement holds for guard_rearm
    assert sorted(r["trigger_run_id"] for r in runs) == sorted(f"incident-{i.id}-v2" for i in store.list(limit=50))
    assert all(r["trigger_dag_id"] == "playbook_resource_down" for r in runs)


def test_a_few_failures_open_incidents_normally(ops_dsn):
    fleet = add_resources(ops_dsn, 10)
    fail_health(ops_dsn, fleet[:4])  # 40% but fewer than 5
    summary, runs = sweep(ops_dsn, fleet[:4])
    assert (summary.opened, summary.held, len(runs)) == (4, 0, 4)
    assert all(r["trigger_run_id"] == f"incident-{r['conf']['incident_id']}" for r in runs)
    assert get_breaker(ops_dsn, GLOBAL).state == "closed" and trigger_pages(ops_dsn) == []


def test_five_failures_in_a_large_fleet_are_below_the_share(ops_dsn):
    fleet = add_resources(ops_dsn, 30)
    fail_health(ops_dsn, fleet[:5])  # 5 of 30 = 17% <= 20%
    decision = guard_sweep(ops_dsn, [{"resource_id": r} for r in fleet[:5]])
    assert not decision.hold_new and not decision.tripped
    assert "5 of 30 resources unhealthy: below the guard" in decision.reason


def test_unhealthy_now_counts_failing_probes_before_confirmation_but_not_stale_or_owned_ones(ops_dsn):
    fleet = add_resources(ops_dsn, 10)
    fail_health(ops_dsn, fleet[:2])                   # failing now, not confirmed yet
    fail_health(ops_dsn, fleet[2:4], age="10 minutes")  # an old result: the probes have moved on
    store = IncidentStore(ops_dsn)
    owned, _ = store.open_or_refresh_incident(fleet[4], "resource_down", actor="detection:postgres.connect",
                                              reason="down")
    store.escalate(owned.id, actor="human:alice", reason="a human owns it", details={})
    fail_health(ops_dsn, [fleet[4]])
    health = assess_fleet(ops_dsn, [{"resource_id": fleet[5]}])  # confirmed this sweep
    assert health.fleet == 10
    names = {r["id"]: r["name"] for r in query(ops_dsn, "SELECT id, name FROM resources")}
    assert set(health.unhealthy) == {names[fleet[0]], names[fleet[1]], names[fleet[5]]}


def test_a_failing_canary_trips_the_guard_alone(ops_dsn):
    fleet = add_resources(ops_dsn, 10)
    query(ops_dsn, "UPDATE resources SET attrs = '{\"canary\": true}' WHERE id = %s", (fleet[0],))
    fail_health(ops_dsn, [fleet[0]])
    decision = guard_sweep(ops_dsn, [])
    assert decision.tripped and decision.hold_new
    assert "canary check failed" in decision.reason
    assert len(trigger_pages(ops_dsn)) == 1


def test_after_a_human_reset_the_guard_rearms_later(ops_dsn):
    fleet = add_resources(ops_dsn, 10)
    fail_health(ops_dsn, fleet[:6])
    assert guard_sweep(ops_dsn).tripped
    reset(ops_dsn, GLOBAL, actor="human:bob", reason="real outage, let automation work")
    quiet = guard_sweep(ops_dsn)
    assert not quiet.hold_new and "guard re-arms at" in quiet.reason
    rearmed = guard_sweep(ops_dsn, config=SafetyConfig(guard_rearm=timedelta(0)))
    assert rearmed.tripped and rearmed.hold_new
    assert len(trigger_pages(ops_dsn)) == 2  # one page per trip
