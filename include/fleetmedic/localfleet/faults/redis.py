"""Faults on Redis: a stopped redis-server, and a replica cut off from its primary."""

from __future__ import annotations

from typing import Any

import psycopg
import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from fleetmedic.inventory import get_resource
from fleetmedic.localfleet.faults import FaultContext, FaultError, FaultResult, register_fault
from fleetmedic.localfleet.fleet import redis_for
from fleetmedic.localfleet.services import ServiceError, free_port

__all__ = ["break_redis_replication", "start_redis", "stop_redis"]


def _client(res: Any) -> redis.Redis:
    return redis.Redis(host=res.host, port=res.port, socket_timeout=5, socket_connect_timeout=5,
                       retry=Retry(NoBackoff(), 0))


def _primary_of(ctx: FaultContext) -> Any:
    res = ctx.resource
    if res.primary_id is None:
        return None
    with psycopg.connect(ctx.ops_dsn) as conn:
        return get_resource(conn, int(res.primary_id))


@register_fault("stop-redis", ("redis",), "stop redis-server (SIGTERM; the demo keeps no data on disk)")
def stop_redis(ctx: FaultContext) -> FaultResult:
    res = ctx.resource
    stopped = redis_for(res.attrs, res.port).stop()
    did = (f"stopped redis-server {res.name} on port {res.port}" if stopped
           else f"redis-server {res.name} was already stopped")
    return FaultResult(did, f"fleetmedic chaos start-redis {res.name}", {"stopped": stopped})


@register_fault("start-redis", ("redis",), "undo stop-redis: start redis-server again (a replica re-follows its primary)")
def start_redis(ctx: FaultContext) -> FaultResult:
    res = ctx.resource
    try:
        redis_for(res.attrs, res.port).start()
    except ServiceError as exc:
        raise FaultError(str(exc)) from exc
    did = f"redis-server {res.name} is running on port {res.port}"
    primary = _primary_of(ctx) if res.role == "follower" else None
    if primary is not None:
        client = _client(res)
        try:
            client.execute_command("REPLICAOF", primary.host, str(primary.port))
        finally:
            client.close()
        did += f", replica of {primary.name} ({primary.host}:{primary.port})"
    return FaultResult(did, "(nothing to undo)")


@register_fault("break-redis-replication", ("redis",),
                "point a replica at a dead port (or, with mode=no-one, detach it) so its link is down")
def break_redis_replication(ctx: FaultContext) -> FaultResult:
    """Options: mode 'dead-port' (default: REPLICAOF a port nothing listens on) or 'no-one' (REPLICAOF NO ONE)."""
    res = ctx.resource
    mode = str(ctx.options.get("mode") or "dead-port")
    if mode not in ("dead-port", "no-one"):
        raise FaultError(f"break-redis-replication mode must be 'dead-port' or 'no-one', not {mode!r}")
    if res.role != "follower":
        raise FaultError(f"{res.name} is a {res.role}; break-redis-replication needs a replica (a follower)")
    client = _client(res)
    now = "nothing (detached)"
    try:
        info = client.info("replication")
        if info.get("role") != "slave":
            raise FaultError(f"{res.name} is not replicating (role:{info.get('role')}); nothing to break")
        was = f"{info.get('master_host')}:{info.get('master_port')}"
        if mode == "no-one":
            client.execute_command("REPLICAOF", "NO", "ONE")
            what = f"detached replica {res.name} from {was} with REPLICAOF NO ONE (it now acts as a primary)"
        else:
            dead = free_port()
            now = f"127.0.0.1:{dead}"
            client.execute_command("REPLICAOF", "127.0.0.1", str(dead))
            what = (f"pointed replica {res.name} (was following {was}) at 127.0.0.1:{dead}, where nothing "
                    "listens: its replication link is down")
    except RedisError as exc:
        raise FaultError(f"cannot reach redis {res.name} at {res.host}:{res.port}: {exc}") from exc
    finally:
        client.close()
    host, _, port = was.partition(":")
    return FaultResult(what, f"redis-cli -h {res.host} -p {res.port} REPLICAOF {host} {port}",
                       {"was_following": was, "now_following": now, "mode": mode})
