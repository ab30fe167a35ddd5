"""End to end, in a real Airflow: 25 simultaneous incidents of one playbook whose limit is 20 actions an hour.

20 runs act, the 21st trips the playbook's breaker, 5 incidents are held, exactly one page goes out;
a human's `fleetmedic breakers reset` releases the 5, their new runs act, and they resolve.

The playbook is the test-only `window_drill` (tests/fixtures/e2e_dags): its one action inserts a row
per action into a table on pg1a, so the actions are counted on the server. Its 25 incidents are on
25 inventory entries that point at pg1a and are disabled, so the sweep does not probe them (and the
sweep does not start runs for a playbook outside playbooks/): the test starts each run exactly as the
sweep would, with `playbook_run_for` (deterministic run ids, `incident-<id>` then `incident-<id>-v<n>`).
Resources: pg1a (one table added and dropped), left healthy.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from fleetmedic.detection.incidents import playbook_run_for
from fleetmedic.incidents.store import IncidentStore
from fleetmedic.inventory import get_resource
from fleetmedic.safety.breakers import get_breaker, reset

pytestmark = pytest.mark.e2e

DAG = "playbook_window_drill"
TYPE = "window_drill"
BREAKER = "playbook:window_drill"
MARKS = "fleetmedic_drill_marks"
N, LIMIT = 25, 20


def _pg(res) -> str:
    return f"postgresql://postgres@{res.host}:{res.port}/postgres"


def _marks(res) -> list[int]:
    with psycopg.connect(_pg(res)) as conn:
        return [r[0] for r in conn.execute(f"SELECT incident_id FROM {MARKS} ORDER BY id").fetchall()]


def _trigger_pages(stack, after: int) -> list[tuple[str, str]]:
    with psycopg.connect(stack.ops_dsn) as conn:
        return conn.execute("SELECT dedup_key, summary FROM pages WHERE id > %s AND action = 'trigger' ORDER BY id",
                            (after,)).fetchall()


def _trail(store: IncidentStore, incident_id: int) -> str:
    return "\n".join(f"{e.at:%H:%M:%S} {e.from_state}->{e.to_state} [{e.step}] {e.actor}: {e.reason}"
                     for e in store.events(incident_id))


def _explain(stack, store: IncidentStore, incidents: list) -> str:
    """For a failure message: the breakers, and the trail of the first incident in each state."""
    with psycopg.connect(stack.ops_dsn) as conn:
        breakers = conn.execute("SELECT name, state, reason FROM breakers ORDER BY name").fetchall()
    parts = [f"breakers: {breakers}"]
    for state in sorted({i.state for i in incidents}):
        first = next(i for i in incidents if i.state == state)
        parts.append(f"incident {first.id} ({state}):\n{_trail(store, first.id)}")
    return "\n\n".join(parts)


def _start_runs(airflow, runs: list[dict]) -> None:
    """Start the runs at once (8 REST calls in flight), as the sweep's trigger task does."""
    def start(run: dict) -> str:
        return airflow.trigger(run["trigger_dag_id"], run_id=run["trigger_run_id"], conf=run["conf"])["dag_run_id"]

    with ThreadPoolExecutor(8) as pool:
        started = list(pool.map(start, runs))
    assert started == [r["trigger_run_id"] for r in runs]


def _settled(store: IncidentStore, ids: list[int], states: set[str]) -> list | None:
    incidents = [store.get(i) for i in ids]
    return incidents if all(i.state in states for i in incidents) else None


