"""End to end, in a real Airflow: blocked queries, a crashed PostgreSQL, a stopped Redis and a detached
Redis replica are found by the sweep and fixed by their playbooks. Independent faults run together."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
import redis

from fleetmedic.incidents.store import IncidentStore
from fleetmedic.inventory import Resource, get_resource
from fleetmedic.localfleet.faults import inject
from fleetmedic.localfleet.faults.queries import BLOCK_TABLE
from fleetmedic.localfleet.fleet import cluster_for

pytestmark = pytest.mark.e2e

DONE = {"resolved", "escalated"}


def _resource(stack, name: str) -> Resource:
    with psycopg.connect(stack.ops_dsn) as conn:
        return get_resource(conn, name)


def _incidents_since(store: IncidentStore, resource_id: int, since: datetime, type_: str | None = None):
    return [inc for inc in store.list(resource_id=resource_id, limit=100)
            if inc.opened_at >= since and (type_ is None or inc.type == type_)]


def _finished(store: IncidentStore, resource_id: int, type_: str, since: datetime):
    found = [inc for inc in _incidents_since(store, resource_id, since, type_) if inc.state in DONE]
    return found[0] if found else None


def _trail(store: IncidentStore, incident_id: int) -> str:
    """The audit trail, one event a line, for assertion messages."""
    return "\n".join(f"{ev.to_state} [{ev.step or ''}] {ev.reason}" for ev in store.events(incident_id))


def _assert_resolved(store: IncidentStore, incident) -> None:
    trail = _trail(store, incident.id)
    print(f"incident {incident.id} ({incident.type}) trail:\n{trail}")  # shown when the test fails
    assert incident.state == "resolved", trail


def _steps(store: IncidentStore, incident_id: int) -> dict[str, str]:
    """step -> the reason it recorded when done."""
    return {ev.step: ev.reason for ev in store.events(incident_id)
            if ev.step and (ev.data or {}).get("step_status") == "done"}


def _pages(stack, incident_ids: list[int]) -> int:
    with psycopg.connect(stack.ops_dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pages WHERE incident_id = ANY(%s)", (incident_ids,)).fetchone()
    return int(row[0]) if row else 0


def _redis_info(res: Resource) -> dict:
    client = redis.Redis(host=res.host, port=res.port, socket_timeout=5)
    try:
        return dict(client.info("replication"))
    finally:
        client.close()


def _counter(res: Resource) -> int:
    """The row the fault's queued clients update (0 before the first block created it)."""
    with psycopg.connect(f"postgresql://postgres@{res.host}:{res.port}/postgres") as conn:
        conn.execute("SET lock_timeout = '2s'")
        if conn.execute("SELECT to_regclass(%s)", (BLOCK_TABLE,)).fetchone() == (None,):
            return 0
        row = conn.execute(f"SELECT n FROM {BLOCK_TABLE} WHERE id = 1").fetchone()
    return int(row[0]) if row else 0


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _assert_clean_trail(store: IncidentStore, incident, dag_id: str, airflow) -> None:
    events = store.events(incident.id)
    assert all(ev.reason.strip() for ev in events), "every event has a reason"
    states = [ev.to_state for ev in events]
    collapsed = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
    assert collapsed == ["open", "remediating", "resolved"], _trail(store, incident.id)
    # The resolve task has run; the scheduler marks the run itself a moment later.
    assert airflow.wait_for_run(dag_id, f"incident-{incident.id}", timeout=60, echo=False)["state"] == "success"


