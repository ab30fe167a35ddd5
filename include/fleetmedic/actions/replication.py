"""Replication and backup actions: resume or restart a follower, rebuild it, take a base backup,
fail over to a follower, and the steps of a changeover (move a database to a new server).

Every action says what it did or why it did not act (Patroni style). Before anything that could
make two primaries, the old primary is fenced first: stopped, and given a standby.signal so that
whatever starts it later brings it up read-only, never as a second primary.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from fleetmedic.actions.base import ActionContext, ActionResult
from fleetmedic.actions.registry import ACTIONS, register_action
from fleetmedic.detection.probes.replication import lsn_to_int
from fleetmedic.inventory import Resource, get_resource, list_resources, upsert_server
from fleetmedic.localfleet.backups import BackupBusy, clone_follower, store_for_attrs
from fleetmedic.localfleet.fleet import cluster_for
from fleetmedic.localfleet.services import (
    PostgresCluster,
    ServiceError,
    _chown_tree,
    find_pg_bindir,
    free_port,
    pg_os_user,
    port_in_use,
)

__all__ = [
    "changeover_create_follower",
    "changeover_promote",
    "changeover_repoint",
    "changeover_retire",
    "promote_follower",
    "rebuild_follower",
    "redis_failover",
    "restart_follower",
    "resume_replay",
    "take_base_backup",
]

# How long a changeover keeps the moving database's alerts silenced (removed when it finishes).
CHANGEOVER_SILENCE = timedelta(minutes=10)


def _listen_port(conn: psycopg.Connection[Any]) -> int:
    """A free port for a new server, below the kernel's ephemeral range (a client socket that took
    a port from that range, even in TIME_WAIT, can make PostgreSQL's bind fail) and unused in the inventory."""
    import random

    taken = {int(r[0]) for r in conn.execute("SELECT port FROM resources WHERE port IS NOT NULL").fetchall()}
    for _ in range(500):
        port = random.randint(20000, 32000)
        if port not in taken and not port_in_use(port):
            return port
    return free_port()


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _connect(host: str, port: int, timeout: float = 5) -> psycopg.Connection[Any]:
    return psycopg.connect(host=host, port=port, user="postgres", dbname="postgres",
                           connect_timeout=max(1, int(timeout)), autocommit=True,
                           application_name="fleetmedic-action")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _not_local(res: Resource, action: str) -> ActionResult | None:
    provider = res.attrs.get("provider", "local")
    if provider != "local":
        return ActionResult(False, f"{action} supports the local provider only; {res.name} is on {provider}")
    return None


def _node_state(host: str, port: int, timeout: float = 5) -> dict[str, Any]:
    """What a PostgreSQL node says about itself; {'up': False, 'error': ...} when it does not answer."""
    try:
        with _connect(host, port, timeout) as conn:
            in_recovery = bool(conn.execute("SELECT pg_is_in_recovery()").fetchone()[0])  # type: ignore[index]
            if in_recovery:
                row = conn.execute(
                    "SELECT pg_last_wal_replay_lsn()::text, pg_last_wal_receive_lsn()::text, "
                    "pg_is_wal_replay_paused(), (SELECT status FROM pg_stat_wal_receiver)").fetchone()
                assert row is not None
                return {"up": True, "in_recovery": True, "replay_lsn": row[0], "receive_lsn": row[1],
                        "paused": bool(row[2]), "receiver": row[3]}
            row = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
            assert row is not None
            return {"up": True, "in_recovery": False, "lsn": row[0]}
    except psycopg.Error as exc:
        return {"up": False, "error": _first_line(exc)}


