"""Replication and backup checks: how far a follower is behind its primary, and how old the newest base backup is.

`postgres.replication_lag` (detection) and `postgres.replication_caught_up` (wait steps) measure
the same thing. They differ in what they say when lag cannot be measured because the follower or
its primary does not answer: detection leaves that to `postgres.connect` (one incident per cause,
not two), while a wait step must not mistake "not answering" for "caught up".

How lag is measured, without mistaking an idle primary for lag: read the primary's current WAL
position first, then give the follower a short grace to replay up to it. A follower that keeps up
reaches it within milliseconds, whether the primary is idle or busy; only a follower that is
really behind (replay paused, slow or stuck) is still short of it. Then the lag is the WAL it has
not replayed (bytes) and the time since it replayed its last commit (seconds; since it started,
when it has replayed none). That time overstates the lag of a follower that fell behind after a long
idle spell, which is why it only counts once the follower has failed the grace: it is behind.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fleetmedic.detection.checks import Target, register_check

__all__ = [
    "DEFAULT_MAX_BACKUP_AGE",
    "DEFAULT_MAX_LAG_BYTES",
    "DEFAULT_MAX_LAG_SECONDS",
    "LagReading",
    "LagUnmeasurable",
    "lsn_to_int",
    "max_backup_age",
    "measure_lag",
]

DEFAULT_MAX_LAG_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_LAG_SECONDS = 30.0
DEFAULT_MAX_BACKUP_AGE = timedelta(hours=26)
# The longest a follower may take to replay up to the primary position we read before it counts as behind.
CATCH_UP_GRACE = 1.0


def lsn_to_int(lsn: str) -> int:
    """'16/B374D848' -> byte position in the WAL."""
    hi, _, lo = lsn.partition("/")
    return (int(hi, 16) << 32) + int(lo, 16)


def _mb(n: float) -> str:
    return f"{n / 1024 / 1024:.1f} MB"


def _attr_float(attrs: dict[str, Any], key: str, default: float) -> float:
    try:
        return float(attrs.get(key, default))
    except (TypeError, ValueError):
        return default


def max_backup_age(attrs: dict[str, Any]) -> timedelta:
    """The resource's limit (attrs.base_backup_max_age: seconds or '26h'), or the default."""
    from fleetmedic.playbooks.schema import parse_duration

    value = attrs.get("base_backup_max_age")
    if value in (None, ""):
        return DEFAULT_MAX_BACKUP_AGE
    try:
        return parse_duration(value)
    except ValueError:
        return DEFAULT_MAX_BACKUP_AGE


class LagUnmeasurable(Exception):
    """Lag could not be measured; `cause` is follower_down, primary_down, not_replicating or no_upstream."""

    def __init__(self, cause: str, reason: str):
        super().__init__(reason)
        self.cause = cause
        self.reason = reason


@dataclass(frozen=True)
class LagReading:
    follower: str  # host:port
    upstream: str  # host:port
    primary_lsn: str
    replay_lsn: str
    receive_lsn: str | None
    bytes: int
    seconds: float | None  # since the follower replayed its last commit (or started, if it replayed none)
    paused: bool
    since_start: bool = False  # no commit replayed since the follower started: seconds count from its start

    @property
    def caught_up(self) -> bool:
        return self.bytes <= 0

    def describe(self) -> str:
        if self.caught_up:
            return (f"follower {self.follower} has replayed up to its primary {self.upstream} "
                    f"(LSN {self.primary_lsn}){'; replay is paused but nothing is waiting' if self.paused else ''}")
        if self.seconds is None:
            secs = "no commit replayed yet"
        elif self.since_start:
            secs = f"no commit replayed since it started {self.seconds:.0f} s ago"
        else:
            secs = f"{self.seconds:.0f} s since its last replayed commit"
        return (f"follower {self.follower} is {self.bytes} bytes ({_mb(self.bytes)}) behind its primary "
                f"{self.upstream} (primary at {self.primary_lsn}, replayed {self.replay_lsn}; {secs})"
                f"{'; WAL replay is paused' if self.paused else ''}")