def test_blocked_queries_and_a_detached_redis_replica_are_fixed_at_once(stack, airflow, wait_until):
    store = IncidentStore(stack.ops_dsn)
    pg1a, redis1a, redis1b = (_resource(stack, n) for n in ("pg1a", "redis1a", "redis1b"))
    since = datetime.now(UTC)

    before = _counter(pg1a)
    blocked = inject("block", stack.ops_dsn, "pg1a")  # app_user idle in transaction, 2 updates queued
    detached = inject("break-redis-replication", stack.ops_dsn, "redis1b")
    assert _redis_info(redis1b)["master_link_status"] == "down"
    try:
        blocking = wait_until(lambda: _finished(store, pg1a.id, "blocking_queries", since), 240,
                              "the blocking_queries incident on pg1a to finish", interval=3)
        replication = wait_until(lambda: _finished(store, redis1b.id, "redis_replication_broken", since), 180,
                                 "the redis_replication_broken incident on redis1b to finish", interval=3)
    finally:
        inject("unblock", stack.ops_dsn, "pg1a")
        if _redis_info(redis1b).get("master_port") != redis1a.port:
            redis.Redis(host=redis1b.host, port=redis1b.port).execute_command(
                "REPLICAOF", redis1a.host, str(redis1a.port))

    # Blocked queries: cancel cannot end an idle transaction, so the playbook terminates the blocker.
    _assert_resolved(store, blocking)
    _assert_clean_trail(store, blocking, "playbook_blocking_queries", airflow)
    steps = _steps(store, blocking.id)
    blocker = blocked.data["blocker_session_pid"]
    assert f"pg_cancel_backend to pid {blocker} (app_user" in steps["cancel"]
    assert "idle in transaction: there is no running query to cancel" in steps["cancel"]
    assert f"terminated pid {blocker} (app_user" in steps["terminate"], steps
    assert "verify_terminate" in steps and "verify_cancel" not in steps
    for pid in blocked.data["waiting_session_pids"]:
        assert str(pid) in steps["terminate"], "the reason names the blocked sessions"
    detection = store.events(blocking.id)[0].reason
    assert str(blocker) in detection, "the incident names the blocker"
    # The queued queries completed, and every client process of the fault has ended by itself.
    assert wait_until(lambda: all(not _alive(p) for p in blocked.data["client_pids"]), 30,
                      "the fault's client processes to exit")
    logs = {p.name: p.read_text() for p in Path(blocked.data["log_dir"]).glob("waiter*.log")}
    assert len(logs) == 2 and all("completed after" in text for text in logs.values()), logs
    assert _counter(pg1a) == before + 2, "both queued updates committed"

    # Redis replica: reattached to the inventory's primary.
    _assert_resolved(store, replication)
    _assert_clean_trail(store, replication, "playbook_redis_replication_broken", airflow)
    steps = _steps(store, replication.id)
    assert f"REPLICAOF {redis1a.host} {redis1a.port} on redis1b (was replica of {detached.data['now_following']}" \
        in steps["reattach"], steps
    info = _redis_info(redis1b)
    assert info["master_port"] == redis1a.port and info["master_link_status"] == "up"

    # One incident per fault, and no page: automation fixed both.
    assert [i.type for i in _incidents_since(store, pg1a.id, since)] == ["blocking_queries"]
    assert [i.type for i in _incidents_since(store, redis1b.id, since)] == ["redis_replication_broken"]
    assert _incidents_since(store, redis1a.id, since) == []
    assert _pages(stack, [blocking.id, replication.id]) == 0


def test_crashed_postgres_and_stopped_redis_are_restarted_at_once(stack, airflow, wait_until):
    store = IncidentStore(stack.ops_dsn)
    # pg1b (pg1a's follower): pg1a's own resource_down test must not meet this one's cooldown.
    pg1b, redis1a, redis1b = (_resource(stack, n) for n in ("pg1b", "redis1a", "redis1b"))
    cluster = cluster_for(pg1b.attrs, pg1b.port)
    since = datetime.now(UTC)

    killed = inject("kill-postgres", stack.ops_dsn, "pg1b")
    assert killed.data["pid"] and cluster.pidfile.exists(), "SIGKILL leaves a stale postmaster.pid"
    stopped = inject("stop-redis", stack.ops_dsn, "redis1a")
    assert stopped.data["stopped"]

    pg_down = wait_until(lambda: _finished(store, pg1b.id, "resource_down", since), 240,
                         "the resource_down incident on pg1b to finish", interval=3)
    redis_down = wait_until(lambda: _finished(store, redis1a.id, "resource_down", since), 180,
                            "the resource_down incident on redis1a to finish", interval=3)

    _assert_resolved(store, pg_down)
    _assert_clean_trail(store, pg_down, "playbook_resource_down", airflow)
    assert "started pg1b" in _steps(store, pg_down.id)["restart"]
    new_pid = int(cluster.pidfile.read_text().splitlines()[0])
    assert new_pid != killed.data["pid"] and _alive(new_pid)
    with psycopg.connect(f"postgresql://postgres@{pg1b.host}:{pg1b.port}/postgres", connect_timeout=5) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,), "pg1b is a follower again"

    _assert_resolved(store, redis_down)
    _assert_clean_trail(store, redis_down, "playbook_resource_down", airflow)
    assert "started redis-server redis1a" in _steps(store, redis_down.id)["restart"]
    assert redis.Redis(host=redis1a.host, port=redis1a.port, socket_timeout=5).ping()
    # Its replica follows it again by itself; a down primary is resource_down's, never a replication incident.
    wait_until(lambda: _redis_info(redis1b).get("master_link_status") == "up", 60, "redis1b to resync")
    assert _incidents_since(store, redis1b.id, since) == []
    assert [i.type for i in _incidents_since(store, pg1b.id, since)] == ["resource_down"]
    assert [i.type for i in _incidents_since(store, redis1a.id, since)] == ["resource_down"]
    assert _pages(stack, [pg_down.id, redis_down.id]) == 0
