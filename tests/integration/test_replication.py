"""Replication and backups on real PostgreSQL primary/follower pairs: checks, faults and actions."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from helpers import add_resource, query

from fleetmedic.actions.base import ActionContext, ActionResult
from fleetmedic.actions.registry import ACTIONS
from fleetmedic.detection.checks import Target, run_one
from fleetmedic.detection.probes.replication import measure_lag
from fleetmedic.inventory import Resource, get_resource
from fleetmedic.localfleet.backups import BackupStore, store_for_attrs
from fleetmedic.localfleet.faults import inject
from fleetmedic.localfleet.faults.replication import CHAOS_TABLE, writer_for
from fleetmedic.localfleet.fleet import DemoFleet, cluster_for
from fleetmedic.localfleet.services import free_port, port_in_use

_homes = iter(range(1, 1000))


def _port_block(size: int) -> int:
    # Below the ephemeral range: a client socket's port in TIME_WAIT can make PostgreSQL's bind fail.
    for _ in range(500):
        base = random.randint(20000, 32000 - size)
        if not any(port_in_use(base + i) for i in range(size)):
            return base
    raise RuntimeError(f"no block of {size} free ports")


def _fleet(services_dir: Path, pairs: int) -> DemoFleet:
    home = services_dir / f"replication-fleet-{next(_homes)}"
    fleet = DemoFleet(home, pairs=pairs, redis_pairs=0, base_port=_port_block(2 * pairs + 1))
    fleet.up(progress=lambda _line: None)
    return fleet


def _down(fleet: DemoFleet) -> None:
    for m in fleet.members():
        writer_for(_fake_resource(m.name, m.base_dir)).stop(timeout=5)
    fleet.down(progress=lambda _line: None)


def _fake_resource(name: str, base_dir: Path) -> Resource:
    return Resource(0, name, "postgres", "follower", "127.0.0.1", 0, None, None, True, {"base_dir": str(base_dir)})


@pytest.fixture(scope="module")
def pair_fleet(services_dir: Path) -> Iterator[DemoFleet]:
    """One primary/follower pair (pg1a, pg1b) shared by the tests that leave it as they found it."""
    fleet = _fleet(services_dir, 1)
    yield fleet
    _down(fleet)


@pytest.fixture
def pair(pair_fleet: DemoFleet, ops_dsn: str) -> DemoFleet:
    pair_fleet.register(ops_dsn)
    return pair_fleet


@pytest.fixture
def own_pair(services_dir: Path, ops_dsn: str) -> Iterator[DemoFleet]:
    """A pair of its own, for tests that change the topology for good (failover, changeover)."""
    fleet = _fleet(services_dir, 1)
    fleet.register(ops_dsn)
    yield fleet
    _down(fleet)


def resource(dsn: str, name: str) -> Resource:
    with psycopg.connect(dsn) as conn:
        return get_resource(conn, name)


def target(res: Resource) -> Target:
    attrs = dict(res.attrs)
    attrs["role"] = res.role
    return Target(res.id, res.name, res.kind, res.host, res.port, attrs)


def probe(dsn: str, name: str, check: str, timeout: float = 5.0):
    return asyncio.run(run_one(target(resource(dsn, name)), check, timeout))


def act(dsn: str, action: str, name: str, **params) -> ActionResult:
    ctx = ActionContext(incident_id=1, incident_type="test", resource=resource(dsn, name), ops_dsn=dsn,
                        params=params)
    result = ACTIONS[action].fn(ctx)
    assert result.reason.strip(), f"{action} returned no reason"
    return result


def set_attrs(dsn: str, name: str, **attrs) -> None:
    import json

    query(dsn, "UPDATE resources SET attrs = attrs || %s::jsonb WHERE name = %s", (json.dumps(attrs), name))


def pg(res: Resource, sql: str, params=()):
    with psycopg.connect(host=res.host, port=res.port, user="postgres", dbname="postgres", autocommit=True,
                         connect_timeout=5) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else None


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# -- checks -------------------------------------------------------------------------------------


def test_caught_up_follower_is_healthy_and_a_primary_is_measured_on_its_followers(pair, ops_dsn):
    follower = probe(ops_dsn, "pg1b", "postgres.replication_lag")
    assert follower.healthy and follower.value == 0.0, follower.reason
    assert follower.reason.startswith("caught up: follower 127.0.0.1:") and "has replayed up to" in follower.reason
    primary = probe(ops_dsn, "pg1a", "postgres.replication_lag")
    assert primary.healthy and "is a primary" in primary.reason


def test_idle_primary_does_not_look_like_lag(pair, ops_dsn):
    # A one-second limit: the naive "now - last replayed commit" would call this follower late.
    set_attrs(ops_dsn, "pg1b", replication_lag_max_seconds=1)
    pg(resource(ops_dsn, "pg1a"), "CREATE TABLE IF NOT EXISTS idle_probe (id int)")
    time.sleep(2.5)  # nothing is written meanwhile
    f = resource(ops_dsn, "pg1b")
    reading = asyncio.run(measure_lag(f.host, f.port, 5, f.attrs))
    assert reading.bytes == 0 and reading.caught_up
    assert reading.seconds is not None and reading.seconds >= 2, "the last replayed commit is old: the primary is idle"
    for check in ("postgres.replication_lag", "postgres.replication_caught_up"):
        result = probe(ops_dsn, "pg1b", check)
        assert result.healthy, result.reason


def test_paused_replay_with_writes_on_the_primary_is_lag_and_resume_replay_fixes_it(pair, ops_dsn):
    set_attrs(ops_dsn, "pg1b", replication_lag_max_seconds=2)
    fault = inject("pause-replay", ops_dsn, "pg1b", seconds=60)
    try:
        assert "paused WAL replay on pg1b" in fault.did and fault.undo == "fleetmedic chaos resume-replay pg1b"
        lag = wait_for(lambda: (r := probe(ops_dsn, "pg1b", "postgres.replication_lag")).healthy is False and r,
                       20, "pg1b to look lagging")
        assert lag.value and lag.value > 0
        assert "lagging: follower" in lag.reason and "WAL replay is paused" in lag.reason, lag.reason
        assert not probe(ops_dsn, "pg1b", "postgres.replication_caught_up").healthy
        primary_rows = pg(resource(ops_dsn, "pg1a"), f"SELECT count(*) FROM {CHAOS_TABLE}")[0][0]
        assert primary_rows >= 2, "the writer keeps writing on the primary"

        resumed = act(ops_dsn, "postgres.resume_replay", "pg1b")
        assert resumed.ok and resumed.reason.startswith("resumed WAL replay on pg1b: it was paused at "), resumed.reason
        healthy = wait_for(lambda: (r := probe(ops_dsn, "pg1b", "postgres.replication_caught_up")).healthy and r,
                           20, "pg1b to catch up")
        assert healthy.reason.startswith(("caught up", "within limits")), healthy.reason
        again = act(ops_dsn, "postgres.resume_replay", "pg1b")
        assert not again.ok and "is not paused" in again.reason
    finally:
        inject("resume-replay", ops_dsn, "pg1b")
    assert not writer_for(resource(ops_dsn, "pg1b")).running()


def test_follower_or_primary_down_is_connect_territory_but_never_caught_up(pair, ops_dsn):
    follower = cluster_for(resource(ops_dsn, "pg1b").attrs, resource(ops_dsn, "pg1b").port)
    primary = cluster_for(resource(ops_dsn, "pg1a").attrs, resource(ops_dsn, "pg1a").port)
    follower.stop()
    try:
        lenient = probe(ops_dsn, "pg1b", "postgres.replication_lag")
        assert lenient.healthy and lenient.reason.startswith("lag not measured: follower 127.0.0.1:")
        strict = probe(ops_dsn, "pg1b", "postgres.replication_caught_up")
        assert not strict.healthy and "does not answer" in strict.reason
    finally:
        follower.start()
    primary.stop()
    try:
        lenient = probe(ops_dsn, "pg1b", "postgres.replication_lag")
        assert lenient.healthy and "lag not measured: primary 127.0.0.1:" in lenient.reason
        assert not probe(ops_dsn, "pg1b", "postgres.replication_caught_up").healthy
    finally:
        primary.start()
    wait_for(lambda: probe(ops_dsn, "pg1b", "postgres.replication_caught_up").healthy, 30, "pg1b to stream again")


def test_base_backup_age_reads_the_store_and_age_backup_makes_it_old(pair, ops_dsn):
    fresh = probe(ops_dsn, "pg1a", "postgres.base_backup_age")
    assert fresh.healthy and fresh.value is not None and fresh.value < 1, fresh.reason
    assert "newest base backup" in fresh.reason and "limit 26 h" in fresh.reason
    follower = probe(ops_dsn, "pg1b", "postgres.base_backup_age")
    assert follower.healthy and "base backups are taken of primaries" in follower.reason

    fault = inject("age-backup", ops_dsn, "pg1a")
    try:
        assert "27 h ago" in fault.did and "restore-backup-age pg1a" in fault.undo
        old = probe(ops_dsn, "pg1a", "postgres.base_backup_age")
        assert not old.healthy and old.value is not None and 26.9 < old.value < 27.1, old.reason
        assert old.reason.startswith("too old: newest base backup")
        # A tighter limit per resource counts too.
        set_attrs(ops_dsn, "pg1a", base_backup_max_age="30h")
        assert probe(ops_dsn, "pg1a", "postgres.base_backup_age").healthy
        set_attrs(ops_dsn, "pg1a", base_backup_max_age="26h")
    finally:
        restored = inject("restore-backup-age", ops_dsn, "pg1a")
    assert "restored the real completion time" in restored.did
    assert probe(ops_dsn, "pg1a", "postgres.base_backup_age").healthy


def test_a_primary_with_no_backup_is_unhealthy(pair, ops_dsn, tmp_path):
    set_attrs(ops_dsn, "pg1a", backup_store=str(tmp_path / "empty-store"))
    result = probe(ops_dsn, "pg1a", "postgres.base_backup_age")
    assert not result.healthy and "has no complete base backup" in result.reason


def test_take_base_backup_runs_a_real_backup_in_the_background_and_never_doubles(pair, ops_dsn):
    store = store_for_attrs(resource(ops_dsn, "pg1a").attrs)
    assert store is not None
    before = store.newest("pg1a")
    inject("age-backup", ops_dsn, "pg1a")
    assert not probe(ops_dsn, "pg1a", "postgres.base_backup_age").healthy

    started = act(ops_dsn, "postgres.take_base_backup", "pg1a")
    assert started.ok and started.reason.startswith("started a base backup of pg1a into "), started.reason
    second = act(ops_dsn, "postgres.take_base_backup", "pg1a")
    assert second.ok and "already running" in second.reason, second.reason
    wait_for(lambda: store.running("pg1a") is None, 60, "the background backup to finish")
    newest = store.newest("pg1a")
    assert newest is not None and newest.path != (before.path if before else None)
    assert (newest.path / "tar" / "base.tar").stat().st_size > 1_000_000
    assert (newest.path / "tar" / "backup_manifest").exists()
    assert probe(ops_dsn, "pg1a", "postgres.base_backup_age").healthy

    synchronous = act(ops_dsn, "postgres.take_base_backup", "pg1a", wait=True)
    assert synchronous.ok and synchronous.reason.startswith("took a base backup of pg1a in ")
    assert len(store.complete("pg1a")) <= 3, "old backups are pruned"
    refused = act(ops_dsn, "postgres.take_base_backup", "pg1b")
    assert not refused.ok and "base backups are taken of primaries" in refused.reason
    store.restore_ages("pg1a")


def test_restart_follower_restarts_it_and_it_streams_again(pair, ops_dsn):
    before = pg(resource(ops_dsn, "pg1b"), "SELECT pg_postmaster_start_time()")[0][0]
    result = act(ops_dsn, "postgres.restart_follower", "pg1b")
    assert result.ok and result.reason.startswith("restarted follower pg1b on port "), result.reason
    assert result.data["streaming"], result.reason
    assert pg(resource(ops_dsn, "pg1b"), "SELECT pg_postmaster_start_time()")[0][0] > before
    refused = act(ops_dsn, "postgres.restart_follower", "pg1a")
    assert not refused.ok and "restarts followers only" in refused.reason


def test_rebuild_follower_makes_a_new_data_directory_from_the_primary(pair, ops_dsn):
    primary, follower = resource(ops_dsn, "pg1a"), resource(ops_dsn, "pg1b")
    fcluster = cluster_for(follower.attrs, follower.port)
    old_sysid = pg(follower, "SELECT system_identifier FROM pg_control_system()")[0][0]
    marker = (fcluster.datadir / "fleetmedic-old-data-marker")
    marker.write_text("old")
    pg(primary, "CREATE TABLE IF NOT EXISTS rebuild_marker (note text)")
    pg(primary, "INSERT INTO rebuild_marker VALUES ('written before the rebuild')")

    result = act(ops_dsn, "postgres.rebuild_follower", "pg1b")
    assert result.ok, result.reason
    assert result.reason.startswith("rebuilt pg1b from a fresh base backup of pg1a") and "streaming" in result.reason
    assert not marker.exists(), "the data directory is new"
    assert not list(fcluster.base_dir.glob("data.before-rebuild-*")), "the old one is removed after success"
    assert pg(follower, "SELECT pg_is_in_recovery()")[0][0] is True
    assert pg(follower, "SELECT system_identifier FROM pg_control_system()")[0][0] == old_sysid
    wait_for(lambda: pg(follower, "SELECT count(*) FROM rebuild_marker")[0][0] >= 1, 20, "the row on pg1b")
    assert probe(ops_dsn, "pg1b", "postgres.replication_caught_up").healthy


def test_rebuild_refuses_a_follower_that_is_not_in_recovery(own_pair, ops_dsn):
    follower = resource(ops_dsn, "pg1b")
    pg(follower, "SELECT pg_promote(true, 30)")
    result = act(ops_dsn, "postgres.rebuild_follower", "pg1b")
    assert not result.ok and "refusing to rebuild pg1b: it is not in recovery" in result.reason
    lag = probe(ops_dsn, "pg1b", "postgres.replication_lag")
    assert not lag.healthy and "is not in recovery" in lag.reason
    restart = act(ops_dsn, "postgres.restart_follower", "pg1b")
    assert not restart.ok and "refusing to restart pg1b" in restart.reason


# -- failover ------------------------------------------------------------------------------------


def test_failover_fences_the_primary_promotes_the_follower_and_repoints_the_inventory(own_pair, ops_dsn):
    old = resource(ops_dsn, "pg1a")
    pg(old, "CREATE TABLE before_failover (id int)")
    pg(old, "INSERT INTO before_failover SELECT generate_series(1, 100)")
    wait_for(lambda: probe(ops_dsn, "pg1b", "postgres.replication_caught_up").healthy, 20, "pg1b caught up")

    refused = act(ops_dsn, "resource.failover", "pg1a")
    assert not refused.ok and "refusing to fail over pg1a: it still answers as a primary" in refused.reason
    follower_only = act(ops_dsn, "resource.failover", "pg1b")
    assert not follower_only.ok and "pg1b is a follower; failover promotes a primary's follower" in follower_only.reason

    old_cluster = cluster_for(old.attrs, old.port)
    old_cluster.stop(mode="immediate")
    result = act(ops_dsn, "resource.failover", "pg1a")
    assert result.ok, result.reason
    assert result.reason.startswith("promoted pg1b (127.0.0.1:"), result.reason
    assert "fenced pg1a: wrote standby.signal" in result.reason and "started a base backup of pg1b" in result.reason

    new = resource(ops_dsn, "pg1b")
    assert new.role == "primary" and new.primary_id is None and new.attrs["promoted"]["from"] == "pg1a"
    fenced = resource(ops_dsn, "pg1a")
    assert fenced.role == "follower" and fenced.primary_id == new.id and not fenced.enabled
    assert fenced.attrs["fenced"]["new_primary"] == "pg1b"
    assert pg(new, "SELECT pg_is_in_recovery()")[0][0] is False
    assert pg(new, "SELECT count(*) FROM before_failover")[0][0] == 100
    pg(new, "INSERT INTO before_failover VALUES (101)")
    store = store_for_attrs(new.attrs)
    assert store is not None
    wait_for(lambda: store.newest("pg1b") is not None, 60, "the new primary's first base backup")

    # The fence holds: whatever starts the old primary again gets a read-only standby, not a second primary.
    old_cluster.start()
    assert pg(old, "SELECT pg_is_in_recovery()")[0][0] is True
    old_cluster.stop(mode="fast")

    # With its only follower gone, the new primary has nothing to fail over to.
    cluster_for(new.attrs, new.port).stop(mode="fast")
    none_left = act(ops_dsn, "resource.failover", "pg1b")
    assert not none_left.ok and none_left.reason == "pg1b has no follower in the inventory to promote"


def test_redis_failover_is_not_automated(ops_dsn):
    redis = Resource(1, "redis9a", "redis", "primary", "127.0.0.1", 6379, None, None, True, {})
    ctx = ActionContext(incident_id=1, incident_type="resource_down", resource=redis, ops_dsn=ops_dsn)
    result = ACTIONS["resource.failover"].fn(ctx)
    assert not result.ok and result.reason.startswith("Redis failover is not automated")


# -- changeover ----------------------------------------------------------------------------------


class Writer(threading.Thread):
    """A client that writes rows to a database it looks up in the inventory, reconnecting on errors."""

    def __init__(self, ops_dsn: str, name: str):
        super().__init__(daemon=True)
        self.ops_dsn, self.db = ops_dsn, name
        self.committed: list[int] = []
        self.errors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            res = resource(self.ops_dsn, self.db)
            try:
                with psycopg.connect(host=res.host, port=res.port, user="postgres", dbname="postgres",
                                     autocommit=True, connect_timeout=2) as conn:
                    while not self.stop.is_set():
                        n += 1
                        conn.execute("INSERT INTO moving_rows (id) VALUES (%s)", (n,))
                        self.committed.append(n)  # only after the commit returned
                        time.sleep(0.01)
            except psycopg.Error:
                self.errors += 1
                time.sleep(0.2)


def test_changeover_moves_a_live_primary_to_a_new_server_without_losing_a_committed_row(own_pair, ops_dsn):
    before = resource(ops_dsn, "pg1a")
    pg(before, "CREATE TABLE moving_rows (id bigint PRIMARY KEY, at timestamptz DEFAULT now())")
    writer = Writer(ops_dsn, "pg1a")
    writer.start()
    try:
        wait_for(lambda: len(writer.committed) > 50, 20, "the writer to get going")
        created = act(ops_dsn, "postgres.changeover_create_follower", "pg1a")
        assert created.ok and created.reason.startswith("created a follower of pg1a on new server srv-pg1a-2"), \
            created.reason
        plan = resource(ops_dsn, "pg1a").attrs["changeover"]
        assert plan["old"]["server"] == "srv-pg1a" and plan["new"]["server"] == "srv-pg1a-2"
        wait_for(lambda: probe(ops_dsn, "pg1a", "postgres.changeover_caught_up").healthy, 30,
                 "the new server to catch up")
        promoted = act(ops_dsn, "postgres.changeover_promote", "pg1a")
        assert promoted.ok and promoted.reason.startswith("stopped the old primary pg1a cleanly"), promoted.reason
        silences = query(ops_dsn, "SELECT count(*) AS n FROM silences WHERE removed_at IS NULL")
        assert silences[0]["n"] == 1, "the switch is silenced"
        repointed = act(ops_dsn, "postgres.changeover_repoint", "pg1a")
        assert repointed.ok and "now points at srv-pg1a-2" in repointed.reason, repointed.reason
        assert "pg1b: follower on port" in repointed.reason and "now streams from 127.0.0.1:" in repointed.reason
        retired = act(ops_dsn, "postgres.changeover_retire", "pg1a")
        assert retired.ok and retired.reason.startswith("retired srv-pg1a"), retired.reason
        assert probe(ops_dsn, "pg1a", "postgres.connect").healthy
        committed_during = len(writer.committed)
        wait_for(lambda: len(writer.committed) > committed_during + 50, 30, "writes on the new server")
    finally:
        writer.stop.set()
        writer.join(10)
    after = resource(ops_dsn, "pg1a")
    assert after.port != before.port and after.server and after.server.name == "srv-pg1a-2"
    assert "changeover" not in after.attrs and after.attrs["changeovers"][0]["new"]["server"] == "srv-pg1a-2"
    assert writer.errors >= 1, "the writer saw the switch (writes fail between stop and repoint)"
    rows = {r[0] for r in pg(after, "SELECT id FROM moving_rows")}
    missing = set(writer.committed) - rows
    assert not missing, f"{len(missing)} committed rows lost: {sorted(missing)[:10]}"
    assert pg(after, "SELECT pg_is_in_recovery()")[0][0] is False
    old_server = query(ops_dsn, "SELECT state FROM servers WHERE name = 'srv-pg1a'")
    assert old_server[0]["state"] == "retired"
    assert query(ops_dsn, "SELECT count(*) AS n FROM silences WHERE removed_at IS NULL")[0]["n"] == 0
    assert (Path(before.attrs["base_dir"]) / "data" / "standby.signal").exists(), "the old data directory is fenced"
    # The old follower follows the new primary across the timeline switch.
    follower = resource(ops_dsn, "pg1b")
    wait_for(lambda: probe(ops_dsn, "pg1b", "postgres.replication_caught_up").healthy, 30, "pg1b to follow")
    assert pg(follower, "SELECT count(*) FROM moving_rows")[0][0] == len(rows)
    lag = probe(ops_dsn, "pg1b", "postgres.replication_lag")
    assert f"127.0.0.1:{after.port}" in lag.reason


# -- await_resolution -----------------------------------------------------------------------------


def test_waiting_incidents_resolve_when_their_check_passes_and_escalate_when_it_never_does(ops_dsn):
    from datetime import UTC, datetime

    from fleetmedic.detection.awaiting import settle_awaiting_incidents
    from fleetmedic.detection.sweep import DetectRule
    from fleetmedic.incidents.store import IncidentStore



    rules = [DetectRule("old_base_backup", "postgres.base_backup_age", 3, 60, "warning", ("postgres",))]
    store = IncidentStore(ops_dsn)
    ids = []
    for name in ("db-fixed", "db-stuck"):
        rid = add_resource(ops_dsn, name)
        inc, _ = store.open_or_refresh_incident(rid, "old_base_backup", actor="detection:test", reason="too old",
                                                severity="warning")
        store.claim(inc.id, run_id=f"run-{name}", actor="automation:test/claim", reason="test")
        store.transition(inc.id, "await_resolution", actor="automation:test/take_backup", reason="backup started")
        query(ops_dsn, "INSERT INTO health (resource_id, check_name, healthy, reason, checked_at) "
                       "VALUES (%s, 'postgres.base_backup_age', %s, %s, now())",
              (rid, name == "db-fixed", "fresh" if name == "db-fixed" else "still old"))
        ids.append(inc.id)
    summary = settle_awaiting_incidents(ops_dsn, [r.to_dict() for r in rules])
    assert summary.resolved == [ids[0]] and summary.waiting == 1
    fixed = store.get(ids[0])
    assert fixed.state == "resolved" and fixed.reason.startswith("postgres.base_backup_age passes again")
    later = settle_awaiting_incidents(ops_dsn, rules, now=datetime.now(UTC) + timedelta(hours=3))
    assert later.escalated == [ids[1]]
    stuck = store.get(ids[1])
    assert stuck.state == "escalated" and "still not healthy" in stuck.reason
    pages = query(ops_dsn, "SELECT count(*) AS n FROM pages WHERE incident_id = %s", (ids[1],))
    assert pages[0]["n"] == 1
    assert settle_awaiting_incidents(ops_dsn, rules).resolved == []


def test_backup_store_keeps_a_failed_backup_out_of_the_age(tmp_path):
    store = BackupStore(tmp_path / "store")
    with pytest.raises(Exception, match="base backup of nothere from 127.0.0.1:"):
        store.take("nothere", "127.0.0.1", free_port(), timeout=30)
    assert store.newest("nothere") is None
    failed = store.backups("nothere")
    assert len(failed) == 1 and failed[0].status == "failed" and failed[0].path.name.endswith(".failed")
    assert failed[0].error
