"""The demo fleet: real PostgreSQL primary/follower pairs and Redis pairs on loopback, in the inventory.

Each instance lives on its own local "server" (a directory holding its processes' state and a
console log); a primary is never on its follower's server.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from fleetmedic.cloud.local import LocalServer
from fleetmedic.inventory import upsert_resource, upsert_server, upsert_server_resource
from fleetmedic.localfleet.services import (
    PostgresCluster,
    RedisServer,
    ServiceError,
    _as_user,
    _chown_tree,
    _ensure_traversable,
    find_pg_bindir,
    pg_os_user,
)

__all__ = ["DemoFleet", "FleetMember", "cluster_for", "redis_for"]


@dataclass(frozen=True)
class FleetMember:
    name: str  # resource name
    kind: str  # postgres | redis
    role: str  # primary | follower
    server: str
    port: int
    base_dir: Path
    primary: str | None = None

    @property
    def attrs(self) -> dict[str, Any]:
        return {"provider": "local", "base_dir": str(self.base_dir), "user": "postgres", "dbname": "postgres"}


def cluster_for(attrs: dict[str, Any], port: int) -> PostgresCluster:
    """The local PostgresCluster behind an inventory resource (attrs written by the demo fleet)."""
    base = attrs.get("base_dir")
    if not base:
        raise ServiceError("resource has no attrs.base_dir: it is not a local demo-fleet PostgreSQL")
    return PostgresCluster(Path(base), port)


def redis_for(attrs: dict[str, Any], port: int) -> RedisServer:
    base = attrs.get("base_dir")
    if not base:
        raise ServiceError("resource has no attrs.base_dir: it is not a local demo-fleet Redis")
    return RedisServer(Path(base), port, extra_args=tuple(attrs.get("redis_args", ())))


class DemoFleet:
    """`pairs` PostgreSQL primary/follower pairs and `redis_pairs` Redis primary/replica pairs."""

    def __init__(self, home: Path, *, pairs: int = 2, redis_pairs: int = 1, base_port: int = 15500,
                 followers: bool = True):
        self.home = Path(home).absolute()
        self.pairs = pairs
        self.redis_pairs = redis_pairs
        self.base_port = base_port
        self.followers = followers

    @property
    def servers_dir(self) -> Path:
        return self.home / "servers"

    def members(self) -> list[FleetMember]:
        out: list[FleetMember] = []
        for k in range(1, self.pairs + 1):
            port = self.base_port + 2 * (k - 1)
            out.append(FleetMember(f"pg{k}a", "postgres", "primary", f"srv-pg{k}a", port,
                                   self.servers_dir / f"srv-pg{k}a" / f"pg{k}a"))
            if self.followers:
                out.append(FleetMember(f"pg{k}b", "postgres", "follower", f"srv-pg{k}b", port + 1,
                                       self.servers_dir / f"srv-pg{k}b" / f"pg{k}b", primary=f"pg{k}a"))
        for k in range(1, self.redis_pairs + 1):
            port = self.base_port + 100 + 2 * (k - 1)
            out.append(FleetMember(f"redis{k}a", "redis", "primary", f"srv-redis{k}a", port,
                                   self.servers_dir / f"srv-redis{k}a" / f"redis{k}a"))
            if self.followers:
                out.append(FleetMember(f"redis{k}b", "redis", "follower", f"srv-redis{k}b", port + 1,
                                       self.servers_dir / f"srv-redis{k}b" / f"redis{k}b", primary=f"redis{k}a"))
        return out

    def _by_name(self) -> dict[str, FleetMember]:
        return {m.name: m for m in self.members()}

    def up(self, ops_dsn: str | None = None, progress=print) -> list[FleetMember]:
        """Start every member (creating followers with pg_basebackup) and register the inventory."""
        members = self.members()
        by_name = self._by_name()
        for m in members:
            (self.servers_dir / m.server).mkdir(parents=True, exist_ok=True)
            console = self.servers_dir / m.server / "console.log"
            if not console.exists():
                console.write_text(f"[    0.000000] fleetmedic local server {m.server} booted\n")
            args: tuple[str, ...] = ()
            if m.kind == "postgres":
                cluster = PostgresCluster(m.base_dir, m.port)
                if m.role == "follower" and not cluster.initialized():
                    assert m.primary is not None
                    self._make_follower(by_name[m.primary], m, progress)
                progress(f"  postgres {m.name:<8} {m.role:<9} 127.0.0.1:{m.port}  server {m.server}")
                cluster.start()
            else:
                if m.role == "follower" and m.primary:
                    args = ("--replicaof", "127.0.0.1", str(by_name[m.primary].port))
                progress(f"  redis    {m.name:<8} {m.role:<9} 127.0.0.1:{m.port}  server {m.server}")
                RedisServer(m.base_dir, m.port, extra_args=args).start()
            # The local cloud stops and starts a server's instances together (stop-server, reboot).
            LocalServer(self.servers_dir / m.server, m.server).register_instance(m.name, m.kind, m.port, m.base_dir,
                                                                                 args)
        (self.home / "fleet.json").write_text(json.dumps(
            {"pairs": self.pairs, "redis_pairs": self.redis_pairs, "base_port": self.base_port,
             "followers": self.followers}, indent=2))
        self._replication_and_backups(members, progress)
        if ops_dsn:
            self.register(ops_dsn)
        return members

    def _replication_and_backups(self, members: list[FleetMember], progress) -> None:
        """Keep WAL for followers that reconnect, and take a first base backup of each primary that has none."""
        from fleetmedic.localfleet.backups import BackupStore, keep_wal_for_followers

        store = BackupStore(self.home / "backups")
        for m in members:
            if m.kind != "postgres":
                continue
            keep_wal_for_followers(PostgresCluster(m.base_dir, m.port))
            if m.role == "primary" and store.newest(m.name) is None:
                backup = store.take(m.name, "127.0.0.1", m.port)
                progress(f"  base backup of {m.name} -> {backup.path}")

    def _make_follower(self, primary: FleetMember, follower: FleetMember, progress) -> None:
        pcluster = PostgresCluster(primary.base_dir, primary.port)
        pcluster.start()
        progress(f"  creating follower {follower.name} of {primary.name} with pg_basebackup")
        base = follower.base_dir
        base.mkdir(parents=True, exist_ok=True)
        _ensure_traversable(base)
        user = pg_os_user()
        _chown_tree(base, user)
        datadir = base / "data"
        cmd = [str(find_pg_bindir() / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port),
               "-U", "postgres", "-D", str(datadir), "-R", "-X", "stream", "--checkpoint=fast"]
        res = subprocess.run(_as_user(cmd, user), capture_output=True, text=True, check=False, timeout=300)
        if res.returncode != 0:
            raise ServiceError(f"pg_basebackup for follower {follower.name} failed: {res.stderr.strip()}")
        PostgresCluster(base, follower.port).write_config()

    def register(self, ops_dsn: str) -> None:
        with psycopg.connect(ops_dsn) as conn:
            ids: dict[str, int] = {}
            for m in self.members():
                sid = upsert_server(
                    conn, name=m.server, provider="local", address=m.server,
                    attrs={"dir": str(self.servers_dir / m.server),
                           "console_log": str(self.servers_dir / m.server / "console.log")},
                )
                upsert_server_resource(conn, server_id=sid, name=m.server, host="127.0.0.1")
                primary_id = ids.get(m.primary) if m.primary else None
                existing = conn.execute("SELECT id, attrs FROM resources WHERE name = %s", (m.name,)).fetchone()
                if existing and {"fenced", "promoted", "changeovers"} & set(existing[1] or {}):
                    # Automation or an operator moved this database (failover, changeover): the
                    # inventory is the truth now, not the demo fleet's initial layout.
                    ids[m.name] = int(existing[0])
                    continue
                attrs = m.attrs
                if m.kind == "redis" and m.role == "follower" and m.primary:
                    # So a restart brings a replica back as a replica, not as a second primary.
                    attrs["redis_args"] = ["--replicaof", "127.0.0.1", str(self._by_name()[m.primary].port)]
                ids[m.name] = upsert_resource(
                    conn, name=m.name, kind=m.kind, role=m.role, host="127.0.0.1", port=m.port,
                    server_id=sid, primary_id=primary_id, attrs=attrs,
                )

    def down(self, progress=print) -> None:
        # Followers first so primaries do not wait on walsenders.
        for m in sorted(self.members(), key=lambda m: m.role != "follower"):
            if m.kind == "postgres":
                if PostgresCluster(m.base_dir, m.port).stop(mode="fast"):
                    progress(f"  stopped postgres {m.name}")
            elif RedisServer(m.base_dir, m.port).stop():
                progress(f"  stopped redis {m.name}")
        # Instances automation placed on new servers (a changeover) are not members: stop them too.
        for pidfile in sorted(self.servers_dir.glob("*/*/data/postmaster.pid")):
            if PostgresCluster(pidfile.parent.parent, 0).stop(mode="fast"):
                progress(f"  stopped postgres in {pidfile.parent}")

    @classmethod
    def from_home(cls, home: Path) -> DemoFleet:
        spec = json.loads((Path(home) / "fleet.json").read_text())
        return cls(home, **spec)
