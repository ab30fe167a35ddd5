"""Faults on a PostgreSQL server process: clean stop, crash, lost data directory."""

from __future__ import annotations

import shutil

from fleetmedic.localfleet.faults import FaultContext, FaultError, FaultResult, register_fault
from fleetmedic.localfleet.fleet import cluster_for
from fleetmedic.localfleet.services import ServiceError


@register_fault("stop-postgres", ("postgres",), "stop the server cleanly (pg_ctl stop -m fast)")
def stop_postgres(ctx: FaultContext) -> FaultResult:
    res = ctx.resource
    stopped = cluster_for(res.attrs, res.port).stop(mode="fast")
    did = f"stopped postgres {res.name} on port {res.port}" if stopped else f"postgres {res.name} was already stopped"
    return FaultResult(did, f"fleetmedic chaos start-postgres {res.name}")


@register_fault("kill-postgres", ("postgres",), "SIGKILL the postmaster, leaving a stale pid file (a crash)")
def kill_postgres(ctx: FaultContext) -> FaultResult:
    res = ctx.resource
    pid = cluster_for(res.attrs, res.port).kill()
    did = (f"killed postmaster {pid} of {res.name} with SIGKILL (stale postmaster.pid left behind)" if pid
           else f"postgres {res.name} was not running")
    return FaultResult(did, f"fleetmedic chaos start-postgres {res.name}", {"pid": pid})


@register_fault("destroy-postgres", ("postgres",), "stop the server and remove its data directory")
def destroy_postgres(ctx: FaultContext) -> FaultResult:
    res = ctx.resource
    if not ctx.options.get("yes"):
        raise FaultError("destroy-postgres removes a data directory; pass --yes to confirm")
    cluster = cluster_for(res.attrs, res.port)
    cluster.stop(mode="immediate")
    shutil.rmtree(cluster.datadir, ignore_errors=True)
    return FaultResult(f"stopped {res.name} and removed {cluster.datadir}",
                       "rebuild the demo fleet: make stop && rm -rf .local/fleet && make demo")


@register_fault("start-postgres", ("postgres",), "undo: start the server again")
def start_postgres(ctx: FaultContext) -> FaultResult:
    res = ctx.resource
    try:
        cluster_for(res.attrs, res.port).start()
    except ServiceError as exc:
        raise FaultError(str(exc)) from exc
    return FaultResult(f"postgres {res.name} is running on port {res.port}", "(nothing to undo)")
