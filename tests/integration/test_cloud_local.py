"""The local cloud on real processes: servers stop, panic and reboot with every PostgreSQL and Redis on them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from fleetmedic.actions.base import ActionContext
from fleetmedic.actions.registry import ACTIONS
from fleetmedic.cloud import ProviderError, ServerRef, get_provider
from fleetmedic.cloud.local import LocalServer
from fleetmedic.detection.checks import run_checks
from fleetmedic.detection.sweep import load_targets
from fleetmedic.inventory import get_resource
from fleetmedic.localfleet.faults import FaultError, inject
from fleetmedic.localfleet.fleet import DemoFleet
from fleetmedic.localfleet.services import PostgresCluster, free_port, free_port_block


def _port_block() -> int:
    return free_port_block(110)


@pytest.fixture(scope="module")
def fleet(services_dir: Path) -> Iterator[DemoFleet]:
    """One PostgreSQL pair and one Redis pair, each instance on its own local server."""
    demo = DemoFleet(services_dir / "cloud-fleet", pairs=1, redis_pairs=1, base_port=_port_block())
    try:
        demo.up(progress=lambda _m: None)
        yield demo
    finally:
        demo.down(progress=lambda _m: None)  # also when starting failed half way


def _broken(demo: DemoFleet, server: str) -> bool:
    srv = LocalServer(demo.servers_dir / server)
    return get_provider("local").instance_status(_ref(demo, server)).state != "running" or not all(
        i.running() for i in srv.instances())


def _ref(demo: DemoFleet, server: str) -> ServerRef:
    return ServerRef(server, "local", server, {"dir": str(demo.servers_dir / server),
                                               "console_log": str(demo.servers_dir / server / "console.log")})


@pytest.fixture
def registered(fleet: DemoFleet, ops_dsn: str) -> Iterator[DemoFleet]:
    """The fleet in this test's ops DB; every server running with all its processes after the test."""
    fleet.register(ops_dsn)
    yield fleet
    for server in ("srv-pg1a", "srv-pg1b", "srv-redis1a", "srv-redis1b"):
        if _broken(fleet, server):
            LocalServer(fleet.servers_dir / server).reboot("restored after a test")


def _probe(dsn: str, name: str, check: str):
    async def run():
        async with await psycopg.AsyncConnection.connect(dsn) as aconn:
            targets = [t for t in await load_targets(aconn, 0, 1) if t.name == name]
        return (await run_checks([(targets[0], check)], timeout=5))[0]

    return asyncio.run(run())


def _connects(port: int) -> bool:
    try:
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=2) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)


def test_each_server_is_registered_once_as_a_resource_of_kind_server(registered, ops_dsn):
    registered.register(ops_dsn)  # registering again changes nothing

    with psycopg.connect(ops_dsn) as conn:
        rows = conn.execute(
            "SELECT r.name, r.role, r.port, s.name FROM resources r JOIN servers s ON s.id = r.server_id "
            "WHERE r.kind = 'server' ORDER BY r.name").fetchall()
        pg1b = get_resource(conn, "pg1b")
    assert rows == [(name, "standalone", None, name) for name in ("srv-pg1a", "srv-pg1b", "srv-redis1a",
                                                                  "srv-redis1b")]
    assert pg1b.server is not None and pg1b.server.name == "srv-pg1b"


def test_each_servers_manifest_names_its_instances_with_what_it_takes_to_start_them(registered):
    pg = LocalServer(registered.servers_dir / "srv-pg1b").instances()
    replica = LocalServer(registered.servers_dir / "srv-redis1b").instances()

    assert [(i.name, i.kind, i.port) for i in pg] == [("pg1b", "postgres", registered.base_port + 1)]
    assert [(i.name, i.kind, i.args) for i in replica] == [
        ("redis1b", "redis", ("--replicaof", "127.0.0.1", str(registered.base_port + 100)))]