_CONNINFO_KV = re.compile(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")


def _parse_conninfo(conninfo: str) -> dict[str, str]:
    return {k: v.strip("'") for k, v in _CONNINFO_KV.findall(conninfo or "")}


async def _connect(host: str, port: int, timeout: float, attrs: dict[str, Any]) -> Any:
    import psycopg

    conninfo = (f"host={host} port={port} user={attrs.get('user', 'postgres')} "
                f"dbname={attrs.get('dbname', 'postgres')} connect_timeout={max(1, int(timeout))} "
                "application_name=fleetmedic-probe")
    return await psycopg.AsyncConnection.connect(conninfo, autocommit=True)


async def _one(aconn: Any, sql: str, params: tuple = ()) -> tuple:
    async with aconn.cursor() as cur:
        await cur.execute(sql, params)
        row = await cur.fetchone()
    return tuple(row) if row is not None else ()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def measure_lag(host: str, port: int, timeout: float, attrs: dict[str, Any] | None = None,
                      upstream: tuple[str, int] | None = None) -> LagReading:
    """How far the follower at host:port is behind its upstream (the primary it streams from).

    The upstream is `upstream` when given, else what the follower streams from (pg_stat_wal_receiver),
    else its primary_conninfo. Raises LagUnmeasurable when either side does not answer.
    """
    import psycopg

    attrs = attrs or {}
    started = time.monotonic()
    follower = f"{host}:{port}"
    try:
        fconn = await _connect(host, port, timeout, attrs)
    except psycopg.OperationalError as exc:
        raise LagUnmeasurable("follower_down", f"follower {follower} does not answer: {_first_line(exc)}") from None
    try:
        (in_recovery,) = await _one(fconn, "SELECT pg_is_in_recovery()")
        if not in_recovery:
            raise LagUnmeasurable("not_replicating",
                                  f"{follower} is not in recovery: it is not replicating from any primary "
                                  "(promoted, or started without standby.signal)")
        if upstream is None:
            row = await _one(fconn, "SELECT sender_host, sender_port, status FROM pg_stat_wal_receiver")
            if row and row[0] and row[1]:
                upstream = (str(row[0]), int(row[1]))
            else:
                (conninfo,) = await _one(fconn, "SELECT current_setting('primary_conninfo')")
                kv = _parse_conninfo(conninfo)
                if kv.get("port") or kv.get("host"):
                    upstream = (kv.get("host") or kv.get("hostaddr") or "127.0.0.1", int(kv.get("port") or 5432))
        if upstream is None:
            raise LagUnmeasurable("no_upstream", f"follower {follower} has no primary_conninfo: it streams from nobody")
        up = f"{upstream[0]}:{upstream[1]}"
        remaining = max(0.5, timeout - (time.monotonic() - started))
        try:
            pconn = await _connect(upstream[0], upstream[1], remaining, attrs)
        except psycopg.OperationalError as exc:
            raise LagUnmeasurable("primary_down",
                                  f"primary {up} of follower {follower} does not answer: {_first_line(exc)}") from None
        try:
            (primary_lsn,) = await _one(
                pconn, "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
                       "ELSE pg_current_wal_flush_lsn() END)::text")
        finally:
            await pconn.close()
        target = lsn_to_int(primary_lsn)
        grace_until = time.monotonic() + min(CATCH_UP_GRACE, max(0.1, timeout / 4))
        while True:
            replay, receive, paused, seconds, never = await _one(
                fconn,
                "SELECT pg_last_wal_replay_lsn()::text, pg_last_wal_receive_lsn()::text, "
                "pg_is_wal_replay_paused(), "
                "extract(epoch FROM now() - coalesce(pg_last_xact_replay_timestamp(), pg_postmaster_start_time()))"
                "::float8, pg_last_xact_replay_timestamp() IS NULL",
            )
            behind = target - lsn_to_int(replay) if replay else target
            if behind <= 0 or time.monotonic() >= grace_until:
                break
            await asyncio.sleep(0.05)
        return LagReading(
            follower=follower, upstream=up, primary_lsn=primary_lsn, replay_lsn=replay or "0/0",
            receive_lsn=receive, bytes=max(0, behind), seconds=None if seconds is None else max(0.0, seconds),
            paused=bool(paused), since_start=bool(never),
        )
    except psycopg.Error as exc:
        raise LagUnmeasurable("follower_down", f"follower {follower} failed a query: {_first_line(exc)}") from None
    finally:
        await fconn.close()


def judge_lag(reading: LagReading, attrs: dict[str, Any]) -> tuple[bool, float | None, str]:
    """Healthy unless the follower is behind by more than its byte limit, or (while behind) its time limit."""
    max_bytes = _attr_float(attrs, "replication_lag_max_bytes", DEFAULT_MAX_LAG_BYTES)
    max_seconds = _attr_float(attrs, "replication_lag_max_seconds", DEFAULT_MAX_LAG_SECONDS)
    limits = f"limits {_mb(max_bytes)} / {max_seconds:g} s"
    if reading.caught_up:
        return True, 0.0, f"caught up: {reading.describe()}"
    too_many_bytes = reading.bytes > max_bytes
    too_long = reading.seconds is not None and reading.seconds > max_seconds
    if too_many_bytes or too_long:
        return False, float(reading.bytes), f"lagging: {reading.describe()} ({limits})"
    return True, float(reading.bytes), f"within limits: {reading.describe()} ({limits})"


def _role(target: Target) -> str:
    return str(target.attrs.get("role", ""))


def _inventory_upstream(target: Target) -> tuple[str, int] | None:
    primary = target.attrs.get("primary")
    if isinstance(primary, dict) and primary.get("port"):
        return str(primary.get("host", "127.0.0.1")), int(primary["port"])
    return None


async def _lag(target: Target, timeout: float, *, strict: bool) -> tuple[bool, float | None, str]:
    if _role(target) != "follower":
        return True, None, f"{target.name} is a {_role(target) or 'resource of unknown role'}; replication lag is measured on followers"
    try:
        reading = await measure_lag(target.host, target.port, timeout, target.attrs)
    except LagUnmeasurable as exc:
        if strict or exc.cause in ("not_replicating", "no_upstream"):
            return False, None, f"{target.name}: {exc.reason}"
        # Not answering is postgres.connect's incident (on the follower or on its primary), not this one.
        return True, None, f"lag not measured: {exc.reason} (postgres.connect covers an unreachable server)"
    expected = _inventory_upstream(target)
    if expected is not None and reading.upstream not in (f"{expected[0]}:{expected[1]}",):
        return False, float(reading.bytes), (
            f"{target.name} streams from {reading.upstream}, but the inventory says its primary is "
            f"{expected[0]}:{expected[1]}; repoint it (rebuild the follower)")
    return judge_lag(reading, target.attrs)


@register_check("postgres.replication_lag", "postgres")
async def replication_lag(target: Target, timeout: float) -> tuple[bool, float | None, str]:
    """A follower more than the byte or time limit behind its primary (value: bytes behind)."""
    return await _lag(target, timeout, strict=False)


@register_check("postgres.replication_caught_up", "postgres")
async def replication_caught_up(target: Target, timeout: float) -> tuple[bool, float | None, str]:
    """Like postgres.replication_lag, but a follower or primary that does not answer is not caught up."""
    return await _lag(target, timeout, strict=True)


@register_check("postgres.changeover_caught_up", "postgres")
async def changeover_caught_up(target: Target, timeout: float) -> tuple[bool, float | None, str]:
    """The follower a changeover is building for this primary (attrs.changeover) is streaming and caught up."""
    plan = target.attrs.get("changeover") or {}
    new = plan.get("new") or {}
    if not new.get("port"):
        return False, None, f"{target.name} has no changeover in progress (attrs.changeover.new is missing)"
    try:
        reading = await measure_lag(str(new.get("host", "127.0.0.1")), int(new["port"]), timeout, target.attrs,
                                    upstream=(target.host, target.port))
    except LagUnmeasurable as exc:
        return False, None, f"changeover follower of {target.name}: {exc.reason}"
    healthy, value, reason = judge_lag(reading, {"replication_lag_max_bytes": 0, "replication_lag_max_seconds": 0})
    return healthy, value, f"changeover follower on {new.get('server')}: {reason}"


@register_check("postgres.base_backup_age", "postgres")
async def base_backup_age(target: Target, timeout: float) -> tuple[bool, float | None, str]:
    """The newest complete base backup of a primary is younger than its limit (value: age in hours)."""
    from fleetmedic.localfleet.backups import store_for_attrs

    if _role(target) != "primary":
        return True, None, f"{target.name} is a {_role(target) or 'resource of unknown role'}; base backups are taken of primaries"
    provider = target.attrs.get("provider", "local")
    store = store_for_attrs(target.attrs) if provider == "local" else None
    if store is None:
        return True, None, (f"base backups of {target.name} are not tracked here (provider {provider}, no "
                            "attrs.backup_store); its provider keeps them")
    limit = max_backup_age(target.attrs)
    newest, running = await asyncio.to_thread(lambda: (store.newest(target.name), store.running(target.name)))
    note = f"; a backup is running since {running.started_at:%H:%M:%S} UTC" if running else ""
    if newest is None:
        return False, None, f"{target.name} has no complete base backup in {store.dir_for(target.name)}{note}"
    age = newest.age()
    assert age is not None
    hours = age.total_seconds() / 3600
    when = f"newest base backup {newest.path.name} completed {hours:.1f} h ago (limit {limit.total_seconds() / 3600:g} h)"
    if age > limit:
        return False, hours, f"too old: {when}{note}"
    return True, hours, f"{when}{note}"
