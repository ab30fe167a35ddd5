"""The incident store against real PostgreSQL: dedup under concurrency, claims, fencing, pages, audit trail."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from helpers import add_resource, add_resources, errors, query, run_concurrently

from fleetmedic.db.connect import connect
from fleetmedic.incidents.lifecycle import IllegalTransition, IncidentNotFound, StaleIncident, State
from fleetmedic.incidents.store import Finding, Incident, IncidentStore
from fleetmedic.pager.outbox import dedup_key_for_incident, list_pages

SWEEP = "detection:postgres.connect"
CLAIM = "automation:playbook_resource_down/claim"
RESTART = "automation:playbook_resource_down/restart"
VERIFY = "automation:playbook_resource_down/verify"
ALICE = "human:alice"


@pytest.fixture
def store(ops_dsn: str) -> IncidentStore:
    return IncidentStore(ops_dsn)


@pytest.fixture
def db(ops_dsn: str) -> int:
    """One postgres resource named db-main."""
    return add_resource(ops_dsn, "db-main")


def open_incident(store: IncidentStore, resource_id: int, type: str = "resource_down") -> Incident:
    incident, created = store.open_or_refresh_incident(
        resource_id, type, actor=SWEEP, reason="connect failed twice over 12s"
    )
    assert created
    return incident


def claimed(store: IncidentStore, resource_id: int, run_id: str = "incident-run-1") -> Incident:
    incident = open_incident(store, resource_id)
    return store.claim(incident.id, run_id=run_id, actor=CLAIM, reason="playbook run started")


# -- opening and dedup ---------------------------------------------------------------------------


def test_a_new_finding_opens_an_incident_with_an_opened_event(store: IncidentStore, db: int) -> None:
    incident, created = store.open_or_refresh_incident(
        db, "resource_down", actor=SWEEP, reason="connect failed twice over 12s", data={"failures": 2}
    )

    assert created
    assert (incident.state, incident.version, incident.detections) == (State.OPEN, 1, 1)
    assert incident.reason == "connect failed twice over 12s" and incident.data == {"failures": 2}
    assert incident.previous_incident_id is None
    (event,) = store.events(incident.id)
    assert (event.from_state, event.to_state, event.version, event.actor) == (None, State.OPEN, 1, SWEEP)
    assert event.reason == "connect failed twice over 12s"


def test_twenty_concurrent_reports_of_the_same_problem_give_one_incident_and_one_opened_event(
    ops_dsn: str, db: int
) -> None:
    def report(i: int) -> tuple[Incident, bool]:
        # Each thread its own store call, so its own connection and transaction.
        return IncidentStore(ops_dsn).open_or_refresh_incident(
            db, "resource_down", actor=SWEEP, reason=f"probe {i}: connection refused"
        )

    results = run_concurrently(20, report)

    assert errors(results) == []
    outcomes = [r for r in results if not isinstance(r, BaseException)]
    assert sum(created for _, created in outcomes) == 1
    assert len({incident.id for incident, _ in outcomes}) == 1
    (row,) = query(ops_dsn, "SELECT id, detections FROM incidents")
    assert row["detections"] == 20
    assert query(ops_dsn, "SELECT to_state FROM incident_events") == [{"to_state": "open"}]


def test_a_redetection_refreshes_the_open_incident_without_an_event(store: IncidentStore, db: int) -> None:
    first = open_incident(store, db)

    again, created = store.open_or_refresh_incident(
        db, "resource_down", actor=SWEEP, reason="still refusing connections", data={"failures": 3}
    )

    assert not created and again.id == first.id
    assert again.detections == 2 and again.last_seen_at >= first.last_seen_at
    assert again.version == first.version and again.reason == first.reason  # a refresh is not a transition
    assert again.data == {"failures": 3}
    assert len(store.events(first.id)) == 1


def test_the_same_resource_with_another_type_is_another_incident(store: IncidentStore, db: int) -> None:
    down = open_incident(store, db, "resource_down")
    lag = open_incident(store, db, "replication_lag")
    assert down.id != lag.id


def test_a_problem_that_comes_back_after_resolution_opens_a_new_incident_linked_to_the_old(
    store: IncidentStore, db: int
) -> None:
    first = open_incident(store, db)
    store.resolve(first.id, actor=ALICE, reason="restarted by hand")

    second, created = store.open_or_refresh_incident(db, "resource_down", actor=SWEEP, reason="down again")
    store.resolve(second.id, actor=ALICE, reason="restarted by hand again")
    third, _ = store.open_or_refresh_incident(db, "resource_down", actor=SWEEP, reason="and again")

    assert created and second.id != first.id
    assert second.previous_incident_id == first.id
    assert third.previous_incident_id == second.id  # the latest resolved one, so the chain counts repeats


def test_an_ignored_incident_absorbs_redetections_until_its_time_is_up(
    ops_dsn: str, store: IncidentStore, db: int
) -> None:
    incident = open_incident(store, db)
    until = datetime.now(UTC) + timedelta(hours=4)
    ignored = store.transition(
        incident.id, "ignored", actor=ALICE, reason="known: disk swap tonight", ignored_until=until
    )
    assert ignored.ignored_until == until

    again, created = store.open_or_refresh_incident(db, "resource_down", actor=SWEEP, reason="still down")

    assert not created and again.id == incident.id
    assert again.state is State.IGNORED and again.detections == 2

    # Once the ignore window is over, the next detection is a new problem.
    query(ops_dsn, "UPDATE incidents SET ignored_until = now() - interval '1 minute' WHERE id = %s", (incident.id,))
    fresh, created = store.open_or_refresh_incident(db, "resource_down", actor=SWEEP, reason="down after window")
    assert created and fresh.id != incident.id and fresh.state is State.OPEN


def test_ignoring_needs_a_time_until_which_to_ignore(store: IncidentStore, db: int) -> None:
    incident = open_incident(store, db)
    with pytest.raises(ValueError, match="ignoring needs ignored_until"):
        store.transition(incident.id, "ignored", actor=ALICE, reason="meh")
    assert store.get(incident.id).state is State.OPEN


def test_a_report_racing_a_human_ignore_refreshes_the_ignored_incident(
    ops_dsn: str, store: IncidentStore, db: int
) -> None:
    incident = open_incident(store, db)
    outcome: list[tuple[Incident, bool]] = []

    with connect(ops_dsn) as human:
        store.transition(
            incident.id, "ignored", actor=ALICE, reason="maintenance",
            ignored_until=datetime.now(UTC) + timedelta(hours=1), conn=human,
        )
        # The human's transaction holds the row; the sweep's report must wait for it, then see the ignore.
        reporter = threading.Thread(
            target=lambda: outcome.append(
                store.open_or_refresh_incident(db, "resource_down", actor=SWEEP, reason="still down")
            )
        )
        reporter.start()
        time.sleep(0.5)
        assert reporter.is_alive()
        human.commit()
    reporter.join(30)

    ((refreshed, created),) = outcome
    assert not created and refreshed.id == incident.id and refreshed.state is State.IGNORED
    assert query(ops_dsn, "SELECT count(*) AS n FROM incidents")[0]["n"] == 1


def test_a_report_waiting_on_another_opener_that_ignores_before_committing_refreshes_the_ignored_one(
    ops_dsn: str, store: IncidentStore, db: int
) -> None:
    outcome: list[tuple[Incident, bool]] = []

    with connect(ops_dsn) as other:
        opened, _ = store.open_or_refresh_incident(
            db, "resource_down", actor=SWEEP, reason="down", conn=other
        )
        # Our report sees no incident yet (uncommitted), so it tries to open one and waits on the unique index.
        reporter = threading.Thread(
            target=lambda: outcome.append(
                store.open_or_refresh_incident(db, "resource_down", actor=SWEEP, reason="down too")
            )
        )
        reporter.start()
        time.sleep(0.5)
        assert reporter.is_alive()
        store.transition(
            opened.id, "ignored", actor=ALICE, reason="known", conn=other,
            ignored_until=datetime.now(UTC) + timedelta(hours=1),
        )
        other.commit()
    reporter.join(30)

    ((refreshed, created),) = outcome
    assert not created and refreshed.id == opened.id and refreshed.state is State.IGNORED
    assert refreshed.detections == 2
    assert query(ops_dsn, "SELECT count(*) AS n FROM incidents")[0]["n"] == 1
    assert query(ops_dsn, "SELECT count(*) AS n FROM incident_events")[0]["n"] == 2  # opened, ignored


def test_detection_can_open_incidents_held_when_the_mass_failure_guard_trips(
    store: IncidentStore, db: int
) -> None:
    incident, created = store.open_or_refresh_incident(
        db, "resource_down", actor="detection:mass_failure_guard", reason="40% of the sweep failed", state="held"
    )

    assert created and incident.state is State.HELD
    assert store.events(incident.id)[0].to_state is State.HELD
    with pytest.raises(ValueError, match="open as open or held, not remediating"):
        store.open_or_refresh_incident(db, "x", actor=SWEEP, reason="r", state="remediating")


def test_an_incident_for_a_resource_that_does_not_exist_names_it(store: IncidentStore) -> None:
    with pytest.raises(ValueError, match=r"Key \(resource_id\)=\(424242\) is not present.*add it to `resources`"):
        store.open_or_refresh_incident(424242, "resource_down", actor=SWEEP, reason="down")


def test_a_bad_finding_names_what_is_wrong(store: IncidentStore, db: int) -> None:
    with pytest.raises(ValueError, match="severity 'high' is not one of: critical, error, warning, info"):
        store.open_or_refresh_incident(db, "resource_down", actor=SWEEP, reason="down", severity="high")
    with pytest.raises(ValueError, match="needs a reason"):
        store.open_or_refresh_incident(db, "resource_down", actor=SWEEP, reason=" ")


# -- the bulk path ------------------------------------------------------------------------------


def _scenario(store: IncidentStore, ops_dsn: str) -> dict[str, int]:
    """Resources in each situation detection can meet: nothing yet, active, resolved before, ignored."""
    fresh, active, recurring, ignored, expired = add_resources(ops_dsn, 5)
    open_incident(store, active)
    old = open_incident(store, recurring)
    store.resolve(old.id, actor=ALICE, reason="fixed")
    quiet = open_incident(store, ignored)
    store.transition(quiet.id, "ignored", actor=ALICE, reason="known", ignored_until=datetime.now(UTC) + timedelta(hours=1))
    gone = open_incident(store, expired)
    store.transition(gone.id, "ignored", actor=ALICE, reason="known", ignored_until=datetime.now(UTC) + timedelta(hours=1))
    query(ops_dsn, "UPDATE incidents SET ignored_until = now() - interval '1 second' WHERE id = %s", (gone.id,))
    return {"fresh": fresh, "active": active, "recurring": recurring, "ignored": ignored, "expired": expired}


def _outcome(store: IncidentStore, incident_id: int, created: bool) -> tuple[object, ...]:
    incident = store.get(incident_id)
    events = store.events(incident_id)
    return (
        created,
        incident.state,
        incident.detections,
        incident.previous_incident_id is not None,
        [(e.from_state, e.to_state) for e in events],
        incident.reason,
    )


def test_bulk_open_or_refresh_many_does_what_one_by_one_does(ops_dsn: str, store: IncidentStore) -> None:
    one_by_one = _scenario(store, ops_dsn)
    bulk = _scenario(store, ops_dsn)
    names = list(one_by_one)

    singles = [
        store.open_or_refresh_incident(one_by_one[n], "resource_down", actor=SWEEP, reason=f"{n} down")
        for n in names
    ]
    many = store.open_or_refresh_many(
        [(bulk[n], "resource_down", f"{n} down", "critical") for n in names], actor=SWEEP
    )

    assert [created for _, created in many] == [created for _, created in singles] == [
        True, False, True, False, True,
    ]
    for (incident, created), (incident_id, bulk_created) in zip(singles, many, strict=True):
        assert _outcome(store, incident.id, created) == _outcome(store, incident_id, bulk_created)
    recurring = store.get(many[names.index("recurring")][0])
    assert recurring.previous_incident_id is not None
    assert store.get(recurring.previous_incident_id).resource_id == bulk["recurring"]


def test_bulk_counts_a_repeated_finding_once_and_keeps_input_order(ops_dsn: str, store: IncidentStore) -> None:
    a, b = add_resources(ops_dsn, 2)

    result = store.open_or_refresh_many(
        [
            Finding(b, "resource_down", "b down"),
            Finding(a, "resource_down", "a down", "warning", {"lag": 3}),
            Finding(b, "resource_down", "b down again"),
        ],
        actor=SWEEP,
        state="held",
    )

    (b_id, b_created), (a_id, a_created), (b_again, b_again_created) = result
    assert (b_created, a_created, b_again_created) == (True, True, False) and b_again == b_id
    incident_a = store.get(a_id)
    assert (incident_a.state, incident_a.severity, incident_a.data) == (State.HELD, "warning", {"lag": 3})
    assert store.get(b_id).detections == 1
    assert query(ops_dsn, "SELECT count(*) AS n FROM incident_events")[0]["n"] == 2


def test_concurrent_sweeps_over_the_same_resources_open_each_incident_once(ops_dsn: str) -> None:
    resources = add_resources(ops_dsn, 40)
    findings = [(r, "resource_down", "connection refused", "critical") for r in resources]

    def sweep(i: int) -> list[tuple[int, bool]]:
        batch = findings if i % 2 == 0 else list(reversed(findings))
        return IncidentStore(ops_dsn).open_or_refresh_many(batch, actor=SWEEP)

    results = run_concurrently(4, sweep)

    assert errors(results) == []
    created = [pair for r in results if isinstance(r, list) for pair in r if pair[1]]
    assert len(created) == 40
    assert query(ops_dsn, "SELECT count(*) AS n, sum(detections) AS d FROM incidents")[0] == {"n": 40, "d": 160}
    assert query(ops_dsn, "SELECT count(*) AS n FROM incident_events")[0]["n"] == 40


def test_an_empty_sweep_is_a_no_op(store: IncidentStore) -> None:
    assert store.open_or_refresh_many([], actor=SWEEP) == []


# -- claims and fencing ---------------------------------------------------------------------------


def test_two_concurrent_claims_of_one_incident_exactly_one_wins(ops_dsn: str, store: IncidentStore, db: int) -> None:
    incident = open_incident(store, db)

    results = run_concurrently(
        2,
        lambda i: IncidentStore(ops_dsn).claim(
            incident.id, run_id=f"run-{i}", actor=CLAIM, reason="playbook run started"
        ),
    )

    winners = [r for r in results if isinstance(r, Incident)]
    losers = errors(results)
    assert len(winners) == 1 and len(losers) == 1
    assert isinstance(losers[0], StaleIncident)
    assert "found state remediating" in str(losers[0]) and winners[0].owner_run_id in str(losers[0])
    current = store.get(incident.id)
    assert (current.state, current.owner_run_id, current.version) == (State.REMEDIATING, winners[0].owner_run_id, 2)
    assert [e.to_state for e in store.events(incident.id)] == [State.OPEN, State.REMEDIATING]


def test_a_retried_claim_by_the_same_run_returns_the_incident_unchanged(store: IncidentStore, db: int) -> None:
    first = claimed(store, db, run_id="incident-1")

    again = store.claim(first.id, run_id="incident-1", actor=CLAIM, reason="task retry")

    assert again == first
    assert len(store.events(first.id)) == 2


def test_a_claim_on_a_resolved_incident_is_illegal(store: IncidentStore, db: int) -> None:
    incident = open_incident(store, db)
    store.resolve(incident.id, actor=VERIFY, reason="healthy again (transient)")

    with pytest.raises(IllegalTransition, match="cannot go from resolved to remediating .resolved is final."):
        store.claim(incident.id, run_id="late-run", actor=CLAIM, reason="run started late")


def test_a_step_by_a_run_that_lost_its_claim_is_fenced_off(store: IncidentStore, db: int) -> None:
    incident = claimed(store, db, run_id="run-a")
    step = store.set_step(incident.id, run_id="run-a", step="restart", actor=RESTART, reason="restarting postgres")
    assert (step.state, step.step, step.version) == (State.REMEDIATING, "restart", incident.version + 1)

    with pytest.raises(StaleIncident, match="expected state remediating, owned by run run-b"):
        store.set_step(incident.id, run_id="run-b", step="restart", actor=RESTART, reason="duplicate task")
    with pytest.raises(StaleIncident, match=f"version {incident.version}"):
        store.set_step(
            incident.id, run_id="run-a", step="verify", actor=VERIFY, reason="old token",
            expected_version=incident.version,
        )

    store.transition(incident.id, "held", actor="automation:breaker/playbook", reason="breaker opened")
    with pytest.raises(StaleIncident, match="found state held"):
        store.set_step(incident.id, run_id="run-a", step="verify", actor=VERIFY, reason="carry on")
    assert store.get(incident.id).step == "restart"


def test_a_stale_version_loses_the_compare_and_set_and_changes_nothing(store: IncidentStore, db: int) -> None:
    incident = open_incident(store, db)
    store.transition(incident.id, "held", actor=ALICE, reason="silence added", expected_version=1)

    with pytest.raises(StaleIncident) as caught:
        store.transition(incident.id, "resolved", actor=ALICE, reason="looked fine", expected_version=1)

    assert "expected version 1, found state held, version 2" in str(caught.value)
    assert (caught.value.expected_version, caught.value.actual_version) == (1, 2)
    with pytest.raises(StaleIncident, match="expected state open"):
        store.transition(incident.id, "resolved", actor=ALICE, reason="looked fine", expected_state="open")
    assert store.get(incident.id).state is State.HELD
    assert len(store.events(incident.id)) == 2


def test_an_illegal_transition_raises_with_both_states_named_and_changes_nothing(
    store: IncidentStore, db: int
) -> None:
    incident = open_incident(store, db)

    with pytest.raises(IllegalTransition) as caught:
        store.transition(incident.id, "await_resolution", actor=ALICE, reason="backup running")

    assert str(caught.value) == (
        f"incident {incident.id}: cannot go from open to await_resolution "
        "(open may go to: remediating, held, escalated, resolved, ignored)"
    )
    assert store.get(incident.id) == incident
    assert len(store.events(incident.id)) == 1


def test_every_change_needs_an_actor_in_a_known_format_and_a_reason(store: IncidentStore, db: int) -> None:
    incident = open_incident(store, db)

    with pytest.raises(ValueError, match="needs a reason"):
        store.transition(incident.id, "held", actor=ALICE, reason="")
    with pytest.raises(ValueError, match="actor 'alice' is not valid: use automation:<dag>/<task>, human:<name>"):
        store.transition(incident.id, "held", actor="alice", reason="because")
    with pytest.raises(ValueError, match="actor 'automation:playbook' is not valid"):
        store.transition(incident.id, "held", actor="automation:playbook", reason="because")
    assert store.get(incident.id).version == 1


def test_an_unknown_incident_is_reported_by_id(store: IncidentStore) -> None:
    with pytest.raises(IncidentNotFound, match="incident 777 does not exist"):
        store.get(777)
    with pytest.raises(IncidentNotFound):
        store.transition(777, "resolved", actor=ALICE, reason="gone")
    with pytest.raises(IncidentNotFound):
        store.events(777)


def test_a_transition_composes_with_the_callers_transaction(ops_dsn: str, store: IncidentStore, db: int) -> None:
    incident = open_incident(store, db)

    with connect(ops_dsn) as conn:
        store.transition(incident.id, "held", actor=ALICE, reason="silence", conn=conn)
        with pytest.raises(StaleIncident):  # a lost CAS rolls back only its own savepoint
            store.transition(incident.id, "open", actor=ALICE, reason="x", expected_version=1, conn=conn)
        assert store.get(incident.id, conn=conn).state is State.HELD
        conn.rollback()

    assert store.get(incident.id).state is State.OPEN and len(store.events(incident.id)) == 1

    with connect(ops_dsn) as conn:
        store.transition(incident.id, "held", actor=ALICE, reason="silence", conn=conn)
        conn.execute("INSERT INTO silences (resource_id, ends_at, reason, created_by) VALUES (%s, now() + interval '1 hour', 'x', 'alice')", (db,))
    assert store.get(incident.id).state is State.HELD


# -- escalation and pages -------------------------------------------------------------------------


def test_escalating_twice_enqueues_exactly_one_page(ops_dsn: str, store: IncidentStore, db: int) -> None:
    incident = claimed(store, db, run_id="incident-1")
    store.set_step(incident.id, run_id="incident-1", step="restart", actor=RESTART, reason="restarting")

    escalated, page = store.escalate(
        incident.id, actor=RESTART, reason="pg_ctl restart timed out after 2m",
        details={"run_url": "http://airflow/dags/playbook_resource_down/runs/incident-1"},
    )
    again, second = store.escalate(incident.id, actor=RESTART, reason="on_failure_callback", details={})

    assert escalated.state is State.ESCALATED and escalated.escalated_at is not None
    assert second is None and again == escalated
    assert page is not None
    assert page.dedup_key == dedup_key_for_incident(incident.id) == f"fleetmedic-incident-{incident.id}"
    assert page.summary == "[fleetmedic] resource_down on db-main: pg_ctl restart timed out after 2m"
    assert page.details["failed_step"] == "restart"
    assert page.details["run_url"].endswith("/runs/incident-1")
    assert page.details["resource"]["name"] == "db-main"
    assert [(e["to_state"], e["step"]) for e in page.details["automation_tried"]] == [
        ("open", None), ("remediating", None), ("remediating", "restart"), ("escalated", "restart"),
    ]
    assert len(list_pages(ops_dsn, incident_id=incident.id)) == 1


def test_a_failure_before_the_claim_still_escalates_and_pages(ops_dsn: str, store: IncidentStore, db: int) -> None:
    incident = open_incident(store, db)

    escalated, page = store.escalate(
        incident.id, actor=CLAIM, reason="claim task failed: ops database timeout", details={"try_number": 3}
    )

    assert escalated.state is State.ESCALATED and page is not None
    assert page.details["state_before"] == "open" and page.details["failed_step"] is None
    assert page.details["try_number"] == 3


def test_escalating_a_resolved_incident_does_nothing(store: IncidentStore, db: int) -> None:
    incident = open_incident(store, db)
    resolved = store.resolve(incident.id, actor=VERIFY, reason="transient")

    assert store.escalate(incident.id, actor=RESTART, reason="late failure callback", details={}) == (resolved, None)
    assert len(store.events(incident.id)) == 2


def test_resolving_an_escalated_incident_enqueues_a_resolve_page_with_the_same_dedup_key(
    ops_dsn: str, store: IncidentStore, db: int
) -> None:
    incident = claimed(store, db)
    _, trigger = store.escalate(incident.id, actor=RESTART, reason="restart failed", details={})
    assert trigger is not None

    resolved = store.resolve(incident.id, actor=ALICE, reason="replaced the disk")
    again = store.resolve(incident.id, actor=ALICE, reason="double click")

    assert resolved.state is State.RESOLVED and resolved.resolved_at is not None and again == resolved
    pages = list_pages(ops_dsn, incident_id=incident.id)
    assert [(p.action, p.dedup_key) for p in pages] == [("trigger", trigger.dedup_key), ("resolve", trigger.dedup_key)]
    assert pages[1].details["by"] == ALICE


def test_resolving_an_incident_nobody_was_paged_for_sends_no_page(
    ops_dsn: str, store: IncidentStore, db: int
) -> None:
    incident = claimed(store, db)
    store.resolve(incident.id, actor=VERIFY, reason="healthy after restart", expected_run_id="incident-run-1")
    assert list_pages(ops_dsn) == []


def test_a_failed_human_retry_pages_again_and_resolution_closes_every_page(
    ops_dsn: str, store: IncidentStore, db: int
) -> None:
    incident = claimed(store, db, run_id="run-1")
    store.escalate(incident.id, actor=RESTART, reason="restart failed", details={})
    store.transition(incident.id, "open", actor=ALICE, reason="freed disk space, retry")
    store.claim(incident.id, run_id="run-2", actor=CLAIM, reason="manual retry run")

    _, second = store.escalate(incident.id, actor=RESTART, reason="restart failed again", details={})
    store.resolve(incident.id, actor=ALICE, reason="rebuilt from backup")

    assert second is not None and second.dedup_key == dedup_key_for_incident(incident.id, 2)
    pages = list_pages(ops_dsn, incident_id=incident.id)
    assert sorted((p.dedup_key, p.action) for p in pages) == sorted(
        (key, action)
        for key in (dedup_key_for_incident(incident.id), dedup_key_for_incident(incident.id, 2))
        for action in ("trigger", "resolve")
    )


def test_concurrent_escalations_page_once(ops_dsn: str, store: IncidentStore, db: int) -> None:
    incident = claimed(store, db)

    results = run_concurrently(
        8,
        lambda i: IncidentStore(ops_dsn).escalate(
            incident.id, actor=RESTART, reason=f"callback {i}", details={}
        ),
    )

    assert errors(results) == []
    assert sum(1 for r in results if isinstance(r, tuple) and r[1] is not None) == 1
    assert len(list_pages(ops_dsn)) == 1


# -- reading --------------------------------------------------------------------------------------


def test_the_audit_trail_lists_every_transition_in_order(store: IncidentStore, db: int) -> None:
    incident = open_incident(store, db)
    store.claim(incident.id, run_id="run-1", actor=CLAIM, reason="run started", step="claim")
    store.set_step(incident.id, run_id="run-1", step="restart", actor=RESTART, reason="restarting")
    store.set_step(incident.id, run_id="run-1", step="verify", actor=VERIFY, reason="restart ok, verifying",
                   data={"pid": 4242})
    store.transition(incident.id, "await_resolution", actor=VERIFY, reason="recovery in progress")
    store.resolve(incident.id, actor=VERIFY, reason="accepting connections again")

    events = store.events(incident.id)

    assert [(e.from_state, e.to_state, e.version, e.step, e.actor) for e in events] == [
        (None, State.OPEN, 1, None, SWEEP),
        (State.OPEN, State.REMEDIATING, 2, "claim", CLAIM),
        (State.REMEDIATING, State.REMEDIATING, 3, "restart", RESTART),
        (State.REMEDIATING, State.REMEDIATING, 4, "verify", VERIFY),
        (State.REMEDIATING, State.AWAIT_RESOLUTION, 5, "verify", VERIFY),
        (State.AWAIT_RESOLUTION, State.RESOLVED, 6, "verify", VERIFY),
    ]
    assert [e.id for e in events] == sorted(e.id for e in events)
    assert events[3].data == {"pid": 4242}
    assert all(e.reason for e in events)
    final = store.get(incident.id)
    assert (final.version, final.reason, final.owner_run_id) == (6, "accepting connections again", "run-1")


def test_listing_filters_by_state_type_resource_and_time(ops_dsn: str, store: IncidentStore) -> None:
    a, b = add_resources(ops_dsn, 2)
    down_a = open_incident(store, a, "resource_down")
    lag_a = open_incident(store, a, "replication_lag")
    down_b = open_incident(store, b, "resource_down")
    store.resolve(down_b.id, actor=ALICE, reason="fine")

    assert [i.id for i in store.list()] == [down_b.id, lag_a.id, down_a.id]
    assert [i.id for i in store.list(state="open")] == [lag_a.id, down_a.id]
    assert [i.id for i in store.list(state=[State.OPEN, State.RESOLVED], type="resource_down")] == [
        down_b.id, down_a.id,
    ]
    assert [i.id for i in store.list(resource_id=b)] == [down_b.id]
    assert store.list(since=datetime.now(UTC) + timedelta(minutes=1)) == []
    assert len(store.list(limit=1)) == 1
    with pytest.raises(ValueError, match="'fixed' is not an incident state"):
        store.list(state="fixed")


def test_the_store_works_on_a_caller_connection_with_tuple_rows(ops_dsn: str, store: IncidentStore, db: int) -> None:
    incident = open_incident(store, db)
    with psycopg.connect(ops_dsn) as conn:  # plain tuple rows
        assert store.get(incident.id, conn=conn).id == incident.id
