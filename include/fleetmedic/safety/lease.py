"""A short Redis lease on a resource, held while an action runs: the second belt after the incident claim.

`SET key token NX PX ttl` takes it; only the holder's token releases it (compare-and-delete in Lua);
a holder that dies leaves it to expire after `ttl`. The incident claim in the ops DB stays the fence:
the lease only keeps two actions (of different incident types, say) off one resource at once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import redis

from fleetmedic.safety.breakers import RedisUnavailable

__all__ = ["Lease", "LeaseBusy", "acquire_lease", "hold_lease", "lease_holder", "release_lease"]

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseBusy(RuntimeError):
    """Another action holds the resource's lease."""

    def __init__(self, resource_id: int, holder: str | None, waited: float) -> None:
        self.resource_id = resource_id
        self.holder = holder
        super().__init__(
            f"resource {resource_id} is leased by {holder or 'another action'} (waited {waited:.0f}s); "
            "not acting on it at the same time"
        )


@dataclass(frozen=True)
class Lease:
    resource_id: int
    key: str
    token: str
    ttl: timedelta


def _key(resource_id: int) -> str:
    return f"fleetmedic:lease:resource:{resource_id}"


def _redis_error(exc: redis.RedisError) -> RedisUnavailable:
    return RedisUnavailable(f"Redis did not answer ({type(exc).__name__}: {exc})")


def acquire_lease(client: redis.Redis, resource_id: int, *, owner: str, ttl: timedelta) -> Lease | None:
    """Take the lease (None when someone else holds it). The token names the owner, for `lease_holder`."""
    token = f"{owner}#{uuid.uuid4().hex[:12]}"
    key = _key(resource_id)
    try:
        ok = client.set(key, token, nx=True, px=max(1, int(ttl.total_seconds() * 1000)))
    except redis.RedisError as exc:
        raise _redis_error(exc) from exc
    return Lease(resource_id, key, token, ttl) if ok else None


def release_lease(client: redis.Redis, lease: Lease) -> bool:
    """Give the lease back; False when it is no longer ours (it expired, maybe someone else holds it)."""
    try:
        return bool(client.eval(_RELEASE, 1, lease.key, lease.token))
    except redis.RedisError as exc:
        raise _redis_error(exc) from exc


def lease_holder(client: redis.Redis, resource_id: int) -> str | None:
    try:
        value = client.get(_key(resource_id))
    except redis.RedisError as exc:
        raise _redis_error(exc) from exc
    return str(value) if value is not None else None


@contextmanager
def hold_lease(
    client: redis.Redis, resource_id: int, *, owner: str, ttl: timedelta, wait: float = 0.0, interval: float = 0.5,
) -> Iterator[Lease]:
    """Hold the lease for the block, waiting up to `wait` seconds for it; `LeaseBusy` if it stays taken.

    Released on exit by token, best effort: when Redis is gone by then, the lease expires after `ttl`.
    """
    started = time.monotonic()
    while True:
        lease = acquire_lease(client, resource_id, owner=owner, ttl=ttl)
        if lease is not None:
            break
        waited = time.monotonic() - started
        if waited >= wait:
            raise LeaseBusy(resource_id, lease_holder(client, resource_id), waited)
        time.sleep(interval)
    try:
        yield lease
    finally:
        try:
            release_lease(client, lease)
        except RedisUnavailable:
            pass
