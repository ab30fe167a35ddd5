"""Faults on replication and backups: a follower that stops replaying while its primary keeps writing,
and base backups that are older than their limit.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path

import psycopg

from fleetmedic.detection.probes.replication import max_backup_age
from fleetmedic.inventory import Resource, get_resource
from fleetmedic.localfleet.backups import store_for_attrs
from fleetmedic.localfleet.faults import FaultContext, FaultError, FaultResult, register_fault
from fleetmedic.localfleet.services import BackgroundProcess

__all__ = ["CHAOS_TABLE", "run_writer", "writer_for"]

CHAOS_TABLE = "fleetmedic_chaos_writes"
# The background writer stops by itself after this long (seconds), so a forgotten fault ends.
DEFAULT_WRITER_SECONDS = 600


def _dsn(host: str, port: int) -> str:
    return f"host={host} port={port} user=postgres dbname=postgres connect_timeout=5 application_name=fleetmedic-chaos"


def _ensure_table(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {CHAOS_TABLE} (id bigserial PRIMARY KEY, "
                     "at timestamptz NOT NULL DEFAULT now(), source text NOT NULL, payload text NOT NULL)")


def run_writer(host: str, port: int, seconds: float, interval: float, source: str) -> int:
    """Insert a row every `interval` seconds for `seconds` seconds (reconnecting on errors); rows written."""
    deadline = time.monotonic() + seconds
    written = 0
    payload = "x" * 512
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(_dsn(host, port), autocommit=True) as conn:
                while time.monotonic() < deadline:
                    conn.execute(f"INSERT INTO {CHAOS_TABLE} (source, payload) VALUES (%s, %s)", (source, payload))
                    written += 1
                    time.sleep(interval)
        except psycopg.Error as exc:
            print(f"writer: {exc}".strip(), flush=True)
            time.sleep(1)
    print(f"writer: wrote {written} rows in {seconds:.0f}s; stopping by itself", flush=True)
    return written


def writer_for(follower: Resource) -> BackgroundProcess:
    """The bounded background writer a pause-replay fault runs on the follower's primary."""
    run_dir = Path(follower.attrs.get("base_dir") or ".") / "chaos"
    return BackgroundProcess(f"writer-{follower.name}", [], run_dir)


def _primary_of(ops_dsn: str, follower: Resource) -> Resource:
    if follower.role != "follower" or follower.primary_id is None:
        raise FaultError(f"{follower.name} is a {follower.role} with no primary in the inventory; pause-replay "
                         "needs a follower (e.g. pg3b)")
    with psycopg.connect(ops_dsn) as conn:
        return get_resource(conn, int(follower.primary_id))


@register_fault("pause-replay", ("postgres",),
                "pause WAL replay on a follower (pg_wal_replay_pause) while a writer keeps its primary busy")
def pause_replay(ctx: FaultContext) -> FaultResult:
    res = ctx.resource
    primary = _primary_of(ctx.ops_dsn, res)
    seconds = float(ctx.options.get("seconds") or DEFAULT_WRITER_SECONDS)
    try:
        with psycopg.connect(_dsn(res.host, res.port), autocommit=True) as conn:
            if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:  # type: ignore[index]
                raise FaultError(f"{res.name} is not in recovery; there is no replay to pause")
            conn.execute("SELECT pg_wal_replay_pause()")
        pdsn = _dsn(primary.host, primary.port)
        _ensure_table(pdsn)
        with psycopg.connect(pdsn, autocommit=True) as conn:
            conn.execute(f"INSERT INTO {CHAOS_TABLE} (source, payload) VALUES (%s, 'first write after pause')",
                         (f"pause-replay {res.name}",))
    except psycopg.Error as exc:
        raise FaultError(f"pause-replay on {res.name}: {exc}".strip()) from exc
    writer = BackgroundProcess(
        writer_for(res).name,
        [sys.executable, "-c",
         "import sys; from fleetmedic.localfleet.faults.replication import run_writer; "
         "run_writer(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), 0.25, sys.argv[4])",
         primary.host, str(primary.port), str(seconds), f"pause-replay {res.name}"],
        writer_for(res).run_dir,
    )
    writer.stop(timeout=5)
    pid = writer.start()
    return FaultResult(
        f"paused WAL replay on {res.name}; a writer (pid {pid}) inserts into {primary.name}.{CHAOS_TABLE} "
        f"4 times a second for {seconds:.0f}s, so {res.name} falls further behind",
        f"fleetmedic chaos resume-replay {res.name}",
        {"writer_pid": pid, "primary": primary.name, "writer_log": str(writer.logfile)},
    )


@register_fault("resume-replay", ("postgres",), "undo pause-replay: resume WAL replay and stop the writer")
def resume_replay(ctx: FaultContext) -> FaultResult:
    res = ctx.resource
    stopped = writer_for(res).stop(timeout=5)
    try:
        with psycopg.connect(_dsn(res.host, res.port), autocommit=True) as conn:
            if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:  # type: ignore[index]
                conn.execute("SELECT pg_wal_replay_resume()")
    except psycopg.Error as exc:
        raise FaultError(f"resume-replay on {res.name}: {exc}".strip()) from exc
    return FaultResult(f"resumed WAL replay on {res.name}{'; stopped the writer' if stopped else ''}",
                       "(nothing to undo)")


@register_fault("age-backup", ("postgres",), "make the newest base backups of a primary older than their limit")
def age_backup(ctx: FaultContext) -> FaultResult:
    res = ctx.resource
    if res.role != "primary":
        raise FaultError(f"{res.name} is a {res.role}; base backups are taken of primaries (e.g. pg3a)")
    store = store_for_attrs(res.attrs)
    if store is None:
        raise FaultError(f"{res.name} has no local backup store (attrs.backup_store or a demo-fleet base_dir)")
    limit = max_backup_age(res.attrs)
    age = limit + timedelta(hours=1)
    aged = store.age_backups(res.name, age)
    newest = store.newest(res.name)
    if newest is None:
        raise FaultError(f"{res.name} has no complete base backup in {store.dir_for(res.name)} to age")
    hours = age.total_seconds() / 3600
    did = (f"moved the completion time of {len(aged)} base backup(s) of {res.name} back to {hours:g} h ago "
           f"(limit {limit.total_seconds() / 3600:g} h); the newest, {newest.path.name}, is now "
           f"{(newest.age() or timedelta()).total_seconds() / 3600:.1f} h old")
    return FaultResult(did, f"fleetmedic chaos restore-backup-age {res.name}  (or take a new base backup)",
                       {"aged": [str(b.path) for b in aged]})


@register_fault("restore-backup-age", ("postgres",), "undo age-backup: give the aged backups their real times back")
def restore_backup_age(ctx: FaultContext) -> FaultResult:
    res = ctx.resource
    store = store_for_attrs(res.attrs)
    if store is None:
        raise FaultError(f"{res.name} has no local backup store")
    restored = store.restore_ages(res.name)
    return FaultResult(f"restored the real completion time of {len(restored)} base backup(s) of {res.name}",
                       "(nothing to undo)")
