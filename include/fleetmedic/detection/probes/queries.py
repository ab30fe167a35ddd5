"""PostgreSQL checks on what the database is doing: sessions blocked on locks, and disk usage."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fleetmedic.detection.checks import Target, register_check

__all__ = [
    "BLOCKED_SESSIONS_SQL",
    "DEFAULT_BLOCKING_THRESHOLD_S",
    "DEFAULT_DISK_MAX_PERCENT",
    "BlockedSession",
    "BlockingPicture",
    "blocking_threshold",
    "describe_blocking",
    "picture_from_rows",
]

DEFAULT_BLOCKING_THRESHOLD_S = 10.0
DEFAULT_DISK_MAX_PERCENT = 90.0

# Every session waiting on a heavyweight lock, with the sessions blocking it and since when it
# waits (pg_locks.waitstart, PostgreSQL 14+; query_start as a fallback). pg_blocking_pids() is only
# called for sessions that wait on a lock, as the manual advises against calling it freely.
BLOCKED_SESSIONS_SQL = """
SELECT a.pid, a.usename, pg_blocking_pids(a.pid) AS blockers,
       extract(epoch FROM clock_timestamp() - coalesce(l.waitstart, a.query_start))::float8 AS waited,
       left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), 120) AS query
FROM pg_stat_activity a
LEFT JOIN LATERAL (SELECT min(waitstart) AS waitstart FROM pg_locks
                   WHERE pid = a.pid AND NOT granted) l ON true
WHERE a.wait_event_type = 'Lock' AND a.pid <> pg_backend_pid()
"""


@dataclass(frozen=True)
class BlockedSession:
    pid: int
    usename: str | None
    blockers: tuple[int, ...]
    waited: float  # seconds this session has waited for its lock
    query: str


@dataclass(frozen=True)
class BlockingPicture:
    """Who waits on whom right now, and which sessions are at the head of each chain."""

    blocked: tuple[BlockedSession, ...]
    threshold: float

    @property
    def long_blocked(self) -> list[BlockedSession]:
        """Sessions blocked for longer than the threshold, longest first."""
        return sorted((b for b in self.blocked if b.waited >= self.threshold and b.blockers),
                      key=lambda b: -b.waited)

    @property
    def longest_wait(self) -> float:
        return max((b.waited for b in self.blocked if b.blockers), default=0.0)

    def root_blockers(self, of: Iterable[BlockedSession] | None = None) -> list[int]:
        """The sessions at the head of the lock queues behind `of` (default: the long-blocked ones).

        A waiting session can block those queued after it (pg_blocking_pids counts them), but it is
        a victim too: the ones to act on are the blockers that do not wait on anyone themselves.
        """
        waits_on = {b.pid: b.blockers for b in self.blocked}
        roots: list[int] = []
        seen: set[int] = set()
        stack = [p for s in (self.long_blocked if of is None else of) for p in s.blockers]
        while stack:
            pid = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            if waits_on.get(pid):
                stack.extend(waits_on[pid])
            elif pid not in roots:
                roots.append(pid)
        return sorted(roots)


def picture_from_rows(rows: Iterable[tuple[Any, ...]], threshold: float) -> BlockingPicture:
    """Build the picture from BLOCKED_SESSIONS_SQL rows."""
    blocked = tuple(
        BlockedSession(int(r[0]), r[1], tuple(int(p) for p in (r[2] or ())), float(r[3] or 0.0), r[4] or "")
        for r in rows
    )
    return BlockingPicture(blocked, threshold)


def blocking_threshold(attrs: dict[str, Any]) -> float:
    """Seconds a session may wait on a lock before it counts as blocked (attrs.blocking_threshold_seconds)."""
    value = attrs.get("blocking_threshold_seconds", DEFAULT_BLOCKING_THRESHOLD_S)
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"attrs.blocking_threshold_seconds must be a number of seconds, not {value!r}") from exc


def describe_blocking(picture: BlockingPicture) -> str:
    """One line naming the blocked and the blocking pids, longest wait first."""
    long = picture.long_blocked
    head = long[0]
    roots = picture.root_blockers()
    who = f" ({head.usename})" if head.usename else ""
    text = (f"{len(long)} session(s) blocked longer than {picture.threshold:g}s: pid {head.pid}{who} waiting "
            f"{head.waited:.0f}s on pid(s) {', '.join(map(str, head.blockers))}")
    others = [b.pid for b in long[1:]]
    if others:
        text += f"; also blocked: pid(s) {', '.join(map(str, others))}"
    text += f"; blocking at the head of the queue: pid(s) {', '.join(map(str, roots)) or 'none (a deadlock?)'}"
    if head.query:
        text += f"; waiting query: {head.query}"
    return text


def _probe_conninfo(target: Target, timeout: float) -> str:
    # Connect a second sooner than the probe's own deadline, so "cannot connect" is an answer and
    # not a probe timeout.
    return target.conninfo(max(1.0, timeout - 1)).replace("fleetmedic-probe", "fleetmedic-probe-queries")


async def _connect(target: Target, timeout: float) -> Any:
    import psycopg

    return await psycopg.AsyncConnection.connect(_probe_conninfo(target, timeout), autocommit=True)


def _not_reachable(target: Target, exc: Exception) -> tuple[bool, float | None, str]:
    """A server that does not answer is postgres.connect's finding (resource_down), not this check's:
    counting it here too would open a second incident, and a second playbook, for one fault."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return True, None, f"not checked: cannot connect to {target.host}:{target.port} ({first}); " \
                       "postgres.connect reports availability"


