"""The sweep's last step with real ops-DB state: a database on a down server opens no incident of its own."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
from helpers import query

from fleetmedic.detection.checks import CheckResult
from fleetmedic.detection.correlation import load_server_facts
from fleetmedic.detection.incidents import open_incidents_for_findings
from fleetmedic.incidents.store import IncidentStore
from fleetmedic.inventory import upsert_resource, upsert_server, upsert_server_resource

DAGS = {"resource_down": "playbook_resource_down", "server_down": "playbook_server_down",
        "kernel_panic": "playbook_kernel_panic", "follower_behind": "playbook_follower_behind"}


def fleet(dsn: str) -> dict[str, int]:
    """pg-a (primary) on srv-a, pg-b (its follower) on srv-b, pg-c on srv-c; each server with its own row."""
    ids: dict[str, int] = {}
    with psycopg.connect(dsn) as conn:
        for name in ("a", "b", "c"):
            sid = upsert_server(conn, name=f"srv-{name}", provider="local", attrs={"dir": f"/nonexistent/{name}"})
            ids[f"srv-{name}"] = upsert_server_resource(conn, server_id=sid, name=f"srv-{name}", host="127.0.0.1")
            ids[f"pg-{name}"] = upsert_resource(
                conn, name=f"pg-{name}", kind="postgres", role="follower" if name == "b" else "primary",
                host="127.0.0.1", port=6000 + ord(name), server_id=sid,
                primary_id=ids["pg-a"] if name == "b" else None)
    return ids


def record(dsn: str, rid: int, check: str, healthy: bool, at: datetime, reason: str = "probe") -> None:
    from fleetmedic.detection.sweep import _RECORD_SQL

    r = CheckResult(rid, check, healthy, reason, None, at)
    with psycopg.connect(dsn) as conn:
        conn.execute(_RECORD_SQL, ([r.resource_id], [r.check], [r.healthy], [r.value], [r.reason], [r.checked_at]))


def finding(rid: int, typ: str, check: str) -> dict:
    return {"resource_id": rid, "type": typ, "check": check, "reason": f"{check} failed twice",
            "severity": "critical"}


def sweep(dsn: str, *findings: dict):
    return open_incidents_for_findings(dsn, [{"probes": len(findings), "unhealthy": len(findings),
                                              "findings": list(findings)}], DAGS)


def incidents(dsn: str) -> list[tuple[str, str, str]]:
    rows = query(dsn, "SELECT r.name, i.type, i.state FROM incidents i JOIN resources r ON r.id = i.resource_id "
                      "ORDER BY i.id")
    return [(r["name"], r["type"], r["state"]) for r in rows]


def test_a_stopped_server_opens_server_down_and_its_database_waits(ops_dsn):
    ids = fleet(ops_dsn)
    now = datetime.now(UTC)
    record(ops_dsn, ids["srv-b"], "instance.status", False, now, "server srv-b is stopped")
    record(ops_dsn, ids["pg-b"], "postgres.connect", False, now)

    summary, runs = sweep(ops_dsn, finding(ids["pg-b"], "resource_down", "postgres.connect"),
                          finding(ids["srv-b"], "server_down", "instance.status"))
    again, _ = sweep(ops_dsn, finding(ids["pg-b"], "resource_down", "postgres.connect"))

    assert incidents(ops_dsn) == [("srv-b", "server_down", "open")]
    assert summary.opened == 1 and [r["trigger_dag_id"] for r in runs] == ["playbook_server_down"]
    assert again.opened == 0 and again.refreshed == 0


def test_a_database_on_a_healthy_server_opens_its_incident_as_usual(ops_dsn):
    ids = fleet(ops_dsn)
    record(ops_dsn, ids["srv-b"], "instance.status", False, datetime.now(UTC), "server srv-b is stopped")

    summary, _ = sweep(ops_dsn, finding(ids["pg-c"], "resource_down", "postgres.connect"))

    assert summary.opened == 1 and incidents(ops_dsn) == [("pg-c", "resource_down", "open")]


def test_after_the_server_is_fixed_only_evidence_from_after_the_fix_opens_an_incident(ops_dsn):
    ids = fleet(ops_dsn)
    store = IncidentStore(ops_dsn)
    before = datetime.now(UTC) - timedelta(seconds=5)
    record(ops_dsn, ids["pg-b"], "postgres.connect", False, before)
    (server_incident, _), = [store.open_or_refresh_incident(ids["srv-b"], "server_down", actor="detection:test",
                                                            reason="instance.status failed")]
    store.resolve(server_incident.id, actor="human:test", reason="rebooted by hand")

    stale, _ = sweep(ops_dsn, finding(ids["pg-b"], "resource_down", "postgres.connect"))
    record(ops_dsn, ids["pg-b"], "postgres.connect", False, datetime.now(UTC) + timedelta(seconds=1))
    fresh, _ = sweep(ops_dsn, finding(ids["pg-b"], "resource_down", "postgres.connect"))

    assert stale.opened == 0
    assert fresh.opened == 1
    assert incidents(ops_dsn) == [("srv-b", "server_down", "resolved"), ("pg-b", "resource_down", "open")]


def test_a_panicked_primary_server_holds_back_its_follower_and_its_own_server_down(ops_dsn):
    ids = fleet(ops_dsn)
    now = datetime.now(UTC)
    record(ops_dsn, ids["srv-a"], "instance.console", False, now, "Kernel panic - not syncing: x")
    record(ops_dsn, ids["srv-a"], "instance.status", False, now, "server srv-a is impaired")

    summary, runs = sweep(ops_dsn, finding(ids["srv-a"], "server_down", "instance.status"),
                          finding(ids["srv-a"], "kernel_panic", "instance.console"),
                          finding(ids["pg-a"], "resource_down", "postgres.connect"),
                          finding(ids["pg-b"], "follower_behind", "postgres.replication_lag"))

    assert incidents(ops_dsn) == [("srv-a", "kernel_panic", "open")]
    assert summary.opened == 1 and [r["trigger_dag_id"] for r in runs] == ["playbook_kernel_panic"]


def test_facts_come_from_the_inventory_health_and_incidents(ops_dsn):
    ids = fleet(ops_dsn)
    record(ops_dsn, ids["srv-a"], "instance.status", False, datetime.now(UTC), "stopped")
    store = IncidentStore(ops_dsn)
    inc, _ = store.open_or_refresh_incident(ids["srv-c"], "server_down", actor="detection:test", reason="down")

    with psycopg.connect(ops_dsn) as conn:
        facts = load_server_facts(conn, [finding(ids["pg-b"], "follower_behind", "postgres.replication_lag"),
                                         finding(ids["pg-c"], "resource_down", "postgres.connect")])

    assert facts.server_of == {ids["pg-b"]: ids["srv-b"], ids["pg-c"]: ids["srv-c"]}
    assert facts.primary_server_of == {ids["pg-b"]: ids["srv-a"]}
    assert facts.failing_checks == {ids["srv-a"]: {"instance.status": "stopped"}}
    assert [(i.id, i.state) for i in facts.active[ids["srv-c"]]] == [(inc.id, "open")]


def test_the_async_loader_sees_the_same_facts(ops_dsn):
    import asyncio

    from fleetmedic.detection.correlation import aload_server_facts

    ids = fleet(ops_dsn)
    record(ops_dsn, ids["srv-b"], "instance.status", False, datetime.now(UTC), "stopped")
    findings = [finding(ids["pg-b"], "resource_down", "postgres.connect")]

    async def load():
        async with await psycopg.AsyncConnection.connect(ops_dsn) as aconn:
            return await aload_server_facts(aconn, findings)

    with psycopg.connect(ops_dsn) as conn:
        assert asyncio.run(load()) == load_server_facts(conn, findings)
