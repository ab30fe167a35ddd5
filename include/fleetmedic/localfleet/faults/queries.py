"""Lock contention faults: a client process holds a table lock in an open transaction, others queue behind it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from fleetmedic.localfleet.faults import FaultContext, FaultError, FaultResult, register_fault

__all__ = ["BLOCK_TABLE", "BLOCKER_APP", "CHAOS_ROLE", "WAITER_APP", "block", "chaos_dir", "unblock"]

CHAOS_ROLE = "app_user"  # a plain login role: automation may cancel it, unlike a superuser
BLOCK_TABLE = "fleetmedic_chaos_block"
BLOCKER_APP = "fleetmedic-chaos-blocker"
WAITER_APP = "fleetmedic-chaos-waiter"

# The blocker: take an ACCESS EXCLUSIVE lock in a transaction, then either sit idle in it (the
# classic incident: an application that forgot to commit) or run a long query inside it. It ends
# by itself after `hold` seconds, or as soon as the server ends its session.
_BLOCKER = r"""
import select, sys, time
import psycopg
dsn, table, mode, hold = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
conn = psycopg.connect(dsn)
conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
print(f"session {conn.info.backend_pid} holds ACCESS EXCLUSIVE on {table} ({mode})", flush=True)
try:
    if mode == "active":
        conn.execute("SELECT pg_sleep(%s)", (hold,))
    else:
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline:
            readable, _, _ = select.select([conn.fileno()], [], [], 1.0)
            if readable:
                print("the server ended the session", flush=True)
                sys.exit(0)
    conn.commit()
    print("released the lock after holding it for the whole time", flush=True)
except psycopg.Error as exc:
    print(f"blocker stopped: {type(exc).__name__}: {str(exc).strip()}", flush=True)
"""

# A waiter: one UPDATE queued behind the lock; it commits as soon as the lock is free.
_WAITER = r"""
import sys, time
import psycopg
dsn, table, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
started = time.monotonic()
with psycopg.connect(dsn) as conn:
    conn.execute(f"SET lock_timeout = {int(hold * 1000)}")
    print(f"session {conn.info.backend_pid} queued behind the lock", flush=True)
    try:
        conn.execute(f"UPDATE {table} SET n = n + 1 WHERE id = 1")
    except psycopg.Error as exc:
        print(f"waiter gave up: {type(exc).__name__}: {str(exc).strip()}", flush=True)
        sys.exit(1)
print(f"completed after {time.monotonic() - started:.1f}s", flush=True)
"""


def _admin_dsn(res: Any, dbname: str | None = None) -> str:
    user = res.attrs.get("user", "postgres")
    db = dbname or res.attrs.get("dbname", "postgres")
    return f"host={res.host} port={res.port} user={user} dbname={db} connect_timeout=5 application_name=fleetmedic-chaos"


def _client_dsn(res: Any, user: str) -> str:
    db = res.attrs.get("dbname", "postgres")
    return f"host={res.host} port={res.port} user={user} dbname={db} connect_timeout=5"


def chaos_dir(res: Any) -> Path:
    """Where the fault keeps its client processes' pid and log files for this resource."""
    base = res.attrs.get("base_dir")
    root = Path(base).parent if base else Path(tempfile.gettempdir())
    path = root / f"chaos-{res.name}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _prepare(res: Any) -> None:
    """Create the chaos role (a plain, non-superuser login) and the table it locks; a primary only."""
    try:
        with psycopg.connect(_admin_dsn(res), autocommit=True) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            if row and row[0]:
                raise FaultError(f"block needs a writable primary: {res.name} is a follower in recovery; "
                                 "pick its primary")
            # The queued clients always connect as the chaos role, whoever holds the lock.
            conn.execute(
                "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app_user') THEN "
                "CREATE ROLE app_user LOGIN NOSUPERUSER NOREPLICATION; END IF; END $$"
            )
            conn.execute(f"CREATE TABLE IF NOT EXISTS {BLOCK_TABLE} (id int PRIMARY KEY, n bigint NOT NULL)")
            conn.execute(f"INSERT INTO {BLOCK_TABLE} VALUES (1, 0) ON CONFLICT (id) DO NOTHING")
            conn.execute(f"GRANT SELECT, UPDATE ON {BLOCK_TABLE} TO {CHAOS_ROLE}")
    except psycopg.OperationalError as exc:
        raise FaultError(f"cannot connect to {res.name} at {res.host}:{res.port} to set up the block: "
                         f"{str(exc).strip().splitlines()[0]}") from exc


