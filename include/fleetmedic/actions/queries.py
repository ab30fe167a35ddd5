"""Remediation for lock contention: cancel, then terminate, the sessions at the head of the lock queue.

Never a superuser's session nor anything but a client backend (walsenders, autovacuum, background
workers): those are refused with a reason, and the playbook escalates to a human.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psycopg

from fleetmedic.actions.base import ActionContext, ActionResult
from fleetmedic.actions.registry import register_action
from fleetmedic.detection.probes.queries import (
    BLOCKED_SESSIONS_SQL,
    BlockingPicture,
    blocking_threshold,
    picture_from_rows,
)

__all__ = ["Blocker", "cancel_blockers", "protected_reason", "terminate_blockers"]


@dataclass(frozen=True)
class Blocker:
    pid: int
    usename: str | None
    backend_type: str
    state: str | None
    superuser: bool
    xact_seconds: float | None
    query: str
    backend_start: Any = None  # with the pid, names one session (pids are reused)

    def label(self) -> str:
        state = f", {self.state}" if self.state else ""
        age = f" for {self.xact_seconds:.0f}s" if self.xact_seconds is not None else ""
        return f"pid {self.pid} ({self.usename or self.backend_type}{state}{age})"


_BLOCKERS_SQL = """
SELECT a.pid, a.usename, a.backend_type, a.state, coalesce(r.rolsuper, false),
       extract(epoch FROM clock_timestamp() - a.xact_start)::float8,
       left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), 120), a.backend_start