def _wait_for(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def _streaming(res_host: str, port: int) -> bool:
    st = _node_state(res_host, port, 3)
    return bool(st.get("up") and st.get("in_recovery") and st.get("receiver") == "streaming")


def _set_attrs(conn: psycopg.Connection[Any], resource_id: int, patch: dict[str, Any],
               drop: tuple[str, ...] = ()) -> None:
    conn.execute(
        "UPDATE resources SET attrs = (attrs - %s::text[]) || %s, updated_at = now() WHERE id = %s",
        (list(drop), Jsonb(patch), resource_id),
    )


def _followers_of(conn: psycopg.Connection[Any], primary: Resource) -> list[Resource]:
    return [r for r in list_resources(conn)
            if r.primary_id == primary.id and r.kind == "postgres" and r.enabled and r.id != primary.id]


def _repoint_follower(follower_port: int, host: str, port: int, follower_host: str = "127.0.0.1") -> str:
    """Point a running follower's primary_conninfo at host:port (reloaded: no restart needed)."""
    conninfo = f"host={host} port={port} user=postgres application_name=walreceiver"
    try:
        with _connect(follower_host, follower_port) as conn:
            conn.execute(f"ALTER SYSTEM SET primary_conninfo = '{conninfo}'")
            conn.execute("SELECT pg_reload_conf()")
    except psycopg.Error as exc:
        return f"could not repoint the follower on port {follower_port}: {_first_line(exc)}"
    return f"follower on port {follower_port} now streams from {host}:{port}"


def _fence(old: Resource) -> str:
    """Make sure the old primary cannot serve writes: stop it, and leave a standby.signal behind."""
    if old.attrs.get("provider", "local") != "local":
        return f"{old.name} is on provider {old.attrs.get('provider')}: fence it there (stop it) by hand"
    cluster = cluster_for(old.attrs, old.port)
    done = []
    if cluster.running():
        try:
            cluster.stop(mode="immediate", timeout=20)
            done.append("stopped it")
        except ServiceError:
            pid = cluster.kill()
            done.append(f"killed its postmaster {pid} (it did not stop)")
    if cluster.datadir.is_dir() and (cluster.datadir / "PG_VERSION").exists():
        signal = cluster.datadir / "standby.signal"
        signal.write_text("")
        _chown_tree(signal, pg_os_user())
        done.append("wrote standby.signal so it can only start read-only")
    else:
        done.append(f"its data directory {cluster.datadir} is gone")
    return f"fenced {old.name}: " + ", ".join(done)


def _start_backup(res: Resource, host: str, port: int) -> str:
    store = store_for_attrs(res.attrs)
    if store is None:
        return f"no backup store for {res.name}; take a base backup by hand"
    try:
        b = store.start(res.name, host, port)
    except BackupBusy as exc:
        return f"a base backup of {res.name} is already running (pid {exc.running.pid})"
    except (ServiceError, OSError) as exc:
        return f"could not start a base backup of {res.name}: {_first_line(exc)}"
    return f"started a base backup of {res.name} (pid {b.pid}, {b.path.name})"


# -- follower_behind ---------------------------------------------------------------------------


@register_action("postgres.resume_replay", "postgres", "resume paused WAL replay on a follower")
def resume_replay(ctx: ActionContext) -> ActionResult:
    """pg_wal_replay_resume() on a follower whose replay is paused; error if it is not paused."""
    res = ctx.resource
    if res.role != "follower":
        return ActionResult(False, f"{res.name} is a {res.role}, not a follower; only a follower replays WAL")
    st = _node_state(res.host, res.port)
    if not st["up"]:
        return ActionResult(False, f"cannot resume replay on {res.name}: it does not answer ({st['error']})")
    if not st["in_recovery"]:
        return ActionResult(False, f"{res.name} is not in recovery (promoted?); there is no replay to resume",
                            {"in_recovery": False})
    if not st["paused"]:
        return ActionResult(False, f"WAL replay on {res.name} is not paused (at {st['replay_lsn']}, "
                                   f"receiver {st['receiver'] or 'not running'}); nothing to resume",
                            {"paused": False, "replay_lsn": st["replay_lsn"]})
    try:
        with _connect(res.host, res.port) as conn:
            conn.execute("SELECT pg_wal_replay_resume()")
    except psycopg.Error as exc:
        return ActionResult(False, f"pg_wal_replay_resume() on {res.name} failed: {_first_line(exc)}")
    behind = lsn_to_int(st["receive_lsn"] or st["replay_lsn"]) - lsn_to_int(st["replay_lsn"])
    return ActionResult(True, f"resumed WAL replay on {res.name}: it was paused at {st['replay_lsn']} with "
                              f"{max(0, behind)} bytes received and not yet replayed",
                        {"paused_at": st["replay_lsn"], "received_not_replayed": max(0, behind)})


@register_action("postgres.restart_follower", "postgres", "restart a follower (pg_ctl stop -m fast, then start)")
def restart_follower(ctx: ActionContext) -> ActionResult:
    res = ctx.resource
    if (refused := _not_local(res, "postgres.restart_follower")) is not None:
        return refused
    if res.role != "follower":
        return ActionResult(False, f"{res.name} is a {res.role}; postgres.restart_follower restarts followers only")
    cluster = cluster_for(res.attrs, res.port)
    if not cluster.initialized():
        return ActionResult(False, f"cannot restart {res.name}: its data directory {cluster.datadir} is missing "
                                   "or empty; rebuild the follower instead")
    st = _node_state(res.host, res.port, 3)
    if st.get("up") and not st.get("in_recovery"):
        return ActionResult(False, f"refusing to restart {res.name} as a follower: it is not in recovery and may "
                                   "have taken writes as a primary; a human must decide")
    try:
        was_running = cluster.stop(mode="fast")
        cluster.start(timeout=60)
    except ServiceError as exc:
        return ActionResult(False, f"restart of follower {res.name} failed: {_first_line(exc)}")
    streaming = _wait_for(lambda: _streaming(res.host, res.port), 15, 0.5)
    after = _node_state(res.host, res.port)
    how = "restarted" if was_running else "started (it was not running)"
    receiver = "streaming" if streaming else f"{after.get('receiver') or 'not streaming'} ({_log_problem(cluster)})"
    return ActionResult(True, f"{how} follower {res.name} on port {res.port}; replay at "
                              f"{after.get('replay_lsn')}, WAL receiver {receiver}",
                        {"restarted": was_running, "streaming": streaming})


def _log_problem(cluster: PostgresCluster) -> str:
    """The server log's latest error line, for a reason string."""
    try:
        lines = cluster.logfile.read_text(errors="replace").splitlines()[-50:]
    except OSError:
        return f"no log at {cluster.logfile}"
    for line in reversed(lines):
        if "FATAL" in line or "ERROR" in line:
            return f"last error in its log: {line.strip()[:200]}"
    return "no error in its log"


@register_action("postgres.rebuild_follower", "postgres",
                 "rebuild a follower from a fresh base backup of its current primary")
def rebuild_follower(ctx: ActionContext) -> ActionResult:
    """Move the follower's data directory aside, pg_basebackup the primary into a new one, start it."""
    res = ctx.resource
    if (refused := _not_local(res, "postgres.rebuild_follower")) is not None:
        return refused
    if res.role != "follower":
        return ActionResult(False, f"{res.name} is a {res.role}; only a follower is rebuilt from its primary")
    if res.primary_id is None:
        return ActionResult(False, f"{res.name} has no primary in the inventory (primary_id is empty); "
                                   "set it before rebuilding")
    with psycopg.connect(ctx.ops_dsn) as conn:
        primary = get_resource(conn, int(res.primary_id))
    pst = _node_state(primary.host, primary.port)
    if not pst["up"] or pst["in_recovery"]:
        why = pst.get("error") or "it is in recovery, not a primary"
        return ActionResult(False, f"cannot rebuild {res.name} from {primary.name} ({primary.host}:{primary.port}): "
                                   f"{why}")
    st = _node_state(res.host, res.port, 3)
    if st.get("up") and not st.get("in_recovery"):
        return ActionResult(False, f"refusing to rebuild {res.name}: it is not in recovery and may have taken "
                                   "writes as a primary; a human must decide what its data is worth")
    cluster = cluster_for(res.attrs, res.port)
    started = time.monotonic()
    try:
        cluster.stop(mode="immediate", timeout=30)
    except ServiceError as exc:
        return ActionResult(False, f"cannot rebuild {res.name}: it would not stop ({_first_line(exc)})")
    aside = cluster.base_dir / f"data.before-rebuild-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    had_data = cluster.datadir.exists()
    if had_data:
        cluster.datadir.rename(aside)
    try:
        clone_follower(primary.host, primary.port, cluster.base_dir, res.port)
        cluster.start(timeout=60)
    except ServiceError as exc:
        shutil.rmtree(cluster.datadir, ignore_errors=True)
        restored = ""
        if had_data:
            aside.rename(cluster.datadir)
            try:
                cluster.start(timeout=60)
                restored = "; put the old data directory back and started it"
            except ServiceError:
                restored = "; put the old data directory back (it does not start either)"
        return ActionResult(False, f"rebuild of {res.name} from {primary.name} failed: {_first_line(exc)}{restored}")
    streaming = _wait_for(lambda: _streaming(res.host, res.port), 20, 0.5)
    if had_data:
        shutil.rmtree(aside, ignore_errors=True)
    note = ""
    if res.attrs.get("fenced"):
        with psycopg.connect(ctx.ops_dsn) as conn:
            _set_attrs(conn, res.id, {"rebuilt_at": _now()}, drop=("fenced",))
            conn.execute("UPDATE resources SET enabled = true, updated_at = now() WHERE id = %s", (res.id,))
        note = "; it was a fenced former primary and is back in service as a follower"
    return ActionResult(
        streaming,
        f"rebuilt {res.name} from a fresh base backup of {primary.name} in {time.monotonic() - started:.0f}s; "
        f"{'streaming' if streaming else 'but its WAL receiver is not streaming yet'}{note}",
        {"primary": primary.name, "streaming": streaming},
    )


# -- old_base_backup ---------------------------------------------------------------------------


@register_action("postgres.take_base_backup", "postgres",
                 "take a base backup of a primary into the backup store (in the background unless params.wait)")
def take_base_backup(ctx: ActionContext) -> ActionResult:
    res = ctx.resource
    if res.role != "primary":
        return ActionResult(False, f"{res.name} is a {res.role}; base backups are taken of primaries")
    store = store_for_attrs(res.attrs) if res.attrs.get("provider", "local") == "local" else None
    if store is None:
        return ActionResult(False, f"{res.name} has no backup store (attrs.backup_store, or a demo-fleet base_dir)")
    st = _node_state(res.host, res.port)
    if not st["up"]:
        return ActionResult(False, f"cannot back up {res.name}: it does not answer ({st['error']})")
    try:
        if ctx.params.get("wait"):
            started = time.monotonic()
            b = store.take(res.name, res.host, res.port)
            return ActionResult(True, f"took a base backup of {res.name} in {time.monotonic() - started:.1f}s: "
                                      f"{b.path} ({b.bytes} bytes)", {"backup": str(b.path)})
        b = store.start(res.name, res.host, res.port)
    except BackupBusy as exc:
        return ActionResult(True, f"a base backup of {res.name} is already running (pid {exc.running.pid}, since "
                                  f"{exc.running.started_at:%H:%M:%S} UTC); waiting for it",
                            {"backup": str(exc.running.path), "pid": exc.running.pid})
    except ServiceError as exc:
        return ActionResult(False, _first_line(exc))
    return ActionResult(True, f"started a base backup of {res.name} into {b.path.parent} (pid {b.pid}); "
                              "the incident waits for postgres.base_backup_age to pass",
                        {"backup": str(b.path), "pid": b.pid})


# -- failover ----------------------------------------------------------------------------------


def _pick_candidate(followers: list[Resource]) -> tuple[Resource | None, dict[str, Any], list[str]]:
    """The follower with the most WAL (received or replayed) among those that answer and are in recovery."""
    best: tuple[int, Resource, dict[str, Any]] | None = None
    notes = []
    for f in followers:
        st = _node_state(f.host, f.port, 3)
        if not st["up"]:
            notes.append(f"{f.name} does not answer ({st['error']})")
            continue
        if not st["in_recovery"]:
            notes.append(f"{f.name} is not in recovery")
            continue
        pos = max(lsn_to_int(st["replay_lsn"] or "0/0"), lsn_to_int(st["receive_lsn"] or "0/0"))
        if best is None or pos > best[0]:
            best = (pos, f, st)
    return (best[1], best[2], notes) if best else (None, {}, notes)


def _promote(host: str, port: int) -> str | None:
    """Promote and check it takes writes; None on success, else why not."""
    try:
        with _connect(host, port, 10) as conn:
            if conn.execute("SELECT pg_is_wal_replay_paused()").fetchone()[0]:  # type: ignore[index]
                conn.execute("SELECT pg_wal_replay_resume()")  # replay what it received before promoting
            ok = conn.execute("SELECT pg_promote(true, 60)").fetchone()[0]  # type: ignore[index]
            if not ok:
                return "pg_promote() did not finish within 60s"
            in_recovery, _ = conn.execute("SELECT pg_is_in_recovery(), txid_current()").fetchone()  # type: ignore[misc]
            if in_recovery:
                return "it is still in recovery after pg_promote()"
    except psycopg.Error as exc:
        return _first_line(exc)
    return None


@register_action("postgres.promote_follower", "postgres",
                 "fail over: fence the primary, promote its best follower, repoint the inventory")
def promote_follower(ctx: ActionContext) -> ActionResult:
    old = ctx.resource
    if old.role != "primary":
        return ActionResult(False, f"{old.name} is a {old.role}; failover promotes a primary's follower "
                                   "(restart or rebuild this one instead)")
    ost = _node_state(old.host, old.port, 3)
    if ost["up"] and not ost["in_recovery"]:
        return ActionResult(False, f"refusing to fail over {old.name}: it still answers as a primary at "
                                   f"{old.host}:{old.port}; promoting a follower now would make two primaries")
    with psycopg.connect(ctx.ops_dsn) as conn:
        followers = _followers_of(conn, old)
    if not followers:
        return ActionResult(False, f"{old.name} has no follower in the inventory to promote")
    new, st, notes = _pick_candidate(followers)
    if new is None:
        return ActionResult(False, f"no follower of {old.name} can be promoted: {'; '.join(notes)}")
    # Fence before promoting (take the lock before acting): whatever happens next, no two primaries.
    fenced = _fence(old)
    if (why := _promote(new.host, new.port)) is not None:
        return ActionResult(False, f"{fenced}; promoting {new.name} failed: {why}",
                            {"candidate": new.name, "fenced": old.name})
    repointed = []
    with psycopg.connect(ctx.ops_dsn) as conn:
        others = [f for f in _followers_of(conn, old) if f.id != new.id]
        conn.execute("UPDATE resources SET role = 'primary', primary_id = NULL, updated_at = now() WHERE id = %s",
                     (new.id,))
        _set_attrs(conn, new.id, {"promoted": {"at": _now(), "from": old.name, "incident_id": ctx.incident_id}})
        conn.execute("UPDATE resources SET role = 'follower', primary_id = %s, enabled = false, updated_at = now() "
                     "WHERE id = %s", (new.id, old.id))
        _set_attrs(conn, old.id, {"fenced": {"at": _now(), "by_incident": ctx.incident_id, "new_primary": new.name,
                                             "how": fenced}})
        for f in others:
            conn.execute("UPDATE resources SET primary_id = %s, updated_at = now() WHERE id = %s", (new.id, f.id))
    for f in others:
        repointed.append(f"{f.name}: {_repoint_follower(f.port, new.host, new.port, f.host)}")
    backup = _start_backup(new, new.host, new.port)
    skipped = f"; skipped: {'; '.join(notes)}" if notes else ""
    reason = (f"promoted {new.name} ({new.host}:{new.port}, had WAL up to {st.get('receive_lsn') or st.get('replay_lsn')}) "
              f"to primary in place of {old.name}; {fenced}; inventory: {new.name} is the primary, {old.name} is a "
              f"disabled follower to rebuild{skipped}"
              + (f"; repointed {'; '.join(repointed)}" if repointed else "") + f"; {backup}")
    return ActionResult(True, reason, {"promoted": new.name, "fenced": old.name,
                                       "repointed": [f.name for f in others]})


@register_action("postgres.failover", "postgres", "the kind-specific failover of resource.failover")
def postgres_failover(ctx: ActionContext) -> ActionResult:
    return promote_follower(ctx)


@register_action("redis.failover", "redis", "not automated: always declines, so the playbook escalates")
def redis_failover(ctx: ActionContext) -> ActionResult:
    res = ctx.resource
    return ActionResult(False, f"Redis failover is not automated: promote a replica of {res.name} by hand "
                               "(REPLICAOF NO ONE), repoint its clients and the inventory; escalating")


@register_action("resource.failover", "resource", "fail over to a follower, whatever the database kind")
def resource_failover(ctx: ActionContext) -> ActionResult:
    name = f"{ctx.resource.kind}.failover"
    spec = ACTIONS.get(name)
    if spec is None:
        return ActionResult(False, f"no failover for a {ctx.resource.kind} resource ({name} is not an action)")
    return spec.fn(ctx)


# -- changeover: move a database to a new server -----------------------------------------------


def _plan(res: Resource) -> dict[str, Any]:
    return dict(res.attrs.get("changeover") or {})


def _next_server_name(conn: psycopg.Connection[Any], servers_dir: Path, base: str) -> str:
    taken = {r[0] for r in conn.execute("SELECT name FROM servers WHERE name LIKE %s", (f"{base}-%",)).fetchall()}
    k = 2
    while f"{base}-{k}" in taken or (servers_dir / f"{base}-{k}").exists():
        k += 1
    return f"{base}-{k}"


@register_action("postgres.changeover_create_follower", "postgres",
                 "changeover: create a follower of the primary on a new local server")
def changeover_create_follower(ctx: ActionContext) -> ActionResult:
    res = ctx.resource
    if (refused := _not_local(res, "changeover")) is not None:
        return refused
    if res.role != "primary":
        return ActionResult(False, f"{res.name} is a {res.role}; a changeover moves a primary (fail over or "
                                   "rebuild followers instead)")
    plan = _plan(res)
    if plan:
        if plan.get("incident_id") != ctx.incident_id:
            return ActionResult(False, f"another changeover of {res.name} (incident {plan.get('incident_id')}) is "
                                       "in progress; finish or undo it first")
        new = plan["new"]
        cluster = PostgresCluster(Path(new["base_dir"]), int(new["port"]))
        if cluster.initialized():
            cluster.start()
            return ActionResult(True, f"the changeover follower of {res.name} on {new['server']} (port {new['port']}) "
                                      "already exists; started it", {"server": new["server"], "port": new["port"]})
    if not res.attrs.get("base_dir"):
        return ActionResult(False, f"{res.name} has no attrs.base_dir: it is not a local demo-fleet database, and "
                                   "a changeover places the new server next to the old one")
    pst = _node_state(res.host, res.port)
    if not pst["up"] or pst["in_recovery"]:
        return ActionResult(False, f"cannot change over {res.name}: {pst.get('error') or 'it is not a primary'}")
    servers_dir = Path(res.attrs["base_dir"]).parents[1]
    started = time.monotonic()
    with psycopg.connect(ctx.ops_dsn) as conn:
        current = res.server.name if res.server else f"srv-{res.name}"
        server = _next_server_name(conn, servers_dir, re.sub(r"-\d+$", "", current))
        sdir = servers_dir / server
        sdir.mkdir(parents=True, exist_ok=False)
        (sdir / "console.log").write_text(f"[    0.000000] fleetmedic local server {server} booted\n")
        server_id = upsert_server(conn, name=server, provider="local", address=server,
                                  attrs={"dir": str(sdir), "console_log": str(sdir / "console.log")})
        conn.commit()
        port = _listen_port(conn)
        base_dir = sdir / res.name
        try:
            clone_follower(res.host, res.port, base_dir, port)
            PostgresCluster(base_dir, port).start(timeout=60)
        except ServiceError as exc:
            PostgresCluster(base_dir, port).stop(mode="immediate")
            shutil.rmtree(sdir, ignore_errors=True)
            conn.execute("DELETE FROM servers WHERE id = %s", (server_id,))
            return ActionResult(False, f"could not create a follower of {res.name} on {server} (removed it again): "
                                       f"{_first_line(exc)}")
        plan = {
            "incident_id": ctx.incident_id, "started_at": _now(),
            "old": {"server_id": res.server_id, "server": res.server.name if res.server else None,
                    "host": res.host, "port": res.port, "base_dir": res.attrs.get("base_dir")},
            "new": {"server_id": server_id, "server": server, "host": "127.0.0.1", "port": port,
                    "base_dir": str(base_dir)},
        }
        _set_attrs(conn, res.id, {"changeover": plan})
    return ActionResult(True, f"created a follower of {res.name} on new server {server} (127.0.0.1:{port}) from a "
                              f"fresh base backup in {time.monotonic() - started:.1f}s",
                        {"server": server, "port": port})


def _latest_checkpoint(datadir: Path) -> str | None:
    res = subprocess.run([str(find_pg_bindir() / "pg_controldata"), "-D", str(datadir)], capture_output=True,
                         text=True, check=False)
    for line in res.stdout.splitlines():
        if line.startswith("Latest checkpoint location:"):
            return line.split(":", 1)[1].strip()
    return None


@register_action("postgres.changeover_promote", "postgres",
                 "changeover: stop the old primary cleanly, let the new follower replay its last WAL, promote it")
def changeover_promote(ctx: ActionContext) -> ActionResult:
    res = ctx.resource
    plan = _plan(res)
    if not plan.get("new"):
        return ActionResult(False, f"{res.name} has no changeover in progress (create the follower first)")
    new = plan["new"]
    if plan.get("promoted_at"):
        return ActionResult(True, f"the new server {new['server']} was already promoted at {plan['promoted_at']}")
    nst = _node_state(new["host"], int(new["port"]))
    if not nst["up"] or not nst["in_recovery"]:
        return ActionResult(False, f"the changeover follower on {new['server']} is not a running follower "
                                   f"({nst.get('error') or 'not in recovery'}); nothing was changed")
    old = cluster_for(res.attrs, res.port)
    with psycopg.connect(ctx.ops_dsn) as conn:
        row = conn.execute(
            "INSERT INTO silences (resource_id, type, ends_at, reason, created_by) "
            "VALUES (%s, NULL, now() + %s, %s, %s) RETURNING id",
            (res.id, CHANGEOVER_SILENCE, f"changeover of {res.name} to {new['server']} (incident {ctx.incident_id})",
             "automation:playbook_changeover"),
        ).fetchone()
        silence_id = int(row[0]) if row else None
    # A clean (fast) shutdown sends every WAL record, up to the shutdown checkpoint, to connected followers.
    try:
        old.stop(mode="fast", timeout=60)
    except ServiceError as exc:
        _remove_silence(ctx.ops_dsn, silence_id)
        return ActionResult(False, f"could not stop the old primary {res.name}: {_first_line(exc)}; nothing changed")
    final = _latest_checkpoint(old.datadir)

    def replayed_all() -> bool:
        st = _node_state(new["host"], int(new["port"]), 3)
        return bool(st.get("up") and final and lsn_to_int(st["replay_lsn"] or "0/0") > lsn_to_int(final))

    if final is None or not _wait_for(replayed_all, 60, 0.2):
        try:
            old.start(timeout=60)
            back = f"started {res.name} again on its old server"
        except ServiceError as exc:
            back = f"could not start {res.name} again: {_first_line(exc)}"
        _remove_silence(ctx.ops_dsn, silence_id)
        return ActionResult(False, f"the new server {new['server']} did not replay the old primary's final WAL "
                                   f"(shutdown checkpoint {final}) within 60s; not promoted; {back}")
    if (why := _promote(new["host"], int(new["port"]))) is not None:
        try:
            old.start(timeout=60)
            back = f"started {res.name} again on its old server"
        except ServiceError as exc:
            back = f"could not start {res.name} again: {_first_line(exc)}"
        _remove_silence(ctx.ops_dsn, silence_id)
        return ActionResult(False, f"promoting the new server {new['server']} failed: {why}; {back}")
    signal = old.datadir / "standby.signal"
    signal.write_text("")
    _chown_tree(signal, pg_os_user())
    plan.update({"promoted_at": _now(), "final_lsn": final, "silence_id": silence_id})
    with psycopg.connect(ctx.ops_dsn) as conn:
        _set_attrs(conn, res.id, {"changeover": plan})
    return ActionResult(True, f"stopped the old primary {res.name} cleanly (final checkpoint {final}), the new server "
                              f"{new['server']} replayed all of it and was promoted; the old data directory is "
                              "fenced with standby.signal", {"final_lsn": final})


def _remove_silence(ops_dsn: str, silence_id: int | None) -> None:
    if silence_id is None:
        return
    with psycopg.connect(ops_dsn) as conn:
        conn.execute("UPDATE silences SET removed_at = now() WHERE id = %s AND removed_at IS NULL", (silence_id,))


@register_action("postgres.changeover_repoint", "postgres",
                 "changeover: point the inventory (and the database's followers) at the new server")
def changeover_repoint(ctx: ActionContext) -> ActionResult:
    res = ctx.resource
    plan = _plan(res)
    if not plan.get("promoted_at"):
        return ActionResult(False, f"{res.name}'s changeover has not promoted the new server yet; nothing repointed")
    new = plan["new"]
    if plan.get("repointed_at"):
        return ActionResult(True, f"{res.name} already points at {new['server']} (since {plan['repointed_at']})")
    plan["repointed_at"] = _now()
    with psycopg.connect(ctx.ops_dsn) as conn:
        followers = _followers_of(conn, res)
        conn.execute("UPDATE resources SET server_id = %s, host = %s, port = %s, updated_at = now() WHERE id = %s",
                     (new["server_id"], new["host"], int(new["port"]), res.id))
        _set_attrs(conn, res.id, {"base_dir": new["base_dir"], "changeover": plan})
    notes = [f"{f.name}: {_repoint_follower(f.port, new['host'], int(new['port']), f.host)}" for f in followers]
    return ActionResult(True, f"{res.name} now points at {new['server']} ({new['host']}:{new['port']}) in the "
                              f"inventory" + (f"; followers: {'; '.join(notes)}" if notes else "; it has no followers"),
                        {"server": new["server"], "port": new["port"], "followers": [f.name for f in followers]})


@register_action("postgres.changeover_retire", "postgres",
                 "changeover: retire the old server (stopped, fenced, marked retired) and end the silence")
def changeover_retire(ctx: ActionContext) -> ActionResult:
    res = ctx.resource
    plan = _plan(res)
    if not plan.get("repointed_at"):
        return ActionResult(False, f"{res.name}'s changeover has not repointed the inventory yet; nothing retired")
    old = plan["old"]
    old_cluster = PostgresCluster(Path(old["base_dir"]), int(old["port"]))
    stopped = old_cluster.stop(mode="fast")
    with psycopg.connect(ctx.ops_dsn) as conn:
        others = conn.execute(
            "SELECT name FROM resources WHERE server_id = %s AND enabled AND kind <> 'server' AND id <> %s",
            (old["server_id"], res.id)).fetchall() if old.get("server_id") else []
        if old.get("server_id") and not others:
            conn.execute("UPDATE servers SET state = 'retired', attrs = attrs || %s, updated_at = now() WHERE id = %s",
                         (Jsonb({"retired": {"at": _now(), "by_incident": ctx.incident_id,
                                             "successor": plan["new"]["server"]}}), old["server_id"]))
            conn.execute("UPDATE resources SET enabled = false, updated_at = now() "
                         "WHERE server_id = %s AND kind = 'server'", (old["server_id"],))
        history = list(res.attrs.get("changeovers") or [])
        history.append({**plan, "retired_at": _now()})
        _set_attrs(conn, res.id, {"changeovers": history}, drop=("changeover",))
    _remove_silence(ctx.ops_dsn, plan.get("silence_id"))
    server = old.get("server") or "the old server"
    if others:
        what = (f"left {server} in service: it still hosts {', '.join(r[0] for r in others)}; the old instance "
                f"of {res.name} there is stopped and fenced")
    else:
        what = f"retired {server} (marked retired, its old instance of {res.name} {'stopped' if stopped else 'already stopped'} and fenced)"
    return ActionResult(True, f"{what}; data kept in {old['base_dir']} for a human to delete; silence ended",
                        {"retired": None if others else server})
