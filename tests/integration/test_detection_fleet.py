"""Detection on a real demo fleet (PostgreSQL pairs and a Redis pair on loopback), without Airflow.

The sweep's own functions run in the order the fleet_sweep DAG runs them: probe rounds a few
seconds apart (health written, confirmation rules applied), then open_incidents_for_findings
(silences, the mass-failure guard, correlation, opening). Scenarios: a healthy fleet opens nothing;
half the fleet failing at once trips the guard; a silenced fault opens nothing until it expires.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from fleetmedic.detection.incidents import open_incidents_for_findings
from fleetmedic.detection.sweep import probe_round, rules_from_playbooks
from fleetmedic.localfleet.fleet import DemoFleet, cluster_for, redis_for
from fleetmedic.localfleet.services import free_port_block
from fleetmedic.playbooks.loader import load_all

PLAYBOOKS = list(load_all().playbooks.values())
RULES = rules_from_playbooks(PLAYBOOKS)
PLAYBOOK_DAGS = {pb.type: pb.dag_id for pb in PLAYBOOKS}


@pytest.fixture(scope="module")
def fleet_env(pg_cluster) -> Iterator[tuple[DemoFleet, str]]:
    home = Path(tempfile.mkdtemp(prefix="fleetmedic-fleet-"))
    os.chmod(home, 0o755)
    pg_cluster.create_database("fleet_detection")
    dsn = pg_cluster.dsn("fleet_detection")
    from fleetmedic.db.migrate import migrate

    migrate(dsn)
    fleet = DemoFleet(home / "fleet", pairs=2, redis_pairs=1, base_port=free_port_block(110))
    try:
        fleet.up(dsn, progress=lambda m: None)
        yield fleet, dsn
    finally:
        fleet.down(progress=lambda m: None)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def fleet(fleet_env) -> Iterator[tuple[DemoFleet, str]]:
    """The shared fleet, with every database running and no incidents, silences or breaker state."""
    demo, dsn = fleet_env
    demo.up(None, progress=lambda m: None)
    with psycopg.connect(dsn) as conn:
        conn.execute("TRUNCATE incidents, incident_events, pages, silences, breaker_events, health "
                     "RESTART IDENTITY CASCADE")
    yield demo, dsn
    demo.up(None, progress=lambda m: None)


def sweep(dsn: str, rounds: int = 3, interval: float = 5.5) -> tuple[object, list[dict]]:
    """One fleet_sweep run's worth of detection: `rounds` probe rounds, then open incidents."""

    async def probe() -> dict:
        from fleetmedic.detection.sweep import load_targets

        async with await psycopg.AsyncConnection.connect(dsn) as aconn:
            result = None
            for i in range(rounds):
                if i:
                    await asyncio.sleep(interval)
                result = await probe_round(aconn, await load_targets(aconn, 0, 1), RULES, timeout=3,
                                           concurrency=20)
            assert result is not None
            return {"probes": result.probed, "unhealthy": result.unhealthy, "seconds": 0,
                    "findings": [f.to_dict() for f in result.findings]}

    event = asyncio.run(probe())
    return open_incidents_for_findings(dsn, [event], PLAYBOOK_DAGS)


def count(dsn: str, sql: str, *params: object) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(sql, params).fetchone()
    assert row is not None
    return int(row[0])


def resource(fleet: DemoFleet, name: str):
    return next(m for m in fleet.members() if m.name == name)


def test_a_healthy_fleet_over_five_sweeps_opens_nothing(fleet):
    demo, dsn = fleet
    for _ in range(5):
        summary, runs = sweep(dsn, rounds=2, interval=1)
        assert summary.opened == 0 and runs == []
    assert count(dsn, "SELECT count(*) FROM incidents") == 0
    assert count(dsn, "SELECT count(*) FROM health WHERE NOT healthy") == 0
    assert count(dsn, "SELECT count(DISTINCT resource_id) FROM health") == count(
        dsn, "SELECT count(*) FROM resources WHERE enabled")


def test_half_the_fleet_failing_at_once_trips_the_guard_holds_everything_and_pages_once(fleet):
    demo, dsn = fleet
    stopped = ["pg1a", "pg1b", "pg2a", "pg2b", "redis1a"]
    for name in stopped:
        m = resource(demo, name)
        if m.kind == "postgres":
            cluster_for(m.attrs, m.port).stop(mode="immediate")
        else:
            redis_for(m.attrs, m.port).stop()
    summary, runs = sweep(dsn)
    assert runs == [], "no remediation starts while the guard is tripped"
    assert summary.held >= 5 and summary.opened >= 5
    states = dict(psycopg.connect(dsn).execute(
        "SELECT state, count(*) FROM incidents GROUP BY state").fetchall())
    assert set(states) == {"held"}, states
    assert count(dsn, "SELECT count(*) FROM pages") == 1
    breaker = psycopg.connect(dsn).execute(
        "SELECT state, reason FROM breaker_events WHERE breaker = 'global' ORDER BY id DESC LIMIT 1").fetchone()
    assert breaker is not None and breaker[0] == "open"
    # Another sweep while still broken: the same incidents are refreshed, still one page.
    summary, runs = sweep(dsn, rounds=1)
    assert runs == [] and summary.opened == 0
    assert count(dsn, "SELECT count(*) FROM pages") == 1


def test_a_silenced_fault_opens_nothing_until_the_silence_expires(fleet):
    demo, dsn = fleet
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT id FROM resources WHERE name = 'pg2a'").fetchone()
        assert row is not None
        conn.execute("INSERT INTO silences (resource_id, ends_at, reason, created_by) "
                     "VALUES (%s, now() + interval '1 hour', 'maintenance', 'human:test')", (row[0],))
    m = resource(demo, "pg2a")
    cluster_for(m.attrs, m.port).stop(mode="fast")
    summary, runs = sweep(dsn)
    assert summary.silenced >= 1 and summary.opened == 0 and runs == []
    assert count(dsn, "SELECT count(*) FROM incidents") == 0
    assert count(dsn, "SELECT count(*) FROM health h JOIN resources r ON r.id = h.resource_id "
                      "WHERE r.name = 'pg2a' AND NOT h.healthy") >= 1, "a silenced resource is still probed"
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE silences SET ends_at = now() - interval '1 second', starts_at = now() - interval '1 hour'")
    time.sleep(0.1)
    summary, runs = sweep(dsn, rounds=1)
    assert summary.opened == 1
    assert [r["trigger_dag_id"] for r in runs] == ["playbook_resource_down"]
