"""End to end, in a real Airflow: a stopped server and a panicked kernel are found and fixed by a reboot.

Both faults go in at once on pg5's two servers (srv-pg5b holds the follower, srv-pg5a the primary):
four resources fail together (two servers, two databases), below the mass-failure guard.
"""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import pytest

from fleetmedic.cloud.base import ServerRef
from fleetmedic.cloud.local import LocalServer
from fleetmedic.incidents.store import IncidentStore
from fleetmedic.inventory import get_resource
from fleetmedic.localfleet.faults import inject
from fleetmedic.localfleet.fleet import cluster_for

pytestmark = pytest.mark.e2e

PG5 = ("pg5a", "pg5b", "srv-pg5a", "srv-pg5b")


def _resources(stack) -> dict:
    with psycopg.connect(stack.ops_dsn) as conn:
        return {name: get_resource(conn, name) for name in PG5}


def _failing_health(stack) -> list[tuple[str, str, str]]:
    with psycopg.connect(stack.ops_dsn) as conn:
        rows = conn.execute("SELECT r.name, h.check_name, h.reason FROM health h JOIN resources r "
                            "ON r.id = h.resource_id WHERE NOT h.healthy ORDER BY r.name").fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def _since(store, resource_id, started):
    return [i for i in store.list(resource_id=resource_id, limit=50) if i.opened_at >= started]


def _pg5_healthy(stack, res) -> bool:
    primary = cluster_for(res["pg5a"].attrs, res["pg5a"].port)
    try:
        streaming = primary.psql("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")
    except Exception:
        return False
    failing = [f for f in _failing_health(stack) if f[0] in PG5]
    return streaming == "1" and not failing


def _diagnosis(stack, airflow, store, res, started) -> str:
    """What the ops DB and Airflow say about pg5, for a failure message."""
    lines = [f"failing health: {_failing_health(stack)}"]
    for name in PG5:
        for inc in _since(store, res[name].id, started):
            lines.append(f"incident {inc.id} {inc.type} on {name}: {inc.state}")
            lines += [f"    {ev.at:%H:%M:%S} {ev.from_state}->{ev.to_state} [{ev.step or ''}] {ev.reason}"
                      for ev in store.events(inc.id)]
    for dag_id in ("fleet_sweep", "playbook_server_down", "playbook_kernel_panic"):
        runs = airflow.list_runs(dag_id, limit=5)
        lines.append(f"{dag_id}: " + ", ".join(f"{r['dag_run_id']}={r['state']}" for r in runs))
    return "\n".join(lines)


def _steps(store, incident_id):
    return {ev.step: ev for ev in store.events(incident_id)
            if ev.step and (ev.data or {}).get("step_status") == "done"}


def test_stopped_server_and_panicked_kernel_are_rebooted_and_resolved(stack, airflow, wait_until):
    store = IncidentStore(stack.ops_dsn)
    res = _resources(stack)
    # The guard counts every failing resource; start from a fleet where only ours will fail.
    wait_until(lambda: not _failing_health(stack), 120,
               f"the fleet to be healthy before breaking pg5 (failing now: {_failing_health(stack)})", interval=3)
    started = datetime.now(UTC)
    try:
        stopped = inject("stop-server", stack.ops_dsn, "srv-pg5b")
        panicked = inject("kernel-panic", stack.ops_dsn, "srv-pg5a")
        assert stopped.did.startswith("stopped server srv-pg5b: stopped postgres pg5b")
        assert "Kernel panic - not syncing" in panicked.did

        try:
            down = wait_until(lambda: [i for i in _since(store, res["srv-pg5b"].id, started)
                                       if i.type == "server_down" and i.state == "resolved"],
                              240, "server_down on srv-pg5b to resolve", interval=3)
            panic = wait_until(lambda: [i for i in _since(store, res["srv-pg5a"].id, started)
                                        if i.type == "kernel_panic" and i.state == "resolved"],
                               240, "kernel_panic on srv-pg5a to resolve", interval=3)
            wait_until(lambda: _pg5_healthy(stack, res), 90, "pg5a to stream to pg5b and every pg5 check to pass")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_diagnosis(stack, airflow, store, res, started)}") from None
    finally:
        for server in ("srv-pg5a", "srv-pg5b"):  # leave pg5 running whatever happened above
            srv = LocalServer.from_ref(ServerRef.from_any(res[server].server))
            if srv.state().get("state") == "stopped" or not all(i.running() for i in srv.instances()):
                srv.reboot("e2e cleanup")

    # Exactly one incident per server, of the right type; the databases opened none of their own.
    on_b = _since(store, res["srv-pg5b"].id, started)
    on_a = _since(store, res["srv-pg5a"].id, started)
    assert [(i.type, i.state) for i in on_b] == [("server_down", "resolved")], on_b
    assert [(i.type, i.state) for i in on_a] == [("kernel_panic", "resolved")], on_a
    for name in ("pg5a", "pg5b"):
        raced = [i for i in _since(store, res[name].id, started) if i.type == "resource_down"]
        assert raced == [], f"resource_down opened on {name} while its server was handled: {raced}"

    for incident, dag_id, before in ((down[0], "playbook_server_down", "it was stopped"),
                                     (panic[0], "playbook_kernel_panic", "its kernel had panicked")):
        run = wait_until(lambda d=dag_id, i=incident.id: (r := airflow.get_run(d, f"incident-{i}"))["state"]
                         in ("success", "failed") and r, 60, f"{dag_id} run to finish")
        assert run["state"] == "success", run
        events = store.events(incident.id)
        assert all(ev.reason.strip() for ev in events)
        states = [ev.to_state for ev in events]
        collapsed = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
        assert collapsed == ["open", "remediating", "resolved"], [(e.to_state, e.step, e.reason) for e in events]
        steps = _steps(store, incident.id)
        assert steps["reboot"].reason.startswith(f"rebooted server {incident_server(res, incident)} ({before}")
        assert steps["verify"].data["outcome"] == "healthy"
        assert "failover" not in steps

    for name in ("pg5a", "pg5b"):
        r = res[name]
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{r.port}/postgres", connect_timeout=5) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
    with psycopg.connect(stack.ops_dsn) as conn:
        pages = conn.execute("SELECT count(*) FROM pages WHERE incident_id = ANY(%s)",
                             ([down[0].id, panic[0].id],)).fetchone()
    assert pages == (0,), "faults automation fixed page nobody"


def incident_server(res: dict, incident) -> str:
    return next(name for name in ("srv-pg5a", "srv-pg5b") if res[name].id == incident.resource_id)
