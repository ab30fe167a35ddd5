"""Lock contention on a real PostgreSQL: the block fault, the blocking_queries probe, cancel and terminate."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from fleetmedic.actions.base import ActionContext
from fleetmedic.actions.queries import cancel_blockers, terminate_blockers
from fleetmedic.detection.checks import Target, run_one
from fleetmedic.inventory import Resource
from fleetmedic.localfleet.faults import FaultContext, FaultError
from fleetmedic.localfleet.faults.queries import BLOCK_TABLE, block, unblock
from fleetmedic.localfleet.fleet import DemoFleet
from fleetmedic.localfleet.services import (
    PostgresCluster,
    ServiceError,
    find_pg_bindir,
    free_port,
    port_in_use,
)

DB = "blocking_test"
THRESHOLD = 1.0  # seconds a session may wait on a lock before it counts as blocked (attrs override)


@pytest.fixture(scope="module")
def resource(pg_cluster: PostgresCluster, services_dir: Path) -> Resource:
    pg_cluster.create_database(DB)
    attrs = {"user": "postgres", "dbname": DB, "base_dir": str(services_dir / "srv-blocking" / "pgblock"),
             "blocking_threshold_seconds": THRESHOLD}
    return Resource(1, "pgblock", "postgres", "primary", "127.0.0.1", pg_cluster.port, None, None, True, attrs)


@pytest.fixture
def fault(resource: Resource) -> Iterator[dict]:
    """Inject `block` with the given options; always undone (its client processes stopped) afterwards."""
    injected: dict = {}

    def inject(**options):
        result = block(FaultContext("", resource, {"hold_seconds": 120, **options}))
        injected.update(result.data)
        return result

    yield inject  # type: ignore[misc]
    unblock(FaultContext("", resource))


def _dsn(resource: Resource) -> str:
    return f"postgresql://postgres@127.0.0.1:{resource.port}/{DB}"


def _counter(resource: Resource) -> int:
    """The row the fault's queued clients update (0 before the first block created it)."""
    with psycopg.connect(_dsn(resource)) as conn:
        conn.execute("SET lock_timeout = '5s'")
        if conn.execute("SELECT to_regclass(%s)", (BLOCK_TABLE,)).fetchone() == (None,):
            return 0
        row = conn.execute(f"SELECT n FROM {BLOCK_TABLE} WHERE id = 1").fetchone()
    assert row is not None
    return int(row[0])


def _probe(resource: Resource):
    target = Target(resource.id, resource.name, "postgres", resource.host, resource.port, dict(resource.attrs))
    return asyncio.run(run_one(target, "postgres.blocking_queries", 3))


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.3)


def _ctx(resource: Resource) -> ActionContext:
    return ActionContext(incident_id=1, incident_type="blocking_queries", resource=resource, ops_dsn="")


def _session_alive(resource: Resource, pid: int) -> bool:
    with psycopg.connect(_dsn(resource)) as conn:
        return conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() is not None


def test_quiet_database_is_healthy(resource):
    result = _probe(resource)
    assert result.healthy, result.reason
    assert result.value == 0.0 and "no session is blocked" in result.reason


def test_block_fault_is_found_naming_blocker_and_blocked_pids(resource, fault):
    result = fault(waiters=2)
    data = result.data
    assert data["user"] == "app_user" and len(data["waiting_session_pids"]) == 2, result.did
    assert "unblock pgblock" in result.undo

    probe = _wait(lambda: (r := _probe(resource)) and r.reason.startswith("2 session(s) blocked") and r, 15,
                  "the probe to see both queued sessions blocked past the threshold")
    assert not probe.healthy
    assert f"pid(s) {data['blocker_session_pid']}" in probe.reason, probe.reason
    for pid in data["waiting_session_pids"]:
        assert str(pid) in probe.reason, probe.reason
    assert probe.value is not None and probe.value >= THRESHOLD
    with psycopg.connect(_dsn(resource)) as conn:
        role = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = 'app_user'").fetchone()
    assert role == (False,), "the fault's blocker is a plain role automation may act on"


def test_a_second_block_on_the_same_resource_is_refused_until_undone(resource, fault):
    fault(waiters=1)
    with pytest.raises(FaultError, match="already has a block fault running"):
        block(FaultContext("", resource, {}))