@register_check("postgres.blocking_queries", "postgres")
async def blocking_queries(target: Target, timeout: float) -> tuple[bool, float | None, str]:
    """Unhealthy when a session has waited on a lock longer than the threshold; value: the longest wait (s)."""
    import psycopg

    threshold = blocking_threshold(target.attrs)
    try:
        aconn = await _connect(target, timeout)
    except psycopg.OperationalError as exc:
        return _not_reachable(target, exc)
    try:
        async with aconn.cursor() as cur:
            await cur.execute(f"SET statement_timeout = {max(500, int(timeout * 1000) - 500)}")
            await cur.execute(BLOCKED_SESSIONS_SQL)
            picture = picture_from_rows(await cur.fetchall(), threshold)
    finally:
        await aconn.close()
    longest = round(picture.longest_wait, 1)
    if picture.long_blocked:
        return False, longest, describe_blocking(picture)
    waiting = [b for b in picture.blocked if b.blockers]
    if waiting:
        return True, longest, (f"{len(waiting)} session(s) waiting on locks, the longest {longest:g}s "
                               f"(threshold {threshold:g}s)")
    return True, 0.0, f"no session is blocked on a lock (threshold {threshold:g}s)"


def _disk_limit(attrs: dict[str, Any]) -> float:
    value = attrs.get("disk_usage_max_percent", DEFAULT_DISK_MAX_PERCENT)
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"attrs.disk_usage_max_percent must be a percentage, not {value!r}") from exc


def _provider(target: Target) -> str:
    server = target.attrs.get("server") or {}
    return str(server.get("provider") or target.attrs.get("provider") or "local")


@register_check("postgres.disk_usage", "postgres")
async def disk_usage(target: Target, timeout: float) -> tuple[bool, float | None, str]:
    """Percent used: the databases against attrs.disk_quota_bytes, or else the data directory's filesystem.

    The filesystem can only be measured for a server on this machine (the `local` provider); a
    remote one needs a quota in its attrs.
    """
    import psycopg

    limit = _disk_limit(target.attrs)
    quota = target.attrs.get("disk_quota_bytes")
    local = _provider(target) == "local"
    if quota is None and not local:
        return True, None, (f"not measured: {target.name} is on provider '{_provider(target)}' and has no "
                            "attrs.disk_quota_bytes; set one to check its size")
    try:
        aconn = await _connect(target, timeout)
    except psycopg.OperationalError as exc:
        return _not_reachable(target, exc)
    try:
        async with aconn.cursor() as cur:
            if quota is not None:
                await cur.execute("SELECT sum(pg_database_size(datname))::float8 FROM pg_database "
                                  "WHERE datallowconn")
                row = await cur.fetchone()
                size = float(row[0] or 0) if row else 0.0
            else:
                await cur.execute("SHOW data_directory")
                row = await cur.fetchone()
                datadir = str(row[0]) if row else ""
    finally:
        await aconn.close()
    if quota is not None:
        try:
            quota_bytes = float(quota)
        except (TypeError, ValueError):
            return False, None, f"attrs.disk_quota_bytes must be a number of bytes, not {quota!r}; fix the inventory"
        if quota_bytes <= 0:
            return False, None, f"attrs.disk_quota_bytes is {quota!r}; it must be positive"
        pct = 100.0 * size / quota_bytes
        where = f"databases use {size / 2**20:.1f} MiB of a {quota_bytes / 2**20:.1f} MiB quota"
    else:
        try:
            st = os.statvfs(datadir)
        except OSError as exc:
            return False, None, f"cannot stat data directory {datadir!r} of {target.name}: {exc.strerror}"
        total = st.f_blocks * st.f_frsize
        used = total - st.f_bfree * st.f_frsize
        pct = 100.0 * used / total if total else 0.0
        where = f"filesystem of {datadir} is {pct:.1f}% used ({(total - used) / 2**30:.1f} GiB free)"
    pct = round(pct, 2)
    if pct >= limit:
        return False, pct, f"{where}: {pct:.1f}% is at or above the {limit:g}% limit"
    return True, pct, f"{where}: {pct:.1f}% is under the {limit:g}% limit"
