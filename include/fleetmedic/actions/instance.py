"""Remediation actions on a whole server, through its cloud provider: reboot it, fail over its primaries."""

from __future__ import annotations

import psycopg

from fleetmedic.actions.base import ActionContext, ActionResult
from fleetmedic.actions.registry import ACTIONS, register_action
from fleetmedic.cloud import ProviderError, ServerRef, get_provider
from fleetmedic.inventory import Resource, get_resource

__all__ = ["FAILOVER_ACTION", "failover_primaries", "reboot"]

# The replication family's kind-generic failover (promote the follower, repoint the inventory).
FAILOVER_ACTION = "resource.failover"


def _server(ctx: ActionContext) -> ServerRef:
    """The server to act on: the incident's server resource, or the server a database lives on."""
    if ctx.resource.server is None:
        raise ProviderError(f"{ctx.resource.name} is on no server in the inventory; nothing to act on")
    return ServerRef.from_any(ctx.resource.server)


@register_action("instance.reboot", "server", "reboot the server through its cloud provider (a stopped one is started)")
def reboot(ctx: ActionContext) -> ActionResult:
    """Reboot through the provider; ok when the provider did it (the verify step checks it comes back)."""
    try:
        server = _server(ctx)
        provider = get_provider(server.provider)
        before = provider.instance_status(server)
        done = provider.reboot(server, reason=f"incident {ctx.incident_id} ({ctx.incident_type})")
    except ProviderError as exc:
        return ActionResult(False, f"reboot failed: {exc}")
    return ActionResult(True, done, {"server": server.name, "provider": server.provider,
                                     "state_before": before.state})


def _primaries_on(conn: psycopg.Connection, server_id: int) -> list[Resource]:
    rows = conn.execute(
        "SELECT id FROM resources WHERE server_id = %s AND role = 'primary' AND kind <> 'server' AND enabled "
        "ORDER BY name", (server_id,)).fetchall()
    return [get_resource(conn, int(r[0])) for r in rows]


def _followers_elsewhere(conn: psycopg.Connection, primary: Resource) -> list[str]:
    rows = conn.execute(
        "SELECT f.name FROM resources f WHERE f.primary_id = %s AND f.role = 'follower' AND f.enabled "
        "AND f.server_id IS DISTINCT FROM %s ORDER BY f.name", (primary.id, primary.server_id)).fetchall()
    return [str(r[0]) for r in rows]


@register_action("instance.failover_primaries", "server",
                 "fail over every primary database on the server to its follower on another server")
def failover_primaries(ctx: ActionContext) -> ActionResult:
    """For each primary on the server, run `resource.failover` on it; ok when every one failed over."""
    server = ctx.resource.server
    if server is None:
        return ActionResult(False, f"{ctx.resource.name} is on no server in the inventory; nothing to fail over")
    with psycopg.connect(ctx.ops_dsn) as conn:
        primaries = _primaries_on(conn, server.id)
        followers = {p.name: _followers_elsewhere(conn, p) for p in primaries}
    if not primaries:
        return ActionResult(True, f"no primary database on {server.name}; nothing to fail over",
                            {"server": server.name, "failed_over": []})
    spec = ACTIONS.get(FAILOVER_ACTION)
    if spec is None:
        return ActionResult(False, f"cannot fail over {', '.join(p.name for p in primaries)} on {server.name}: "
                                   f"{FAILOVER_ACTION} is not a registered action")
    done: list[str] = []
    failed: list[str] = []
    for primary in primaries:
        if not followers[primary.name]:
            failed.append(f"{primary.name}: no follower on another server to promote")
            continue
        result = spec.fn(ActionContext(incident_id=ctx.incident_id, incident_type=ctx.incident_type,
                                       resource=primary, ops_dsn=ctx.ops_dsn, dry_run=ctx.dry_run,
                                       params=ctx.params))
        (done if result.ok else failed).append(f"{primary.name}: {result.reason}")
    data = {"server": server.name, "failed_over": done, "failed": failed}
    if failed:
        return ActionResult(False, f"failed over {len(done)} of {len(primaries)} primaries on {server.name}; "
                                   f"not failed over: {'; '.join(failed)}"
                                   + (f"; failed over: {'; '.join(done)}" if done else ""), data)
    return ActionResult(True, f"failed over every primary on {server.name}: {'; '.join(done)}", data)
