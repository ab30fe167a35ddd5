"""End to end, in a real Airflow: pools from the set-up; fleetmedic's Redis lost -> fail closed -> reset resumes;
a cleared step that does not act twice; a flapping replica restarted once, then escalated for cooldown; a retry.

Resources: redis1b only (and the stack's own Redis), left healthy at the end. pg1b is not used for the
cooldown scenario: earlier e2e tests restart it within the hour, which this scenario must not inherit.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from fleetmedic.incidents.store import IncidentStore
from fleetmedic.inventory import Resource, get_resource
from fleetmedic.localfleet.fleet import redis_for
from fleetmedic.safety.breakers import GLOBAL, get_breaker, reset

pytestmark = pytest.mark.e2e

DAG = "playbook_resource_down"


def _resource(stack, name: str) -> Resource:
    with psycopg.connect(stack.ops_dsn) as conn:
        return get_resource(conn, name)


def _latest(store: IncidentStore, resource_id: int, after: int, states: set[str]):
    found = [i for i in store.list(type="resource_down", resource_id=resource_id, limit=20)
             if i.id > after and i.state in states]
    return found[0] if found else None


def _last_id(store: IncidentStore, resource_id: int) -> int:
    found = store.list(resource_id=resource_id, limit=1)
    return found[0].id if found else 0


def _starts(res: Resource) -> int:
    """How many times this redis-server started: its own log says "Server initialized" once per start."""
    return redis_for(res.attrs, res.port).logfile.read_text(errors="replace").count("Server initialized")


def _healthy_since(stack, res: Resource, check: str, since: datetime) -> bool:
    with psycopg.connect(stack.ops_dsn) as conn:
        row = conn.execute("SELECT healthy, checked_at FROM health WHERE resource_id = %s AND check_name = %s",
                           (res.id, check)).fetchone()
    return bool(row and row[0] and row[1] > since)


def _trigger_pages(stack, incident_id: int) -> list[str]:
    with psycopg.connect(stack.ops_dsn) as conn:
        rows = conn.execute("SELECT summary FROM pages WHERE incident_id = %s AND action = 'trigger'",
                            (incident_id,)).fetchall()
    return [r[0] for r in rows]


def _trail(store: IncidentStore, incident_id: int, airflow: Any = None) -> str:
    """The incident's audit trail (and, with `airflow`, the logs of its runs' tasks) for a failure message."""
    events = store.events(incident_id)
    lines = [f"{e.at:%H:%M:%S} {e.from_state}->{e.to_state} [{e.step}] {e.actor}: {e.reason}" for e in events]
    if airflow is not None:
        for run_id in sorted({(e.data or {}).get("run_id") for e in events} - {None}):
            for ti in airflow.task_instances(DAG, run_id):
                if ti["state"] in ("failed", "success") and ti["task_id"] in ("gate", "step_restart", "claim"):
                    lines.append(f"--- {run_id}/{ti['task_id']} ({ti['state']})")
                    try:
                        lines.append(airflow.task_log(DAG, run_id, ti["task_id"], max(1, ti["try_number"]))[-3000:])
                    except Exception as exc:  # diagnostics only
                        lines.append(f"(no log: {exc})")
    return "\n".join(lines)


def _why_started(stack, store: IncidentStore, res: Resource, airflow: Any) -> str:
    """Everything that could explain an unexpected start of `res`: its log, the actions, the incidents."""
    log = redis_for(res.attrs, res.port).logfile.read_text(errors="replace").splitlines()
    starts = [line for line in log if "Server initialized" in line or "signal" in line.lower()]
    parts = ["redis1b starts/stops:", *starts, f"acting events: {_recent_restarts(stack, res)}"]
    for inc in store.list(resource_id=res.id, limit=5):
        parts += [f"=== incident {inc.id} {inc.type} {inc.state}", _trail(store, inc.id, airflow)]
    return "\n".join(parts)




def test_set_up_creates_one_pool_per_playbook_sized_from_its_concurrency(stack, airflow):
    from fleetmedic.playbooks.loader import load_all
    from fleetmedic.playbooks.schema import Limits
    from fleetmedic.safety.pools import sync_pools

    playbooks = list(load_all().playbooks.values())
    pools = {p["name"]: p for p in airflow.list_pools()}
    for pb in playbooks:
        assert pools[f"playbook_{pb.type}"]["slots"] == pb.limits.concurrency, pb.type
    assert {c.action for c in sync_pools(airflow, playbooks)} == {"unchanged"}

    # A playbook's concurrency changes: the next sync resizes its pool; then back.
    changed = [pb.model_copy(update={"limits": Limits(**{**pb.limits.model_dump(), "concurrency": 2})})
               if pb.type == "resource_down" else pb for pb in playbooks]
    try:
        updates = [c for c in sync_pools(airflow, changed) if c.action != "unchanged"]
        assert [(c.pool, c.action, c.slots, c.before) for c in updates] == [
            ("playbook_resource_down", "updated", 2, playbooks_by_type(playbooks)["resource_down"])]
        assert airflow.get_pool("playbook_resource_down")["slots"] == 2
    finally:
        sync_pools(airflow, playbooks)
    assert airflow.get_pool("playbook_resource_down")["slots"] == playbooks_by_type(playbooks)["resource_down"]

    # Nobody has to remember: the pool_sync DAG puts drifted and missing pools back from the playbooks.
    wanted = playbooks_by_type(playbooks)
    try:
        airflow.update_pool("playbook_resource_down", 1, description="resized by hand")
        airflow.delete_pool("playbook_kernel_panic")
        run = airflow.trigger("pool_sync", run_id=f"pool-sync-e2e-{datetime.now(UTC):%H%M%S}")
        assert airflow.wait_for_run("pool_sync", run["dag_run_id"], timeout=120)["state"] == "success"
        log = airflow.task_log("pool_sync", run["dag_run_id"], "sync", 1)
        assert "pool playbook_resource_down: updated (slots 1 -> " in log, log[-2000:]
        assert "pool playbook_kernel_panic: created" in log, log[-2000:]
        pools = {p["name"]: p for p in airflow.list_pools()}
        assert {t: pools[f"playbook_{t}"]["slots"] for t in wanted} == wanted
    finally:
        sync_pools(airflow, playbooks)


def playbooks_by_type(playbooks: list[Any]) -> dict[str, int]:
    return {pb.type: pb.limits.concurrency for pb in playbooks}


def _recent_restarts(stack, res: Resource) -> list[tuple]:
    with psycopg.connect(stack.ops_dsn) as conn:
        return conn.execute(
            """SELECT e.incident_id, e.at FROM incident_events e JOIN incidents i ON i.id = e.incident_id
               WHERE i.resource_id = %s AND i.type = 'resource_down' AND e.data->>'step_status' = 'acting'
                 AND e.at > now() - interval '1 hour'""", (res.id,)).fetchall()


def test_redis_lost_fails_closed_then_reset_resumes_and_a_flapping_replica_meets_its_cooldown(
        stack, airflow, wait_until, cli):
    store = IncidentStore(stack.ops_dsn)
    res = _resource(stack, "redis1b")
    server = redis_for(res.attrs, res.port)
    assert _recent_restarts(stack, res) == [], "redis1b was restarted by automation within the hour already"
    assert get_breaker(stack.ops_dsn, GLOBAL).closed
    starts = _starts(res)
    last = _last_id(store, res.id)
    with psycopg.connect(stack.ops_dsn) as conn:
        pages_before = conn.execute("SELECT coalesce(max(id), 0) FROM pages").fetchone()[0]
    try:
        # 1. fleetmedic's Redis goes away, then redis1b stops: the gate fails closed, one page, held.
        stack.redis.stop()
        server.stop()
        held = wait_until(lambda: _latest(store, res.id, last, {"held", "resolved", "escalated"}), 240,
                          "the redis1b incident to be held", interval=3)
        assert held.state == "held", _trail(store, held.id, airflow)
        gate = [e for e in store.events(held.id) if e.step == "gate"][-1]
        assert "unreachable" in gate.reason and "fails closed" in gate.reason, gate.reason
        g = get_breaker(stack.ops_dsn, GLOBAL)
        assert g.state == "open" and "Redis" in g.reason
        with psycopg.connect(stack.ops_dsn) as conn:
            pages = conn.execute("SELECT dedup_key FROM pages WHERE id > %s AND action = 'trigger'",
                                 (pages_before,)).fetchall()
        assert len(pages) == 1 and pages[0][0].startswith("fleetmedic-breaker-global-trip-"), pages
        assert not server.running() and _starts(res) == starts, "no action after Redis was lost"
        # Detection keeps running and recording health meanwhile.
        wait_until(lambda: _healthy_since(stack, _resource(stack, "redis1a"), "redis.ping", g.changed_at), 90,
                   "the sweep to keep recording health")

        # 2. Redis back, a human resets the breaker: released, and a new run restarts redis1b.
        stack.redis.start()
        out = cli("breakers", "reset", "global", "--reason", "fleetmedic redis restarted")
        assert f"released 1 held incident(s): {held.id}" in out.output
        done = wait_until(lambda: (i := store.get(held.id)).state in ("resolved", "escalated") and i, 240,
                          "the released incident to finish", interval=3)
        assert done.state == "resolved", _trail(store, held.id, airflow)
        assert _starts(res) == starts + 1
        runs = sorted({e.data["run_id"] for e in store.events(held.id) if (e.data or {}).get("run_id")})
        assert runs[0] == f"incident-{held.id}" and runs[1].startswith(f"incident-{held.id}-v"), runs
        run_id = runs[1]
        wait_until(lambda: airflow.get_run(DAG, run_id)["state"] == "success", 60, f"run {run_id} to succeed")

        # 3. The restart step is cleared and re-run in Airflow after it acted: it does not act again.
        before = {t["task_id"]: t for t in airflow.task_instances(DAG, run_id)}["step_restart"]
        assert before["state"] == "success"
        airflow.clear_task(DAG, run_id, task_ids=["step_restart"])
        wait_until(lambda: (t := {x["task_id"]: x for x in airflow.task_instances(DAG, run_id)}["step_restart"])
                   ["try_number"] > before["try_number"] and t["state"] == "success", 120,
                   "the cleared step_restart to run again")
        wait_until(lambda: airflow.get_run(DAG, run_id)["state"] == "success", 60, "the re-run to finish")
        assert _starts(res) == starts + 1, "the re-run step restarted redis1b a second time"
        assert len(_recent_restarts(stack, res)) == 1

        # 4. It flaps: stopped twice more within the hour, each escalates for cooldown, no restart.
        expected_starts = starts + 1
        for cycle in (2, 3):
            since = datetime.now(UTC)
            wait_until(lambda since=since: _healthy_since(stack, res, "redis.ping", since), 60, "redis1b healthy")
            last = _last_id(store, res.id)
            server.stop()
            flap = wait_until(lambda last=last: _latest(store, res.id, last, {"resolved", "escalated", "held"}), 240,
                              f"incident {cycle} on redis1b to finish", interval=3)
            assert flap.state == "escalated", _trail(store, flap.id, airflow)
            assert flap.reason.startswith("automation could not fix it: cooldown: automation already ran "
                                          "resource.restart on redis1b"), flap.reason
            pages = _trigger_pages(stack, flap.id)
            assert len(pages) == 1 and "cooldown" in pages[0], pages
            assert _starts(res) == expected_starts, _why_started(stack, store, res, airflow)
            if cycle == 2:
                # A human reads the page and retries on purpose: the run passes the cooldown and restarts it.
                out = cli("incidents", "retry", str(flap.id), "--reason",
                           "known flapping; restart it once more", "--json")
                retry_run = json.loads(out.output)["dag_run_id"]
                assert retry_run == f"incident-{flap.id}-retry-1"
                assert airflow.wait_for_run(DAG, retry_run, timeout=180)["state"] == "success"
                assert store.get(flap.id).state == "resolved", _trail(store, flap.id, airflow)
                expected_starts += 1
                assert _starts(res) == expected_starts
                reopen = [e for e in store.events(flap.id) if e.from_state == "escalated" and e.to_state == "open"]
                assert reopen and "known flapping" in reopen[0].reason and reopen[0].actor == "human:e2e-oncall"
            else:
                # The human starts it by hand and closes the incident from the console.
                server.start()
                started = datetime.now(UTC)
                wait_until(lambda started=started: _healthy_since(stack, res, "redis.ping", started), 60,
                           "the sweep to see redis1b")
                cli("incidents", "resolve", str(flap.id), "--reason", "started redis1b by hand")
                assert store.get(flap.id).state == "resolved"
                assert store.events(flap.id)[-1].actor == "human:e2e-oncall"
    finally:
        if not stack.redis.running():
            stack.redis.start()
        if not get_breaker(stack.ops_dsn, GLOBAL).closed:
            reset(stack.ops_dsn, GLOBAL, actor="human:e2e-cleanup", reason="test cleanup")
        if not server.running():
            server.start()
    since = datetime.now(UTC)
    wait_until(lambda: _healthy_since(stack, res, "redis.ping", since), 60, "redis1b healthy at the end")