def test_25_simultaneous_incidents_with_limit_20_act_20_hold_5_page_once_and_reset_releases_them(
        stack, airflow, wait_until, cli):
    store = IncidentStore(stack.ops_dsn)
    with psycopg.connect(stack.ops_dsn) as conn:
        pg1a = get_resource(conn, "pg1a")
        assert pg1a.role == "primary"
        rids = [conn.execute(
            "INSERT INTO resources (name, kind, role, host, port, enabled) VALUES (%s, 'postgres', 'primary', %s, %s, "
            "false) RETURNING id", (f"drill-{k:02d}", pg1a.host, pg1a.port)).fetchone()[0] for k in range(1, N + 1)]
        pages_before = conn.execute("SELECT coalesce(max(id), 0) FROM pages").fetchone()[0]
    with psycopg.connect(_pg(pg1a)) as conn:
        conn.execute(f"CREATE TABLE {MARKS} (id bigserial PRIMARY KEY, incident_id bigint NOT NULL, "
                     "resource text NOT NULL, at timestamptz NOT NULL DEFAULT now())")
    assert get_breaker(stack.ops_dsn, BREAKER).closed
    try:
        opened = store.open_or_refresh_many([(rid, TYPE, "drill: 25 at once") for rid in rids],
                                            actor="detection:e2e-drill")
        ids = [incident_id for incident_id, created in opened if created]
        assert len(ids) == N
        _start_runs(airflow, [playbook_run_for(i, DAG) for i in ids])

        done = wait_until(lambda: _settled(store, ids, {"resolved", "held", "escalated"}), 600,
                          "the 25 drill incidents to be resolved or held", interval=5)
        states = Counter(i.state for i in done)
        assert states == {"resolved": LIMIT, "held": N - LIMIT}, _explain(stack, store, done)
        acted = sorted(i.id for i in done if i.state == "resolved")
        held = sorted(i.id for i in done if i.state == "held")
        # Counted on the server: exactly one action per resolved incident, none for the held ones.
        assert sorted(_marks(pg1a)) == acted
        for incident_id in held:
            [hold] = [e for e in store.events(incident_id) if e.to_state == "held"]
            assert hold.data["held_by"] == BREAKER and "max_actions_per_hour" in hold.reason, _trail(store, incident_id)
            assert not [e for e in store.events(incident_id) if (e.data or {}).get("step_status") == "acting"]
        b = get_breaker(stack.ops_dsn, BREAKER)
        assert b.state == "open" and "max_actions_per_hour" in b.reason, b
        with psycopg.connect(stack.ops_dsn) as conn:
            trips = conn.execute("SELECT count(*) FROM breaker_events WHERE breaker = %s AND state = 'open'",
                                 (BREAKER,)).fetchone()[0]
        assert trips == 1
        pages = _trigger_pages(stack, pages_before)
        assert len(pages) == 1, pages
        assert pages[0][0].startswith("fleetmedic-breaker-playbook-window_drill-trip-") and \
            "max_actions_per_hour" in pages[0][1], pages
        runs = {i: airflow.wait_for_run(DAG, f"incident-{i}", timeout=120, echo=False)["state"] for i in ids}
        assert set(runs.values()) == {"success"}, runs

        # A human checks and resets: the 5 are released, new runs start as the sweep starts them, they act.
        out = cli("breakers", "reset", TYPE, "--reason", "checked: 25 real drill incidents")
        assert f"released {len(held)} held incident(s): {', '.join(map(str, held))}" in out.output, out.output
        released = [store.get(i) for i in held]
        assert {i.state for i in released} == {"open"}
        assert all(store.events(i.id)[-1].actor == "human:e2e-oncall" for i in released)
        _start_runs(airflow, [playbook_run_for(i.id, DAG, i.version) for i in released])
        again = wait_until(lambda: _settled(store, held, {"resolved", "held", "escalated"}), 300,
                           "the 5 released incidents to finish", interval=3)
        assert [i.state for i in again] == ["resolved"] * len(held), "\n\n".join(_trail(store, i) for i in held)
        assert sorted(_marks(pg1a)) == sorted(acted + held)
        assert get_breaker(stack.ops_dsn, BREAKER).closed
        # Still one page in all; closing the breaker resolved it.
        assert len(_trigger_pages(stack, pages_before)) == 1
        with psycopg.connect(stack.ops_dsn) as conn:
            resolves = conn.execute("SELECT count(*) FROM pages WHERE id > %s AND action = 'resolve' AND dedup_key = %s",
                                    (pages_before, pages[0][0])).fetchone()[0]
        assert resolves == 1
    finally:
        if not get_breaker(stack.ops_dsn, BREAKER).closed:
            reset(stack.ops_dsn, BREAKER, actor="human:e2e-cleanup", reason="test cleanup", redis_url=stack.redis.url)
        with psycopg.connect(_pg(pg1a)) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {MARKS}")
