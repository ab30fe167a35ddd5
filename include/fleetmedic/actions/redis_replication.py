"""Remediation for broken Redis replication: point replicas back at the primary the inventory names."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from fleetmedic.actions.base import ActionContext, ActionResult
from fleetmedic.actions.registry import register_action
from fleetmedic.inventory import Resource, get_resource

__all__ = ["reattach_replica"]


def _client(host: str, port: int) -> redis.Redis:
    return redis.Redis(host=host, port=port, socket_timeout=5, socket_connect_timeout=5,
                       retry=Retry(NoBackoff(), 0))


def _replicas_of(ops_dsn: str, primary: Resource) -> list[Resource]:
    with psycopg.connect(ops_dsn) as conn:
        rows = conn.execute(
            "SELECT id FROM resources WHERE primary_id = %s AND kind = 'redis' AND enabled ORDER BY name",
            (primary.id,),
        ).fetchall()
        return [get_resource(conn, int(r[0])) for r in rows]


def _reattach_one(replica: Resource, primary: Resource, settle_seconds: float) -> tuple[bool, str, dict[str, Any]]:
    """REPLICAOF the primary on one replica (unless it already follows it with its link up)."""
    where = f"{primary.name} ({primary.host}:{primary.port})"
    primary_up, primary_error = True, ""
    pclient = _client(primary.host, primary.port)
    try:
        pclient.ping()
    except (RedisError, OSError) as exc:
        primary_up, primary_error = False, str(exc)
    finally:
        pclient.close()
    client = _client(replica.host, replica.port)
    try:
        info = client.info("replication")
        before = (f"replica of {info.get('master_host')}:{info.get('master_port')}, link "
                  f"{info.get('master_link_status')}" if info.get("role") == "slave"
                  else f"role:{info.get('role')}")
        follows = (info.get("role") == "slave" and str(info.get("master_host")) == primary.host
                   and int(info.get("master_port") or 0) == primary.port)
        if follows and info.get("master_link_status") == "up":
            return True, f"{replica.name} already replicates from {where} with its link up; nothing to do", {
                "changed": False}
        if not follows:
            client.execute_command("REPLICAOF", primary.host, str(primary.port))
        did = (f"REPLICAOF {primary.host} {primary.port} on {replica.name} (was {before})" if not follows
               else f"{replica.name} already points at {where} ({before})")
        if not primary_up:
            # The replica is now set to follow the right primary, which is all this action can do; the
            # link comes up once the primary's own resource_down playbook restarts it, and the verify
            # step waits for that (escalating if it never happens).
            return True, (f"{did}; primary {where} does not answer ({primary_error}), so the link comes up "
                          "only once it is restarted"), {"changed": not follows, "primary_up": False}
        deadline = time.monotonic() + settle_seconds
        status = None
        while time.monotonic() < deadline:
            status = client.info("replication").get("master_link_status")
            if status == "up":
                break
            time.sleep(0.25)
    except (RedisError, OSError) as exc:
        return False, f"cannot reach replica {replica.name} at {replica.host}:{replica.port}: {exc}", {}
    finally:
        client.close()
    if status == "up":
        return True, f"{did}; link up after resync", {"changed": not follows}
    return True, (f"{did}; link still {status} after {settle_seconds:g}s (a full resync can take longer; "
                  "the verify step waits for it)"), {"changed": not follows}


@register_action("redis.reattach_replica", "redis",
                 "point a replica (or every replica of a primary) at the inventory's primary with REPLICAOF")
def reattach_replica(ctx: ActionContext) -> ActionResult:
    """On a follower: REPLICAOF its primary from the inventory. On a primary: the same for each of its
    inventory replicas that does not follow it with its link up."""
    res = ctx.resource
    settle = float(ctx.params.get("settle_seconds", 10))
    if res.role == "follower":
        if res.primary_id is None:
            return ActionResult(False, f"{res.name} is a follower with no primary in the inventory; set its "
                                       "primary_id, or reattach it by hand with REPLICAOF")
        with psycopg.connect(ctx.ops_dsn) as conn:
            primary = get_resource(conn, int(res.primary_id))
        ok, reason, data = _reattach_one(res, primary, settle)
        return ActionResult(ok, reason, {"primary": primary.name, **data})
    replicas = _replicas_of(ctx.ops_dsn, res)
    if not replicas:
        return ActionResult(False, f"{res.name} is a primary with no replicas in the inventory; nothing to reattach")
    results = [(r.name, *_reattach_one(r, res, settle)) for r in replicas]
    reason = "; ".join(f"{name}: {why}" for name, _ok, why, _d in results)
    return ActionResult(all(ok for _n, ok, _w, _d in results), reason,
                        {"replicas": {name: d for name, _ok, _w, d in results}})