def test_cancel_ends_an_active_blocker_and_the_queued_queries_complete(resource, fault):
    before = _counter(resource)
    data = fault(mode="active", waiters=2).data
    _wait(lambda: _probe(resource).reason.startswith("2 session(s) blocked"), 15,
          "both queued sessions to be blocked past the threshold")

    result = cancel_blockers(_ctx(resource))
    assert result.ok, result.reason
    assert result.data["signalled"] == [data["blocker_session_pid"]]
    assert sorted(result.data["blocked"]) == sorted(data["waiting_session_pids"])
    assert "sent pg_cancel_backend to pid" in result.reason and "the queue behind them is moving" in result.reason
    _wait(lambda: _counter(resource) == before + 2, 15, "both queued updates to commit")
    assert _probe(resource).healthy


def test_cancel_cannot_free_an_idle_transaction_so_terminate_does(resource, fault):
    before = _counter(resource)
    data = fault(mode="idle", waiters=2).data
    blocker = data["blocker_session_pid"]
    _wait(lambda: not _probe(resource).healthy, 15, "the block to be seen")

    cancelled = cancel_blockers(_ctx(resource))
    assert not cancelled.ok, cancelled.reason
    assert "idle in transaction" in cancelled.reason and cancelled.data["still_blocking"] == [blocker]
    assert _session_alive(resource, blocker) and _counter_unchanged(resource, before)

    terminated = terminate_blockers(_ctx(resource))
    assert terminated.ok, terminated.reason
    assert terminated.data["signalled"] == [blocker] and f"terminated pid {blocker}" in terminated.reason
    assert not _session_alive(resource, blocker)
    _wait(lambda: _counter(resource) == before + 2, 15, "both queued updates to commit")
    assert _probe(resource).healthy


def _counter_unchanged(resource: Resource, before: int) -> bool:
    with psycopg.connect(_dsn(resource)) as conn:
        conn.execute("SET lock_timeout = '200ms'")
        try:
            conn.execute(f"SELECT n FROM {BLOCK_TABLE}")
        except psycopg.errors.LockNotAvailable:
            return True  # still locked, so nothing could have changed it
    return _counter(resource) == before


def test_superuser_blocker_is_refused_by_cancel_and_terminate(resource, fault):
    data = fault(user="postgres", mode="idle", waiters=1).data
    blocker = data["blocker_session_pid"]
    _wait(lambda: not _probe(resource).healthy, 15, "the block to be seen")

    for action in (cancel_blockers, terminate_blockers):
        result = action(_ctx(resource))
        assert not result.ok, result.reason
        assert result.data["refused"] == [blocker] and result.data["signalled"] == []
        assert f"refused: pid {blocker} (postgres" in result.reason
        assert "superuser session" in result.reason and "never signals superusers" in result.reason
    assert _session_alive(resource, blocker), "a superuser session is never cancelled or terminated"
    assert not _probe(resource).healthy


