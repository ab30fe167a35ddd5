"""End to end, in a real Airflow: replication and backups on pg3 and pg4.

- pg3 (left healthy): replay paused on pg3b while pg3a is written to, and pg3a's base backups made
  older than their limit, both at once. follower_behind resumes replay and resolves;
  old_base_backup starts a backup, waits in await_resolution, and the sweep resolves it.
- pg4: a changeover moves pg4a to a new server while a client keeps writing (no committed row
  lost, pg4b follows the new primary); then pg4a's data directory is lost and resource_down fails
  over to pg4b (destructive: runs last).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from fleetmedic.detection.checks import Target, run_one
from fleetmedic.incidents.store import IncidentStore
from fleetmedic.inventory import Resource, get_resource
from fleetmedic.localfleet.backups import store_for_attrs
from fleetmedic.localfleet.faults import inject
from fleetmedic.localfleet.faults.replication import writer_for
from fleetmedic.localfleet.fleet import cluster_for

pytestmark = pytest.mark.e2e


def _res(stack, name: str) -> Resource:
    with psycopg.connect(stack.ops_dsn) as conn:
        return get_resource(conn, name)


def _probe(stack, name: str, check: str):
    res = _res(stack, name)
    attrs = {**res.attrs, "role": res.role}
    return asyncio.run(run_one(Target(res.id, res.name, res.kind, res.host, res.port, attrs), check, 5))


def _incident(store, resource_id: int, type_: str, states, exclude=frozenset()):
    for inc in store.list(type=type_, resource_id=resource_id, limit=20):
        if inc.state in states and inc.id not in exclude:
            return inc
    return None


def _ids(store, resource_id: int) -> frozenset[int]:
    return frozenset(i.id for i in store.list(resource_id=resource_id, limit=100))


def _done_steps(store, incident_id: int) -> dict:
    return {ev.step: ev for ev in store.events(incident_id)
            if ev.step and (ev.data or {}).get("step_status") == "done"}


def _pages(stack, incident_id: int) -> int:
    with psycopg.connect(stack.ops_dsn) as conn:
        return int(conn.execute("SELECT count(*) FROM pages WHERE incident_id = %s", (incident_id,)).fetchone()[0])


def _pg(res: Resource, sql: str, params=()):
    with psycopg.connect(host=res.host, port=res.port, user="postgres", dbname="postgres", autocommit=True,
                         connect_timeout=5) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else None


def test_paused_replay_and_an_old_base_backup_are_found_and_fixed(stack, airflow, wait_until):
    store = IncidentStore(stack.ops_dsn)
    pg3a, pg3b = _res(stack, "pg3a"), _res(stack, "pg3b")
    backups = store_for_attrs(pg3a.attrs)
    assert backups is not None and backups.newest("pg3a") is not None, "fleet up took a first base backup of pg3a"
    assert _probe(stack, "pg3b", "postgres.replication_lag").healthy
    assert _probe(stack, "pg3a", "postgres.base_backup_age").healthy

    known = _ids(store, pg3a.id) | _ids(store, pg3b.id)
    paused = inject("pause-replay", stack.ops_dsn, "pg3b", seconds=300)
    aged = inject("age-backup", stack.ops_dsn, "pg3a")
    try:
        assert "paused WAL replay on pg3b" in paused.did and "27 h ago" in aged.did
        behind = wait_until(lambda: _incident(store, pg3b.id, "follower_behind", {"resolved"}, known), 240,
                            "follower_behind on pg3b to resolve", interval=3)
        waiting = wait_until(
            lambda: (i := _incident(store, pg3a.id, "old_base_backup", {"await_resolution", "resolved"}, known))
            and any(e.to_state == "await_resolution" for e in store.events(i.id)) and i,
            240, "old_base_backup on pg3a to reach await_resolution", interval=3)
        backup = wait_until(lambda: _incident(store, pg3a.id, "old_base_backup", {"resolved"}, known), 180,
                            "the sweep to resolve old_base_backup once the backup is complete", interval=3)
    finally:
        inject("resume-replay", stack.ops_dsn, "pg3b")
        inject("restore-backup-age", stack.ops_dsn, "pg3a")

    # follower_behind: resumed, caught up, resolved by the playbook, nobody paged.
    steps = _done_steps(store, behind.id)
    assert steps["resume_replay"].reason.startswith("resumed WAL replay on pg3b: it was paused at ")
    assert steps["catch_up"].data["outcome"] == "healthy", steps["catch_up"].reason
    assert "restart" not in steps and "rebuild" not in steps
    events = store.events(behind.id)
    assert events[0].reason.startswith("postgres.replication_lag failed") and "WAL replay is paused" in events[0].reason
    states = [e.to_state for e in events]
    assert [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]] == ["open", "remediating", "resolved"]
    assert airflow.get_run("playbook_follower_behind", f"incident-{behind.id}")["state"] == "success"
    assert _pages(stack, behind.id) == 0

    # old_base_backup: a real backup started, the incident waited, the sweep resolved it.
    assert waiting.id == backup.id
    steps = _done_steps(store, backup.id)
    assert steps["take_backup"].reason.startswith("started a base backup of pg3a into "), steps["take_backup"].reason
    events = store.events(backup.id)
    assert [e.to_state for e in events][-2:] == ["await_resolution", "resolved"]
    assert events[-1].actor == "detection:fleet_sweep"
    assert events[-1].reason.startswith("postgres.base_backup_age passes again"), events[-1].reason
    newest = backups.newest("pg3a")
    assert newest is not None and newest.original_completed_at is None and (newest.age().total_seconds() < 600)
    assert (newest.path / "tar" / "base.tar").stat().st_size > 1_000_000
    assert _pages(stack, backup.id) == 0

    assert not writer_for(pg3b).running()
    wait_until(lambda: _probe(stack, "pg3b", "postgres.replication_caught_up").healthy, 60, "pg3b caught up")
    assert _probe(stack, "pg3a", "postgres.base_backup_age").healthy


class Writer(threading.Thread):
    """A client writing rows to the database it looks up in the inventory by name, reconnecting on errors."""

    def __init__(self, ops_dsn: str, name: str):
        super().__init__(daemon=True)
        self.ops_dsn, self.db = ops_dsn, name
        self.committed: list[int] = []
        self.errors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                with psycopg.connect(self.ops_dsn) as conn:
                    res = get_resource(conn, self.db)
                with psycopg.connect(host=res.host, port=res.port, user="postgres", dbname="postgres",
                                     autocommit=True, connect_timeout=2) as conn:
                    while not self.stop.is_set():
                        n += 1
                        conn.execute("INSERT INTO changeover_rows (id) VALUES (%s)", (n,))
                        self.committed.append(n)  # only once the commit has returned
                        time.sleep(0.02)
            except psycopg.Error:
                self.errors += 1
                time.sleep(0.2)


def test_changeover_moves_pg4a_to_a_new_server_with_writes_going_on(stack, airflow, wait_until):
    store = IncidentStore(stack.ops_dsn)
    before = _res(stack, "pg4a")
    _pg(before, "CREATE TABLE changeover_rows (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())")
    writer = Writer(stack.ops_dsn, "pg4a")
    writer.start()
    try:
        wait_until(lambda: len(writer.committed) > 100, 30, "the client to be writing", interval=0.5)
        env = {**os.environ, **stack.env_values()}
        cli = Path(sys.executable).parent / "fleetmedic"
        out = subprocess.run([str(cli), "changeover", "start", "pg4a", "--reason", "e2e: retire srv-pg4a",
                              "--by", "e2e", "--json"], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        started = json.loads(out.stdout)
        assert started["created"] and started["run_id"] == f"incident-{started['incident_id']}"
        incident = wait_until(
            lambda: (i := store.get(started["incident_id"])).state in ("resolved", "escalated") and i,
            300, "the changeover to finish", interval=3)
        assert incident.state == "resolved", "\n".join(f"{e.to_state} {e.step}: {e.reason}"
                                                       for e in store.events(incident.id))
        during = len(writer.committed)
        wait_until(lambda: len(writer.committed) > during + 100, 60, "writes on the new server", interval=0.5)
    finally:
        writer.stop.set()
        writer.join(15)

    steps = _done_steps(store, incident.id)
    assert list(steps)[-6:] == ["create_follower", "catch_up", "promote", "repoint", "retire", "verify"], list(steps)
    assert steps["create_follower"].reason.startswith("created a follower of pg4a on new server srv-pg4a-2")
    assert steps["promote"].reason.startswith("stopped the old primary pg4a cleanly")
    assert "pg4b: follower on port" in steps["repoint"].reason
    assert steps["retire"].reason.startswith("retired srv-pg4a ")
    assert airflow.get_run("playbook_changeover", f"incident-{incident.id}")["state"] == "success"
    assert _pages(stack, incident.id) == 0

    after = _res(stack, "pg4a")
    assert after.server is not None and after.server.name == "srv-pg4a-2" and after.port != before.port
    rows = {r[0] for r in _pg(after, "SELECT id FROM changeover_rows")}
    lost = set(writer.committed) - rows
    assert not lost, f"{len(lost)} committed rows lost, e.g. {sorted(lost)[:10]}"
    assert len(writer.committed) > 200 and writer.errors >= 1, (len(writer.committed), writer.errors)
    with psycopg.connect(stack.ops_dsn) as conn:
        old_state = conn.execute("SELECT state FROM servers WHERE name = 'srv-pg4a'").fetchone()
    assert old_state == ("retired",)
    wait_until(lambda: _probe(stack, "pg4b", "postgres.replication_caught_up").healthy, 60, "pg4b to follow")
    assert _pg(_res(stack, "pg4b"), "SELECT count(*) FROM changeover_rows")[0][0] == len(rows)
    assert _probe(stack, "pg4a", "postgres.connect").healthy


@pytest.mark.e2e_last
def test_lost_primary_fails_over_to_its_follower(stack, airflow, wait_until):
    store = IncidentStore(stack.ops_dsn)
    pg4a = _res(stack, "pg4a")
    _pg(pg4a, "CREATE TABLE IF NOT EXISTS before_failover (id int)")
    _pg(pg4a, "INSERT INTO before_failover SELECT generate_series(1, 1000)")
    wait_until(lambda: _probe(stack, "pg4b", "postgres.replication_caught_up").healthy, 60, "pg4b caught up")
    known = _ids(store, pg4a.id)
    cluster = cluster_for(pg4a.attrs, pg4a.port)
    cluster.stop(mode="immediate")
    shutil.rmtree(cluster.datadir)

    incident = wait_until(lambda: _incident(store, pg4a.id, "resource_down", {"resolved", "escalated"}, known), 300,
                          "resource_down on pg4a to end", interval=3)
    steps = _done_steps(store, incident.id)
    assert incident.state == "resolved", [(s, e.reason) for s, e in steps.items()]
    assert "data directory" in steps["restart"].reason and steps["restart"].data["outcome"] == "error"
    assert steps["failover"].reason.startswith("promoted pg4b (127.0.0.1:"), steps["failover"].reason
    assert "fenced pg4a" in steps["failover"].reason
    assert _pages(stack, incident.id) == 0

    new, old = _res(stack, "pg4b"), _res(stack, "pg4a")
    assert new.role == "primary" and new.primary_id is None
    assert old.role == "follower" and not old.enabled and old.attrs["fenced"]["new_primary"] == "pg4b"
    assert _pg(new, "SELECT pg_is_in_recovery()")[0][0] is False
    assert _pg(new, "SELECT count(*) FROM before_failover")[0][0] == 1000
    _pg(new, "INSERT INTO before_failover VALUES (1001)")
    backups = store_for_attrs(new.attrs)
    assert backups is not None
    wait_until(lambda: backups.newest("pg4b") is not None, 60, "the new primary's first base backup")
    assert _probe(stack, "pg4b", "postgres.base_backup_age").healthy
    # pg4a is fenced out of the sweep (disabled): nothing opened for it but the incident that failed it over.
    assert [i.id for i in store.list(resource_id=old.id, limit=20) if i.id not in known] == [incident.id]
