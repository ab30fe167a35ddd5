"""Redis replication check: replicas attached to their primary and close behind it; primaries with their replicas."""

from __future__ import annotations

from typing import Any

from fleetmedic.detection.checks import Target, register_check

__all__ = ["DEFAULT_MAX_LAG_BYTES", "expected_primary", "redis_info"]

DEFAULT_MAX_LAG_BYTES = 1_000_000


async def redis_info(host: str, port: int, timeout: float, section: str = "replication") -> dict[str, Any]:
    """INFO <section> of one redis-server (raises RedisError/OSError when it does not answer)."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    # No retries: a refused connection is an answer, and retrying with backoff would outlast the probe.
    client = aioredis.Redis(host=host, port=port, socket_timeout=timeout, socket_connect_timeout=timeout,
                            retry=Retry(NoBackoff(), 0))
    try:
        return dict(await client.info(section))
    finally:
        await client.aclose()


def expected_primary(attrs: dict[str, Any]) -> tuple[str, int] | None:
    """The primary the inventory says a replica follows, when the target carries it (attrs.primary)."""
    primary = attrs.get("primary")
    if isinstance(primary, dict) and primary.get("host") and primary.get("port"):
        return str(primary["host"]), int(primary["port"])
    return None


def _max_lag(attrs: dict[str, Any]) -> int:
    value = attrs.get("replication_max_lag_bytes", DEFAULT_MAX_LAG_BYTES)
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"attrs.replication_max_lag_bytes must be a number of bytes, not {value!r}") from exc


async def _replica(target: Target, info: dict[str, Any], timeout: float) -> tuple[bool, float | None, str]:
    from redis.exceptions import RedisError

    if info.get("role") != "slave":
        return False, None, (f"{target.name} is a follower in the inventory but reports role:{info.get('role')} "
                             f"with {info.get('connected_slaves', 0)} replica(s): it follows no primary "
                             "(REPLICAOF NO ONE?)")
    master = (str(info.get("master_host")), int(info.get("master_port") or 0))
    where = f"{master[0]}:{master[1]}"
    wanted = expected_primary(target.attrs)
    if wanted is not None and wanted != master:
        return False, None, (f"{target.name} replicates from {where}, but its primary in the inventory is "
                             f"{wanted[0]}:{wanted[1]}")
    if info.get("master_link_status") != "up":
        down_for = info.get("master_link_down_since_seconds")
        since = f" for {down_for}s" if down_for not in (None, -1) else ""
        syncing = " (initial sync in progress)" if int(info.get("master_sync_in_progress") or 0) else ""
        if wanted is not None:
            # Told which primary to follow: if that primary itself is down, the fault is its
            # resource_down incident; a second incident here would page twice for one fault.
            try:
                await redis_info(wanted[0], wanted[1], timeout / 2, "server")
            except (RedisError, OSError) as exc:
                return True, None, (f"link to primary {where} is down{since}, because the primary does not "
                                    f"answer ({exc}); redis.ping on the primary reports that")
        return False, None, f"replica of {where}: master_link_status is down{since}{syncing}"
    replica_offset = int(info.get("slave_repl_offset") or 0)
    try:
        primary_info = await redis_info(master[0], master[1], timeout / 2)
    except (RedisError, OSError) as exc:
        return False, None, f"replica of {where} says its link is up, but the primary does not answer: {exc}"
    lag = max(0, int(primary_info.get("master_repl_offset") or 0) - replica_offset)
    limit = _max_lag(target.attrs)
    io_ago = info.get("master_last_io_seconds_ago")
    if lag > limit:
        return False, float(lag), (f"replica of {where} is {lag} bytes behind (limit {limit}); "
                                   f"last I/O from the primary {io_ago}s ago")
    return True, float(lag), f"replica of {where}: link up, {lag} bytes behind (limit {limit})"


def _primary(target: Target, info: dict[str, Any]) -> tuple[bool, float | None, str]:
    if info.get("role") != "master":
        return False, None, (f"{target.name} is a primary in the inventory but reports role:{info.get('role')} "
                             f"(replica of {info.get('master_host')}:{info.get('master_port')})")
    online = [v for k, v in info.items() if k.startswith("slave") and k[5:].isdigit()
              and isinstance(v, dict) and v.get("state") == "online"]
    expected = target.attrs.get("expected_replicas")
    if expected is None:
        return True, float(len(online)), (f"primary with {len(online)} online replica(s); "
                                          "attrs.expected_replicas not set, so no count is required")
    if len(online) < int(expected):
        return False, float(len(online)), (f"primary has {len(online)} online replica(s) but "
                                           f"{int(expected)} are expected (attrs.expected_replicas)")
    return True, float(len(online)), f"primary with {len(online)} online replica(s) ({int(expected)} expected)"


@register_check("redis.replication", "redis")
async def replication(target: Target, timeout: float) -> tuple[bool, float | None, str]:
    """A follower must replicate from its primary, link up and at most attrs.replication_max_lag_bytes
    behind (value: the lag in bytes); a primary must be a master with attrs.expected_replicas online
    replicas, when set (value: online replicas)."""
    from redis.exceptions import RedisError

    try:
        info = await redis_info(target.host, target.port, timeout / 2)
    except (RedisError, OSError) as exc:
        # Availability is redis.ping's finding (resource_down); counting it here too would open a
        # second incident, and run a second playbook, for one fault.
        return True, None, f"not checked: {target.host}:{target.port} does not answer ({exc}); " \
                           "redis.ping reports availability"
    if target.attrs.get("role") == "follower":
        return await _replica(target, info, timeout)
    return _primary(target, info)