def test_replication_session_blocker_is_refused(resource, pg_cluster, fault):
    """A walsender (a replication connection in database mode) holding a lock is never signalled."""
    with psycopg.connect(_dsn(resource), autocommit=True) as conn:
        conn.execute("DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'repl_user') THEN "
                     "CREATE ROLE repl_user LOGIN REPLICATION; END IF; END $$")
        conn.execute(f"CREATE TABLE IF NOT EXISTS {BLOCK_TABLE} (id int PRIMARY KEY, n bigint NOT NULL)")
        conn.execute(f"GRANT UPDATE ON {BLOCK_TABLE} TO repl_user")
    psql = subprocess.Popen(
        [str(find_pg_bindir() / "psql"), "-X", "-q",
         f"host=127.0.0.1 port={pg_cluster.port} user=repl_user dbname={DB} replication=database",
         "-c", f"BEGIN; LOCK TABLE {BLOCK_TABLE} IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(60); COMMIT;"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    waiter = None
    try:
        def walsender() -> int | None:
            with psycopg.connect(_dsn(resource)) as conn:
                row = conn.execute("SELECT pid FROM pg_stat_activity WHERE usename = 'repl_user' "
                                   "AND backend_type = 'walsender' AND query LIKE 'BEGIN; LOCK%'").fetchone()
            return int(row[0]) if row else None

        sender = _wait(walsender, 15, "the walsender to hold its lock")
        waiter = psycopg.connect(_dsn(resource), autocommit=True)
        threading.Thread(target=_update_ignoring_errors, args=(waiter,), daemon=True).start()
        _wait(lambda: not _probe(resource).healthy, 15, "the block to be seen")

        for action in (cancel_blockers, terminate_blockers):
            result = action(_ctx(resource))
            assert not result.ok, result.reason
            assert result.data["refused"] == [sender], result.reason
            assert "is a walsender process, not a client session" in result.reason
        assert walsender() == sender, "the replication session was left alone"
    finally:
        psql.kill()
        psql.wait(10)
        with psycopg.connect(_dsn(resource), autocommit=True) as conn:  # the test cleans up as a human would
            conn.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = 'repl_user'")
        if waiter is not None:
            _wait(lambda: _probe(resource).healthy, 15, "the lock to be released after psql ended")
            waiter.close()


def _update_ignoring_errors(conn: psycopg.Connection) -> None:
    try:
        conn.execute(f"UPDATE {BLOCK_TABLE} SET n = n WHERE id = 1")
    except psycopg.Error:
        pass


def test_nothing_blocked_means_nothing_to_cancel(resource):
    result = cancel_blockers(_ctx(resource))
    assert result.ok and result.data["signalled"] == []
    assert "nothing to cancel" in result.reason


def test_block_refuses_a_follower(services_dir):
    """A follower is read-only: the fault says so instead of failing half way."""
    fleet = None
    for attempt in range(3):  # other programs on this machine may take a port between the check and the start
        base = next(p for p in (free_port() for _ in range(50)) if not port_in_use(p + 1))
        fleet = DemoFleet(services_dir / f"blocking-fleet-{attempt}", pairs=1, redis_pairs=0, base_port=base)
        try:
            fleet.up(progress=lambda _m: None)
            break
        except ServiceError:
            fleet.down(progress=lambda _m: None)
            if attempt == 2:
                raise
    assert fleet is not None
    try:
        member = next(m for m in fleet.members() if m.role == "follower")
        replica = Resource(2, member.name, "postgres", "follower", "127.0.0.1", member.port, None, 1, True,
                           member.attrs)
        with pytest.raises(FaultError, match=f"block needs a writable primary: {member.name} is a follower"):
            block(FaultContext("", replica, {}))
    finally:
        fleet.down(progress=lambda _m: None)


def _disk(resource: Resource, **attrs):
    target = Target(resource.id, resource.name, "postgres", resource.host, resource.port,
                    {**resource.attrs, **attrs})
    return asyncio.run(run_one(target, "postgres.disk_usage", 3))


def test_disk_usage_against_a_quota(resource):
    with psycopg.connect(_dsn(resource)) as conn:
        row = conn.execute("SELECT sum(pg_database_size(datname)) FROM pg_database WHERE datallowconn").fetchone()
    assert row is not None
    size = int(row[0])
    roomy = _disk(resource, disk_quota_bytes=size * 4)
    assert roomy.healthy and roomy.value is not None and 20 < roomy.value < 30, roomy.reason
    assert "quota" in roomy.reason and "under the 90% limit" in roomy.reason
    full = _disk(resource, disk_quota_bytes=size)
    assert not full.healthy and full.value is not None and full.value >= 90, full.reason
    assert "at or above the 90% limit" in full.reason
    bad = _disk(resource, disk_quota_bytes="lots")
    assert not bad.healthy and "must be a number of bytes" in bad.reason


def test_disk_usage_of_a_local_data_directory_filesystem(resource, pg_cluster):
    import os

    st = os.statvfs(pg_cluster.datadir)
    used = 100.0 * (st.f_blocks - st.f_bfree) / st.f_blocks
    result = _disk(resource, disk_usage_max_percent=100)
    assert result.healthy and result.value is not None and abs(result.value - used) < 2, result.reason
    assert f"filesystem of {pg_cluster.datadir}" in result.reason
    tight = _disk(resource, disk_usage_max_percent=max(0.0, used - 1))
    assert not tight.healthy and "at or above" in tight.reason


def test_disk_usage_of_a_remote_resource_needs_a_quota(resource):
    result = _disk(resource, server={"name": "db1", "provider": "aws", "address": "i-123", "attrs": {}})
    assert result.healthy and result.value is None
    assert "not measured" in result.reason and "disk_quota_bytes" in result.reason
