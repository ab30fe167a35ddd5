"""Detection against real servers: probes, bulk health writes and confirmation rules."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import psycopg
import pytest

from fleetmedic.detection.checks import Target, run_checks, run_one
from fleetmedic.detection.sweep import DetectRule, load_targets, probe_round
from fleetmedic.localfleet.services import free_port

RULE = DetectRule(type="resource_down", check="postgres.connect", failures=2, over_seconds=0.5,
                  severity="critical", kinds=("postgres",))


def add_resource(dsn: str, name: str, port: int, kind: str = "postgres") -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "INSERT INTO resources (name, kind, role, host, port) VALUES (%s, %s, 'primary', '127.0.0.1', %s) "
            "RETURNING id", (name, kind, port)).fetchone()
    assert row is not None
    return int(row[0])


async def _round(dsn: str, rules=(RULE,)):
    async with await psycopg.AsyncConnection.connect(dsn) as aconn:
        targets = await load_targets(aconn, 0, 1)
        return await probe_round(aconn, targets, list(rules), timeout=2, concurrency=10)


def test_live_database_answers_select_1(pg_cluster):
    target = Target(1, "ops", "postgres", "127.0.0.1", pg_cluster.port)
    result = asyncio.run(run_one(target, "postgres.connect", 3))
    assert result.healthy, result.reason
    assert "SELECT 1 answered" in result.reason and result.value is not None


def test_stopped_database_fails_with_a_reason():
    target = Target(1, "gone", "postgres", "127.0.0.1", free_port())
    result = asyncio.run(run_one(target, "postgres.connect", 3))
    assert not result.healthy
    assert "cannot connect to 127.0.0.1" in result.reason


def test_probe_that_hangs_fails_at_its_timeout_and_does_not_stall_others(pg_cluster):
    # A server that accepts TCP connections and never says a word.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_forever():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    try:
        hung = Target(1, "hung", "postgres", "127.0.0.1", listener.getsockname()[1])
        live = Target(2, "live", "postgres", "127.0.0.1", pg_cluster.port)
        started = time.monotonic()
        results = asyncio.run(run_checks([(hung, "postgres.connect"), (live, "postgres.connect")], timeout=1.5))
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
        listener.close()
        for s in accepted:
            s.close()
    by_id = {r.resource_id: r for r in results}
    assert not by_id[1].healthy
    assert "no answer within 1.5s" in by_id[1].reason
    assert by_id[2].healthy
    assert elapsed < 10  # bounded by the probe timeout, not by the hung server


def test_confirmation_needs_two_failures_spanning_the_rule(ops_dsn, pg_cluster):
    live = add_resource(ops_dsn, "live", pg_cluster.port)
    dead = add_resource(ops_dsn, "dead", free_port())
    first = asyncio.run(_round(ops_dsn))
    assert first.probed == 2 and first.unhealthy == 1
    assert first.findings == []  # one failed probe alone never opens an incident
    time.sleep(0.6)
    second = asyncio.run(_round(ops_dsn))
    assert [(f.resource_id, f.type) for f in second.findings] == [(dead, "resource_down")]
    assert [f.resource_id for f in second.new_findings] == [dead]
    assert "failed 2 times" in second.findings[0].reason
    with psycopg.connect(ops_dsn) as conn:
        rows = dict(conn.execute("SELECT resource_id, consecutive_failures FROM health").fetchall())
    assert rows == {live: 0, dead: 2}


def test_two_quick_failures_do_not_confirm_a_slow_rule(ops_dsn):
    add_resource(ops_dsn, "dead", free_port())
    slow = DetectRule(**{**RULE.to_dict(), "over_seconds": 60, "kinds": ("postgres",)})
    asyncio.run(_round(ops_dsn, [slow]))
    second = asyncio.run(_round(ops_dsn, [slow]))
    assert second.findings == []


def test_recovery_resets_the_failure_count(ops_dsn, pg_cluster):
    rid = add_resource(ops_dsn, "flappy", free_port())
    asyncio.run(_round(ops_dsn))
    with psycopg.connect(ops_dsn) as conn:
        conn.execute("UPDATE resources SET port = %s WHERE id = %s", (pg_cluster.port, rid))
    asyncio.run(_round(ops_dsn))
    with psycopg.connect(ops_dsn) as conn:
        row = conn.execute("SELECT healthy, consecutive_failures, first_failure_at, last_healthy_at "
                           "FROM health WHERE resource_id = %s", (rid,)).fetchone()
    assert row is not None
    assert row[0] is True and row[1] == 0 and row[2] is None and row[3] is not None


@pytest.mark.parametrize("shard_count", [1, 3])
def test_shards_cover_every_resource_exactly_once(ops_dsn, shard_count):
    ids = {add_resource(ops_dsn, f"r{i}", 1000 + i) for i in range(10)}

    async def collect():
        seen = []
        async with await psycopg.AsyncConnection.connect(ops_dsn) as aconn:
            for shard in range(shard_count):
                seen += [t.resource_id for t in await load_targets(aconn, shard, shard_count)]
        return seen

    seen = asyncio.run(collect())
    assert sorted(seen) == sorted(ids)