def _spawn(directory: Path, name: str, argv: list[str], env: dict[str, str]) -> int:
    """Start a client in its own session (it outlives the command that started it), tracked by a pid file."""
    log = open(directory / f"{name}.log", "wb")  # noqa: SIM115 - handed to the child
    # Not Airflow's: a client started from a task must not look like part of it.
    env = {k: v for k, v in env.items() if not k.startswith("AIRFLOW")}
    try:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd="/", start_new_session=True)
    finally:
        log.close()
    (directory / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def _sessions(res: Any, app: str) -> list[tuple[int, str, str | None]]:
    with psycopg.connect(_admin_dsn(res), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, state, wait_event_type FROM pg_stat_activity WHERE application_name = %s ORDER BY pid",
            (app,),
        ).fetchall()
    return [(int(r[0]), str(r[1]), r[2]) for r in rows]


def _wait_for(predicate: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


@register_fault("block", ("postgres",),
                "a client process holds a table lock in an open transaction, with queries queued behind it")
def block(ctx: FaultContext) -> FaultResult:
    """Options: user (default app_user), mode ('idle' in transaction, or 'active' running pg_sleep),
    waiters (queued clients, default 2), hold_seconds (the clients end by themselves, default 600)."""
    res = ctx.resource
    user = str(ctx.options.get("user") or CHAOS_ROLE)
    mode = str(ctx.options.get("mode") or "idle")
    if mode not in ("idle", "active"):
        raise FaultError(f"block mode must be 'idle' or 'active', not {mode!r}")
    waiters = int(ctx.options.get("waiters") or 2)
    hold = float(ctx.options.get("hold_seconds") or 600)
    if _sessions_alive(res):
        raise FaultError(f"{res.name} already has a block fault running; undo it first: "
                         f"fleetmedic chaos unblock {res.name}")
    _prepare(res)
    directory = chaos_dir(res)
    env = {**os.environ, "PGAPPNAME": BLOCKER_APP}
    blocker_pid = _spawn(directory, "blocker",
                         [sys.executable, "-c", _BLOCKER, _client_dsn(res, user), BLOCK_TABLE, mode, str(hold)], env)
    holder = _wait_for(lambda: _sessions(res, BLOCKER_APP), 15)
    if not holder:
        unblock(ctx)
        log = (directory / "blocker.log").read_text(errors="replace").strip()
        raise FaultError(f"the blocker client did not start on {res.name}: {log or 'no output'}")
    # Make sure the lock is held before anyone queues behind it.
    _wait_for(lambda: "holds ACCESS EXCLUSIVE" in (directory / "blocker.log").read_text(errors="replace"), 15)
    waiter_pids = []
    env = {**os.environ, "PGAPPNAME": WAITER_APP}
    for i in range(1, waiters + 1):
        waiter_pids.append(_spawn(directory, f"waiter{i}",
                                  [sys.executable, "-c", _WAITER, _client_dsn(res, CHAOS_ROLE), BLOCK_TABLE,
                                   str(hold)], env))
    def all_queued() -> list[tuple[int, str, str | None]]:
        waiting = [s for s in _sessions(res, WAITER_APP) if s[2] == "Lock"]
        return waiting if len(waiting) >= waiters else []

    queued = _wait_for(all_queued, 15) or [s for s in _sessions(res, WAITER_APP) if s[2] == "Lock"]
    blocker_session = holder[0][0]
    waiting = [s[0] for s in queued]
    state = "idle in transaction" if mode == "idle" else "running pg_sleep in its transaction"
    did = (f"client process {blocker_pid} (session pid {blocker_session} as {user}, {state}) holds ACCESS "
           f"EXCLUSIVE on {BLOCK_TABLE} in {res.name}; {len(waiter_pids)} client process(es) "
           f"{', '.join(map(str, waiter_pids))} queued behind it (session pids "
           f"{', '.join(map(str, waiting)) or 'not yet waiting'}); all end by themselves after {hold:g}s; "
           f"logs in {directory}")
    return FaultResult(did, f"fleetmedic chaos unblock {res.name}",
                       {"client_pids": [blocker_pid, *waiter_pids], "blocker_session_pid": blocker_session,
                        "waiting_session_pids": waiting, "table": BLOCK_TABLE, "user": user, "mode": mode,
                        "log_dir": str(directory)})


def _pidfiles(res: Any) -> list[Path]:
    return sorted(chaos_dir(res).glob("*.pid"))


def _alive(pid: int) -> bool:
    """True while `pid` is one of this fault's clients (not a zombie, nor a stranger that reused the pid)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return False
    return state != "Z" and BLOCK_TABLE.encode() in cmdline


def _sessions_alive(res: Any) -> list[int]:
    out = []
    for f in _pidfiles(res):
        try:
            pid = int(f.read_text().strip())
        except (OSError, ValueError):
            continue
        if _alive(pid):
            out.append(pid)
    return out


@register_fault("unblock", ("postgres",), "undo block: stop the client processes holding and waiting on the lock")
def unblock(ctx: FaultContext) -> FaultResult:
    res = ctx.resource
    stopped = []
    for f in _pidfiles(res):
        try:
            pid = int(f.read_text().strip())
        except (OSError, ValueError):
            pid = 0
        if pid and _alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)  # each client leads its own session (start_new_session)
            except ProcessLookupError:
                pass
            _wait_for(lambda pid=pid: not _alive(pid), 5)
            stopped.append(pid)
        f.unlink(missing_ok=True)
    did = (f"stopped block client process(es) {', '.join(map(str, stopped))} on {res.name}" if stopped
           else f"no block client process was running for {res.name}")
    return FaultResult(did, "(nothing to undo)", {"stopped": stopped})
