"""Business-level probes ("can a customer connect and run a query?"), async with per-probe timeouts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = ["CHECKS", "CheckResult", "Target", "check_kind", "register_check", "run_checks", "run_one"]


@dataclass(frozen=True)
class Target:
    """One resource as a probe sees it."""

    resource_id: int
    name: str
    kind: str  # postgres | redis
    host: str
    port: int
    attrs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def conninfo(self, connect_timeout: float) -> str:
        user = self.attrs.get("user", "postgres")
        dbname = self.attrs.get("dbname", "postgres")
        return (
            f"host={self.host} port={self.port} user={user} dbname={dbname} "
            f"connect_timeout={max(1, int(connect_timeout))} application_name=fleetmedic-probe"
        )


@dataclass(frozen=True)
class CheckResult:
    resource_id: int
    check: str
    healthy: bool
    reason: str
    value: float | None = None
    checked_at: datetime = field(default_factory=lambda: datetime.now(UTC))


ProbeFn = Callable[[Target, float], Awaitable[tuple[bool, float | None, str]]]


async def _postgres_connect(target: Target, timeout: float) -> tuple[bool, float | None, str]:
    import psycopg

    started = time.perf_counter()
    try:
        aconn = await psycopg.AsyncConnection.connect(target.conninfo(timeout), autocommit=True)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return False, None, f"cannot connect to {target.host}:{target.port}: {first}"
    try:
        async with aconn.cursor() as cur:
            await cur.execute("SELECT 1")
            await cur.fetchone()
    except psycopg.Error as exc:
        return False, None, f"connected to {target.host}:{target.port} but SELECT 1 failed: {exc}"
    finally:
        await aconn.close()
    ms = (time.perf_counter() - started) * 1000
    return True, ms, f"SELECT 1 answered in {ms:.0f} ms"


async def _redis_ping(target: Target, timeout: float) -> tuple[bool, float | None, str]:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    started = time.perf_counter()
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    # No retries: a refused connection should say so, not turn into a timeout.
    client = aioredis.Redis(host=target.host, port=target.port, socket_timeout=timeout,
                            socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        return False, None, f"PING to {target.host}:{target.port} failed: {exc}"
    finally:
        await client.aclose()
    ms = (time.perf_counter() - started) * 1000
    return True, ms, f"PING answered in {ms:.0f} ms"


# name -> (resource kind it applies to, probe). Families of checks add themselves with
# `register_check` from modules under fleetmedic.detection.probes (imported at the end of this file).
CHECKS: dict[str, tuple[str, ProbeFn]] = {
    "postgres.connect": ("postgres", _postgres_connect),
    "redis.ping": ("redis", _redis_ping),
}


# The check a wait step uses when it only wants "is it serving again", whatever the resource kind.
AVAILABILITY_CHECK_BY_KIND = {"postgres": "postgres.connect", "redis": "redis.ping"}


async def _resource_available(target: Target, timeout: float) -> tuple[bool, float | None, str]:
    check = AVAILABILITY_CHECK_BY_KIND.get(target.kind)
    if check is None:
        return False, None, f"resource.available has no check for a {target.kind} resource"
    return await CHECKS[check][1](target, timeout)


CHECKS["resource.available"] = ("any", _resource_available)


def register_check(name: str, kind: str) -> Callable[[ProbeFn], ProbeFn]:
    """Decorator: add an async probe `(target, timeout) -> (healthy, value, reason)` to CHECKS."""

    def add(fn: ProbeFn) -> ProbeFn:
        if name in CHECKS:
            raise ValueError(f"check {name!r} is registered twice")
        CHECKS[name] = (kind, fn)
        return fn

    return add


def check_kind(check: str) -> str:
    return CHECKS[check][0]


async def run_one(target: Target, check: str, timeout: float) -> CheckResult:
    """Run one probe; a probe that hangs counts as failed at its timeout, an exception as failed."""
    _, fn = CHECKS[check]
    try:
        healthy, value, reason = await asyncio.wait_for(fn(target, timeout), timeout=timeout)
    except TimeoutError:
        healthy, value, reason = False, None, f"{check} gave no answer within {timeout:g}s"
    except Exception as exc:  # an unknown probe failure is a failed probe, never a crashed sweep
        healthy, value, reason = False, None, f"{check} raised {type(exc).__name__}: {exc}"
    return CheckResult(target.resource_id, check, healthy, reason, value)


async def run_checks(
    work: Iterable[tuple[Target, str]] | Sequence[tuple[Target, str]],
    *,
    timeout: float = 3.0,
    concurrency: int = 50,
) -> list[CheckResult]:
    """Run (target, check) probes with at most `concurrency` in flight."""
    sem = asyncio.Semaphore(concurrency)

    async def bounded(target: Target, check: str) -> CheckResult:
        async with sem:
            return await run_one(target, check, timeout)

    return list(await asyncio.gather(*(bounded(t, c) for t, c in work)))


def _load_check_families() -> None:
    import importlib
    import pkgutil

    import fleetmedic.detection.probes as probes

    for mod in pkgutil.iter_modules(probes.__path__):
        importlib.import_module(f"{probes.__name__}.{mod.name}")


_load_check_families()