def test_stop_server_stops_every_process_and_the_status_probe_says_so(registered, ops_dsn):
    port = registered.base_port + 1

    result = inject("stop-server", ops_dsn, "pg1b")

    assert result.did == f"stopped server srv-pg1b: stopped postgres pg1b on port {port}"
    assert result.undo == "fleetmedic chaos start-server srv-pg1b"
    assert not _connects(port)
    state = json.loads((registered.servers_dir / "srv-pg1b" / "state.json").read_text())
    assert state["state"] == "stopped" and state["reason"] == "chaos stop-server"
    status = _probe(ops_dsn, "srv-pg1b", "instance.status")
    assert not status.healthy
    assert status.reason.startswith("server srv-pg1b is stopped since ")
    assert status.reason.endswith("(chaos stop-server); 0/1 processes running")
    assert _probe(ops_dsn, "srv-pg1b", "instance.console").healthy
    assert inject("stop-server", ops_dsn, "srv-pg1b").did == "srv-pg1b was already stopped (chaos stop-server)"

    undo = inject("start-server", ops_dsn, "srv-pg1b")

    assert undo.did == f"booted server srv-pg1b: started postgres pg1b on port {port}"
    assert _connects(port)
    assert _probe(ops_dsn, "srv-pg1b", "instance.status").reason == (
        "server srv-pg1b is running; 1/1 processes running (pg1b)")
    console = (registered.servers_dir / "srv-pg1b" / "console.log").read_text()
    assert "reboot: System halted by the cloud (chaos stop-server)" in console
    assert "fleetmedic local server srv-pg1b booted (chaos start-server)" in console


def test_a_database_stopped_on_its_own_leaves_its_server_running(registered, ops_dsn):
    inject("stop-postgres", ops_dsn, "pg1b")
    try:
        status = _probe(ops_dsn, "srv-pg1b", "instance.status")
    finally:
        inject("start-postgres", ops_dsn, "pg1b")

    assert status.healthy and status.reason == "server srv-pg1b is running; 0/1 processes running"


def test_kernel_panic_then_reboot_action_brings_the_primary_back_and_its_follower_streams_again(
        registered, ops_dsn):
    port = registered.base_port

    panic = inject("kernel-panic", ops_dsn, "srv-pg1a")

    assert panic.undo == "fleetmedic chaos reboot-server srv-pg1a"
    assert panic.did.startswith("panicked the kernel of srv-pg1a: wrote 'Kernel panic - not syncing: Fatal "
                                "exception in interrupt' to ")
    assert f"postgres pg1a on port {port} (pid " in panic.did
    assert not _connects(port)
    console = _probe(ops_dsn, "srv-pg1a", "instance.console")
    status = _probe(ops_dsn, "srv-pg1a", "instance.status")
    assert not console.healthy and console.reason.startswith(
        "console of srv-pg1a shows a kernel panic since its last boot: [")
    assert console.reason.endswith("] Kernel panic - not syncing: Fatal exception in interrupt")
    assert not status.healthy and status.reason.startswith("server srv-pg1a is impaired: its console shows '[")
    assert status.reason.endswith("since its last boot; 0/1 processes running")

    with psycopg.connect(ops_dsn) as conn:
        server_row = get_resource(conn, "srv-pg1a")
    result = ACTIONS["instance.reboot"].fn(ActionContext(1, "kernel_panic", server_row, ops_dsn))

    assert result.ok, result.reason
    assert result.reason.startswith("rebooted server srv-pg1a (its kernel had panicked ([")
    assert result.reason.endswith(f"): started postgres pg1a on port {port}")
    assert result.data["state_before"] == "impaired"
    assert _connects(port)
    assert _probe(ops_dsn, "srv-pg1a", "instance.console").healthy
    assert _probe(ops_dsn, "srv-pg1a", "instance.status").healthy
    primary = PostgresCluster(registered.servers_dir / "srv-pg1a" / "pg1a", port)
    _wait(lambda: primary.psql("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") == "1", 30,
          "pg1b to stream from pg1a again")


