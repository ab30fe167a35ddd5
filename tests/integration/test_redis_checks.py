"""Redis replication on real redis-servers: the check, the faults that break it and the action that reattaches."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from fleetmedic.actions.base import ActionContext
from fleetmedic.actions.redis_replication import reattach_replica
from fleetmedic.detection.checks import Target, run_one
from fleetmedic.inventory import Resource, get_resource, upsert_resource, upsert_server
from fleetmedic.localfleet.faults import FaultError, inject
from fleetmedic.localfleet.services import RedisServer, free_port


@pytest.fixture(scope="module")
def pair(services_dir: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    primary = RedisServer(services_dir / "srv-r1a" / "r1a", free_port())
    primary.start()
    replica = RedisServer(services_dir / "srv-r1b" / "r1b", free_port(),
                          extra_args=("--replicaof", "127.0.0.1", str(primary.port)))
    replica.start()
    yield primary, replica
    replica.stop()
    primary.stop()


def _client(server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)


def _info(server: RedisServer) -> dict:
    c = _client(server)
    try:
        return dict(c.info("replication"))
    finally:
        c.close()


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def inventory(ops_dsn: str, pair) -> dict[str, Resource]:
    """r1a (primary) and r1b (its replica) in a fresh ops DB; the replica attached and in sync."""
    primary, replica = pair
    c = _client(replica)
    c.execute_command("REPLICAOF", "127.0.0.1", str(primary.port))
    c.close()
    _wait(lambda: _info(replica).get("master_link_status") == "up", 20, "the replica link to come up")
    with psycopg.connect(ops_dsn) as conn:
        sa = upsert_server(conn, name="srv-r1a", provider="local")
        sb = upsert_server(conn, name="srv-r1b", provider="local")
        pid = upsert_resource(conn, name="r1a", kind="redis", role="primary", host="127.0.0.1",
                              port=primary.port, server_id=sa, attrs={"base_dir": str(primary.base_dir)})
        upsert_resource(conn, name="r1b", kind="redis", role="follower", host="127.0.0.1", port=replica.port,
                        server_id=sb, primary_id=pid, attrs={"base_dir": str(replica.base_dir)})
        return {name: get_resource(conn, name) for name in ("r1a", "r1b")}


def _probe(res: Resource, **attrs):
    target = Target(res.id, res.name, "redis", res.host, res.port, {**res.attrs, "role": res.role, **attrs})
    return asyncio.run(run_one(target, "redis.replication", 3))


def _reattach(ops_dsn: str, res: Resource):
    return reattach_replica(ActionContext(incident_id=1, incident_type="redis_replication_broken", resource=res,
                                          ops_dsn=ops_dsn))


def test_replica_in_sync_and_its_primary_are_healthy(inventory):
    replica = _probe(inventory["r1b"])
    assert replica.healthy, replica.reason
    assert "link up" in replica.reason and replica.value is not None and replica.value >= 0
    primary = _probe(inventory["r1a"])
    assert primary.healthy and primary.value == 1.0, primary.reason
    assert _probe(inventory["r1a"], expected_replicas=1).healthy


def test_primary_missing_an_expected_replica_is_unhealthy(inventory):
    result = _probe(inventory["r1a"], expected_replicas=2)
    assert not result.healthy
    assert "1 online replica(s) but 2 are expected" in result.reason


def test_replica_pointed_at_a_dead_port_is_found_and_reattached(ops_dsn, inventory, pair):
    primary, replica = pair
    fault = inject("break-redis-replication", ops_dsn, "r1b")
    assert f"was following 127.0.0.1:{primary.port}" in fault.did
    assert fault.undo == f"redis-cli -h 127.0.0.1 -p {replica.port} REPLICAOF 127.0.0.1 {primary.port}"
    assert _info(replica)["master_link_status"] == "down"

    broken = _probe(inventory["r1b"])
    assert not broken.healthy and "master_link_status is down" in broken.reason, broken.reason
    assert f"replica of {fault.data['now_following']}: " in broken.reason
    # The primary lost its replica: unhealthy once the inventory says it expects one.
    _wait(lambda: not _probe(inventory["r1a"], expected_replicas=1).healthy, 10, "the primary to miss its replica")

    result = _reattach(ops_dsn, inventory["r1b"])
    assert result.ok, result.reason
    assert f"REPLICAOF 127.0.0.1 {primary.port} on r1b" in result.reason and "link up" in result.reason
    assert result.data["primary"] == "r1a" and result.data["changed"] is True
    info = _info(replica)
    assert info["master_port"] == primary.port and info["master_link_status"] == "up"
    assert _probe(inventory["r1b"]).healthy


def test_detached_replica_is_found_and_reattached_with_its_data_back(ops_dsn, inventory, pair):
    primary, replica = pair
    p = _client(primary)
    p.set("written-while-detached", "0")
    inject("break-redis-replication", ops_dsn, "r1b", mode="no-one")
    assert _info(replica)["role"] == "master"
    p.set("written-while-detached", "1")

    broken = _probe(inventory["r1b"])
    assert not broken.healthy and "reports role:master" in broken.reason and "follows no primary" in broken.reason

    result = _reattach(ops_dsn, inventory["r1b"])
    assert result.ok, result.reason
    assert "(was role:master)" in result.reason
    r = _client(replica)
    _wait(lambda: r.get("written-while-detached") == b"1", 10, "the replica to catch up with the primary")
    r.close()
    p.close()
    assert _probe(inventory["r1b"]).healthy


def test_reattach_on_a_primary_reattaches_its_detached_replicas(ops_dsn, inventory, pair):
    primary, replica = pair
    inject("break-redis-replication", ops_dsn, "r1b")
    result = _reattach(ops_dsn, inventory["r1a"])
    assert result.ok, result.reason
    assert result.reason.startswith("r1b: REPLICAOF 127.0.0.1")
    assert _info(replica)["master_link_status"] == "up"
    again = _reattach(ops_dsn, inventory["r1b"])
    assert again.ok and "already replicates from r1a" in again.reason and again.data["changed"] is False


def test_replica_following_another_primary_than_the_inventorys_is_unhealthy(inventory, pair, services_dir):
    primary, replica = pair
    stranger = RedisServer(services_dir / "srv-stranger" / "stranger", free_port())
    stranger.start()
    try:
        c = _client(replica)
        c.execute_command("REPLICAOF", "127.0.0.1", str(stranger.port))
        c.close()
        _wait(lambda: _info(replica).get("master_link_status") == "up", 20, "the link to the stranger")
        # Without the expected primary, a live link looks fine; with it, the mismatch is the finding.
        assert _probe(inventory["r1b"]).healthy
        told = {"primary": {"name": "r1a", "host": "127.0.0.1", "port": primary.port}}
        result = _probe(inventory["r1b"], **told)
        assert not result.healthy
        assert f"replicates from 127.0.0.1:{stranger.port}, but its primary in the inventory is" in result.reason
    finally:
        stranger.stop()


def test_stopped_primary_is_resource_downs_finding_not_replications(ops_dsn, inventory, pair):
    primary, replica = pair
    told = {"primary": {"name": "r1a", "host": "127.0.0.1", "port": primary.port}}
    stopped = inject("stop-redis", ops_dsn, "r1a")
    try:
        assert stopped.undo == "fleetmedic chaos start-redis r1a"
        _wait(lambda: _info(replica).get("master_link_status") == "down", 10, "the replica to see the primary gone")
        ping = asyncio.run(run_one(Target(1, "r1a", "redis", "127.0.0.1", primary.port), "redis.ping", 2))
        assert not ping.healthy
        on_primary = _probe(inventory["r1a"])
        assert on_primary.healthy and on_primary.reason.startswith("not checked"), on_primary.reason
        knowing = _probe(inventory["r1b"], **told)
        assert knowing.healthy and "because the primary does not answer" in knowing.reason
        # Without knowing its primary, the replica only sees its link down.
        assert not _probe(inventory["r1b"]).healthy
        # The action cannot bring the link up while the primary is down; it says so and leaves the wait to verify.
        result = _reattach(ops_dsn, inventory["r1b"])
        assert result.ok and "does not answer" in result.reason and result.data["primary_up"] is False
    finally:
        inject("start-redis", ops_dsn, "r1a")
    _wait(lambda: _info(replica).get("master_link_status") == "up", 20, "the replica to resync")
    assert _probe(inventory["r1b"]).healthy


def test_restarted_replica_follows_its_primary_again(ops_dsn, inventory, pair):
    primary, replica = pair
    inject("stop-redis", ops_dsn, "r1b")
    started = inject("start-redis", ops_dsn, "r1b")
    assert f"replica of r1a (127.0.0.1:{primary.port})" in started.did
    _wait(lambda: _info(replica).get("master_link_status") == "up", 20, "the replica to resync")


def test_break_replication_refuses_a_primary(ops_dsn, inventory):
    with pytest.raises(FaultError, match="r1a is a primary; break-redis-replication needs a replica"):
        inject("break-redis-replication", ops_dsn, "r1a")


def test_sweep_targets_carry_the_inventorys_primary_so_a_down_primary_opens_nothing_here(ops_dsn, inventory, pair):
    from fleetmedic.detection.sweep import load_targets

    primary, replica = pair

    async def targets():
        async with await psycopg.AsyncConnection.connect(ops_dsn) as aconn:
            return {t.name: t for t in await load_targets(aconn, 0, 1)}

    loaded = asyncio.run(targets())
    assert loaded["r1b"].attrs["primary"] == {"name": "r1a", "host": "127.0.0.1", "port": primary.port}
    assert "primary" not in loaded["r1a"].attrs
    inject("stop-redis", ops_dsn, "r1a")
    try:
        _wait(lambda: _info(replica).get("master_link_status") == "down", 10, "the replica to see the primary gone")
        result = asyncio.run(run_one(loaded["r1b"], "redis.replication", 3))
        assert result.healthy and "redis.ping on the primary reports that" in result.reason, result.reason
    finally:
        inject("start-redis", ops_dsn, "r1a")