FROM pg_stat_activity a LEFT JOIN pg_roles r ON r.oid = a.usesysid
WHERE a.pid = ANY(%s)
"""


def protected_reason(b: Blocker, protected_users: set[str]) -> str | None:
    """Why automation must not touch this session, or None when it may."""
    if b.superuser:
        return f"{b.label()} is a superuser session ({b.usename}); automation never signals superusers"
    if b.backend_type != "client backend":
        return (f"{b.label()} is a {b.backend_type} process, not a client session; automation never signals "
                "replication or server processes")
    if b.usename in protected_users:
        return f"{b.label()} belongs to {b.usename}, listed in attrs.protected_users"
    return None


def _conninfo(ctx: ActionContext) -> str:
    res = ctx.resource
    user = res.attrs.get("user", "postgres")
    dbname = res.attrs.get("dbname", "postgres")
    return (f"host={res.host} port={res.port} user={user} dbname={dbname} connect_timeout=5 "
            "application_name=fleetmedic-action")


def _picture(conn: psycopg.Connection, threshold: float) -> BlockingPicture:
    return picture_from_rows(conn.execute(BLOCKED_SESSIONS_SQL).fetchall(), threshold)


def _blockers(conn: psycopg.Connection, pids: list[int]) -> list[Blocker]:
    rows = conn.execute(_BLOCKERS_SQL, (pids,)).fetchall()
    return [Blocker(int(r[0]), r[1], str(r[2]), r[3], bool(r[4]), None if r[5] is None else float(r[5]), r[6] or "",
                    r[7]) for r in rows]


def _still_blocking(conn: psycopg.Connection, pids: set[int]) -> set[int]:
    """Which of `pids` still block some waiting session (whatever its wait so far)."""
    picture = _picture(conn, 0.0)
    return {p for b in picture.blocked for p in b.blockers} & pids


def _signal_blockers(ctx: ActionContext, verb: str, did: str, signal_fn: str, settle_seconds: float) -> ActionResult:
    """Signal the root blockers of sessions blocked past the threshold; ok when nothing was refused and
    the signalled sessions no longer block anyone after `settle_seconds`."""
    res = ctx.resource
    threshold = blocking_threshold(res.attrs)
    protected_users = set(res.attrs.get("protected_users") or ())
    try:
        conn = psycopg.connect(_conninfo(ctx), autocommit=True)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return ActionResult(False, f"cannot connect to {res.name} at {res.host}:{res.port} to {verb} blockers: {first}")
    with conn:
        picture = _picture(conn, threshold)
        long = picture.long_blocked
        if not long:
            return ActionResult(True, f"no session on {res.name} is blocked longer than {threshold:g}s any more; "
                                      f"nothing to {verb}", {"signalled": [], "refused": []})
        roots = picture.root_blockers()
        if not roots:
            return ActionResult(False, f"{len(long)} session(s) on {res.name} blocked, but every blocker waits "
                                       "on another (a lock cycle PostgreSQL has not broken); a human must look",
                                {"blocked": [b.pid for b in long]})
        blockers = _blockers(conn, roots)
        gone = set(roots) - {b.pid for b in blockers}
        refused = [(b, why) for b in blockers if (why := protected_reason(b, protected_users))]
        allowed = [b for b in blockers if not protected_reason(b, protected_users)]
        signalled: list[Blocker] = []
        failed: list[Blocker] = []
        for b in allowed:
            # The backend_start fence: never signal a new session that reused the pid meanwhile.
            row = conn.execute(f"SELECT {signal_fn} FROM pg_stat_activity WHERE pid = %s AND backend_start = %s",
                               (b.pid, b.backend_start)).fetchone()
            if row and row[0]:
                signalled.append(b)
            elif row is None:
                gone.add(b.pid)
            else:
                failed.append(b)
        remaining = _wait_released(conn, {b.pid for b in signalled}, settle_seconds)
        after = _picture(conn, threshold)
    blocked_pids = [b.pid for b in long]
    data: dict[str, Any] = {
        "blocked": blocked_pids, "blockers": roots, "signalled": [b.pid for b in signalled],
        "refused": [b.pid for b, _why in refused], "failed": [b.pid for b in failed], "still_blocking": sorted(remaining),
        "still_blocked": [b.pid for b in after.long_blocked],
    }
    parts = [f"{len(long)} session(s) blocked longer than {threshold:g}s (pid(s) {', '.join(map(str, blocked_pids))})"]
    if signalled:
        parts.append(f"{did} {'; '.join(b.label() for b in signalled)}")
    for _b, why in refused:
        parts.append(f"refused: {why}")
    if gone:
        parts.append(f"pid(s) {', '.join(map(str, sorted(gone)))} had already ended")
    if failed:
        parts.append(f"PostgreSQL would not {verb} pid(s) {', '.join(str(b.pid) for b in failed)} "
                     f"(it returned false within {settle_seconds:g}s)")
    if remaining:
        idle = [b.pid for b in signalled if b.pid in remaining and (b.state or "").startswith("idle in transaction")]
        hint = " (idle in transaction: there is no running query to cancel)" if idle and verb == "cancel" else ""
        parts.append(f"pid(s) {', '.join(map(str, sorted(remaining)))} still hold their locks "
                     f"{settle_seconds:g}s after the signal{hint}")
    if refused or failed or remaining:
        return ActionResult(False, "; ".join(parts), data)
    if not signalled and not gone:
        return ActionResult(False, "; ".join(parts + [f"no blocker could be signalled to {verb}"]), data)
    parts.append(f"{len(after.long_blocked)} session(s) still blocked longer than {threshold:g}s"
                 if after.long_blocked else "the queue behind them is moving")
    return ActionResult(True, "; ".join(parts), data)


def _wait_released(conn: psycopg.Connection, pids: set[int], timeout: float) -> set[int]:
    """Wait up to `timeout` until none of `pids` blocks anyone; the ones that still do."""
    if not pids:
        return set()
    deadline = time.monotonic() + timeout
    remaining = _still_blocking(conn, pids)
    while remaining and time.monotonic() < deadline:
        time.sleep(0.25)
        remaining = _still_blocking(conn, pids)
    return remaining


@register_action("postgres.cancel_blockers", "postgres",
                 "cancel the running query of the sessions at the head of a lock queue (pg_cancel_backend)")
def cancel_blockers(ctx: ActionContext) -> ActionResult:
    """pg_cancel_backend the root blockers; fails (so the playbook moves on) when they still hold their
    locks a few seconds later, which is what happens to a session idle in transaction."""
    return _signal_blockers(ctx, "cancel", "sent pg_cancel_backend to", "pg_cancel_backend(pid)",
                            float(ctx.params.get("settle_seconds", 3)))


@register_action("postgres.terminate_blockers", "postgres",
                 "end the sessions at the head of a lock queue (pg_terminate_backend), never superusers")
def terminate_blockers(ctx: ActionContext) -> ActionResult:
    """pg_terminate_backend the root blockers, waiting up to settle_seconds for each to exit."""
    wait = float(ctx.params.get("settle_seconds", 5))
    return _signal_blockers(ctx, "terminate", "terminated", f"pg_terminate_backend(pid, {int(wait * 1000)})", wait)