def test_a_stopped_server_cannot_panic(registered, ops_dsn):
    inject("stop-server", ops_dsn, "srv-redis1a")

    with pytest.raises(FaultError, match="server srv-redis1a is stopped; a stopped server's kernel cannot panic"):
        inject("kernel-panic", ops_dsn, "redis1a")


def test_a_redis_replica_rejoins_its_primary_after_its_server_reboots(registered, ops_dsn):
    port = registered.base_port + 101

    reason = get_provider("local").reboot(_ref(registered, "srv-redis1b"), "test")

    assert reason == (f"rebooted server srv-redis1b (it was running; stopped redis redis1b on port {port}): "
                      f"started redis redis1b on port {port}")
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        assert client.info("replication")["role"] == "slave"
        assert client.info("replication")["master_port"] == registered.base_port + 100
    finally:
        client.close()


def test_reboot_never_initdbs_over_a_lost_data_directory(tmp_path):
    srv = LocalServer(tmp_path / "srv-lost")
    (tmp_path / "srv-lost").mkdir()
    (tmp_path / "srv-lost" / "console.log").write_text("[    0.000000] fleetmedic local server srv-lost booted\n")
    srv.register_instance("lost1", "postgres", free_port(), tmp_path / "srv-lost" / "lost1")

    with pytest.raises(ProviderError, match=r"srv-lost booted but 1 instance\(s\) did not start: lost1: data "
                                            r"directory .*/lost1/data is missing or empty; not started"):
        srv.reboot("test")

    assert not (tmp_path / "srv-lost" / "lost1" / "data" / "PG_VERSION").exists()


def test_a_server_row_without_its_directory_is_an_error_naming_the_fix():
    with pytest.raises(ProviderError, match="has provider 'local' but no attrs.dir"):
        get_provider("local").instance_status(ServerRef("srv-x", "local", "srv-x", {}))


def test_failover_primaries_on_a_follower_server_has_nothing_to_do(registered, ops_dsn):
    with psycopg.connect(ops_dsn) as conn:
        server_row = get_resource(conn, "srv-pg1b")

    result = ACTIONS["instance.failover_primaries"].fn(ActionContext(1, "server_down", server_row, ops_dsn))

    assert result.ok and result.reason == "no primary database on srv-pg1b; nothing to fail over"


def test_failover_primaries_refuses_a_primary_with_no_follower_on_another_server(registered, ops_dsn):
    with psycopg.connect(ops_dsn) as conn:
        sid = get_resource(conn, "srv-pg1b").server_id
        conn.execute("INSERT INTO resources (name, kind, role, host, port, server_id) "
                     "VALUES ('lonely', 'postgres', 'primary', '127.0.0.1', 5999, %s)", (sid,))
        server_row = get_resource(conn, "srv-pg1b")

    result = ACTIONS["instance.failover_primaries"].fn(ActionContext(1, "server_down", server_row, ops_dsn))

    assert not result.ok
    assert "lonely: no follower on another server to promote" in result.reason


# Changes the module fleet's topology (pg1b becomes the primary): keep it the last test of this module.
def test_failover_primaries_of_a_dead_server_promotes_the_follower_on_another_server(registered, ops_dsn):
    inject("stop-server", ops_dsn, "srv-pg1a")
    with psycopg.connect(ops_dsn) as conn:
        server_row = get_resource(conn, "srv-pg1a")

    result = ACTIONS["instance.failover_primaries"].fn(ActionContext(1, "server_down", server_row, ops_dsn))

    assert result.ok, result.reason
    assert result.reason.startswith("failed over every primary on srv-pg1a: pg1a: promoted pg1b (127.0.0.1:")
    assert result.data["failed_over"][0].startswith("pg1a: promoted pg1b")
    with psycopg.connect(ops_dsn) as conn:
        new, old = get_resource(conn, "pg1b"), get_resource(conn, "pg1a")
    assert (new.role, new.primary_id) == ("primary", None)
    assert (old.role, old.primary_id, old.enabled) == ("follower", new.id, False)
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{new.port}/postgres", connect_timeout=5,
                         autocommit=True) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        conn.execute("CREATE TABLE written_after_failover (id int)")
