"""The local backup store: base backups of each PostgreSQL primary, taken with pg_basebackup.

Layout (one directory per resource, one per backup, the metadata next to the data)::

    <fleet home>/backups/<resource>/<UTC timestamp>/          a complete backup
        backup.json, tar/ (base.tar, pg_wal.tar, backup_manifest: pg_basebackup -Ft output)
    <fleet home>/backups/<resource>/<UTC timestamp>.partial/  a backup still running (or one that died)
    <fleet home>/backups/<resource>/<UTC timestamp>.failed/   a backup that failed (kept for diagnosis)

A backup's age is `now - completed_at` from its backup.json. A backup is written to `.partial`
and renamed when pg_basebackup has finished, so a reader never sees half a backup as complete.
Only one backup per resource runs at a time (a lock file guards the check-and-start).

The same module clones followers (`clone_follower`): a fresh base backup of the primary written
straight into a new data directory with a recovery configuration.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fleetmedic.localfleet.services import (
    PostgresCluster,
    ServiceError,
    _as_user,
    _chown_tree,
    _ensure_traversable,
    _pid_alive,
    find_pg_bindir,
    pg_os_user,
)

__all__ = [
    "DEFAULT_KEEP",
    "BackupBusy",
    "BackupStore",
    "BaseBackup",
    "clone_follower",
    "keep_wal_for_followers",
    "store_for_attrs",
]

# Complete backups kept per resource; older ones are pruned after a new one completes.
DEFAULT_KEEP = 3
META = "backup.json"
_TS_FORMAT = "%Y%m%dT%H%M%S%fZ"


class BackupBusy(ServiceError):
    """A base backup of this resource is already running."""

    def __init__(self, running: BaseBackup):
        self.running = running
        super().__init__(
            f"a base backup of {running.resource} is already running (pid {running.pid}, started "
            f"{running.started_at:%Y-%m-%d %H:%M:%S} UTC, in {running.path}); wait for it to finish"
        )


def _now() -> datetime:
    return datetime.now(UTC)


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


@dataclass(frozen=True)
class BaseBackup:
    """One base backup in the store (complete, running or failed)."""

    resource: str
    path: Path
    status: str  # complete | running | failed
    started_at: datetime
    completed_at: datetime | None
    source: str
    bytes: int = 0
    pid: int | None = None
    error: str | None = None
    original_completed_at: datetime | None = None  # set when chaos aged it

    def age(self, now: datetime | None = None) -> timedelta | None:
        if self.completed_at is None:
            return None
        return (now or _now()) - self.completed_at

    def as_dict(self) -> dict[str, Any]:
        return {
            "resource": self.resource, "path": str(self.path), "status": self.status,
            "started_at": self.started_at.isoformat(),
            "completed_at": self.completed_at.isoformat() if self.completed_at else None,
            "source": self.source, "bytes": self.bytes, "pid": self.pid, "error": self.error,
            "original_completed_at": self.original_completed_at.isoformat() if self.original_completed_at else None,
        }

    @classmethod
    def read(cls, path: Path) -> BaseBackup | None:
        try:
            raw = json.loads((path / META).read_text())
        except (OSError, ValueError):
            return None
        started = _parse_time(raw.get("started_at"))
        if started is None:
            return None
        status = str(raw.get("status", "failed"))
        pid = raw.get("pid")
        if status == "running" and path.suffix == ".partial" and pid and not _pid_alive(int(pid)):
            status, raw["error"] = "failed", raw.get("error") or f"backup process {pid} died before finishing"
        return cls(
            resource=str(raw.get("resource", path.parent.name)), path=path, status=status, started_at=started,
            completed_at=_parse_time(raw.get("completed_at")), source=str(raw.get("source", "")),
            bytes=int(raw.get("bytes") or 0), pid=int(pid) if pid else None, error=raw.get("error"),
            original_completed_at=_parse_time(raw.get("original_completed_at")),
        )

    def write(self) -> None:
        tmp = self.path / (META + ".tmp")
        tmp.write_text(json.dumps(self.as_dict(), indent=2))
        os.replace(tmp, self.path / META)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class BackupStore:
    """Base backups under `root`, one subdirectory per resource."""

    def __init__(self, root: Path | str):
        self.root = Path(root).absolute()

    def __repr__(self) -> str:
        return f"BackupStore({str(self.root)!r})"

    def dir_for(self, resource: str) -> Path:
        if not resource or "/" in resource or resource.startswith("."):
            raise ValueError(f"{resource!r} is not a resource name usable as a backup directory")
        return self.root / resource

    # -- reading ---------------------------------------------------------------------------------

    def backups(self, resource: str) -> list[BaseBackup]:
        """Every backup of `resource` (complete, running, failed), newest start first."""
        base = self.dir_for(resource)
        if not base.is_dir():
            return []
        found = [b for p in base.iterdir() if p.is_dir() and (b := BaseBackup.read(p)) is not None]
        return sorted(found, key=lambda b: b.started_at, reverse=True)

    def complete(self, resource: str) -> list[BaseBackup]:
        """Complete backups, most recently completed first."""
        done = [b for b in self.backups(resource) if b.status == "complete" and b.completed_at is not None]
        return sorted(done, key=lambda b: b.completed_at or b.started_at, reverse=True)

    def newest(self, resource: str) -> BaseBackup | None:
        done = self.complete(resource)
        return done[0] if done else None

    def running(self, resource: str) -> BaseBackup | None:
        for b in self.backups(resource):
            if b.status == "running":
                return b
        return None

    # -- taking backups --------------------------------------------------------------------------

    @contextmanager
    def _locked(self, resource: str) -> Iterator[Path]:
        base = self.dir_for(resource)
        base.mkdir(parents=True, exist_ok=True)
        with open(base / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield base
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _begin(self, resource: str, host: str, port: int) -> BaseBackup:
        """Claim the resource's backup slot and create the `.partial` directory (under the lock)."""
        with self._locked(resource) as base:
            busy = self.running(resource)
            if busy is not None:
                raise BackupBusy(busy)
            started = _now()
            path = base / f"{started.strftime(_TS_FORMAT)}.partial"
            path.mkdir()
            backup = BaseBackup(resource, path, "running", started, None, f"{host}:{port}", pid=os.getpid())
            backup.write()
            return backup

    def take(self, resource: str, host: str, port: int, *, user: str = "postgres", keep: int = DEFAULT_KEEP,
             timeout: float = 900) -> BaseBackup:
        """Take a base backup now and wait for it; returns the complete backup (ServiceError if it failed)."""
        return self._run(self._begin(resource, host, port), host, port, user=user, keep=keep, timeout=timeout)

    def start(self, resource: str, host: str, port: int, *, user: str = "postgres",
              keep: int = DEFAULT_KEEP, timeout: float = 900) -> BaseBackup:
        """Start a base backup in a detached process (it outlives the caller); returns the running backup."""
        backup = self._begin(resource, host, port)
        log = open(backup.path / "backup.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            code = ("import sys; from fleetmedic.localfleet.backups import _finish_detached; "
                    "_finish_detached(*sys.argv[1:])")
            proc = subprocess.Popen(
                [sys.executable, "-c", code, str(self.root), str(backup.path), host, str(port), user, str(keep),
                 str(timeout)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        except OSError:
            shutil.rmtree(backup.path, ignore_errors=True)
            raise
        finally:
            log.close()
        running = replace(backup, pid=proc.pid)
        # The child records its own pid too; this write only closes the gap until it does.
        current = BaseBackup.read(backup.path) if backup.path.exists() else None
        if current is not None and current.status == "running" and current.pid in (os.getpid(), proc.pid):
            try:
                running.write()
            except OSError:
                pass  # the backup already finished and was renamed
        return running

    def _run(self, backup: BaseBackup, host: str, port: int, *, user: str, keep: int,
             timeout: float) -> BaseBackup:
        cmd = [str(find_pg_bindir() / "pg_basebackup"), "-h", host, "-p", str(port), "-U", user,
               "-D", str(backup.path / "tar"), "-Ft", "-X", "stream", "--checkpoint=fast",
               f"--label=fleetmedic {backup.resource} {backup.started_at:%Y-%m-%dT%H:%M:%SZ}"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
            error = None if res.returncode == 0 else (res.stderr.strip() or f"exit code {res.returncode}")
        except subprocess.TimeoutExpired:
            error = f"pg_basebackup did not finish within {timeout:.0f}s"
        except OSError as exc:
            error = f"could not run pg_basebackup: {exc}"
        if error is not None:
            failed = BaseBackup(backup.resource, backup.path, "failed", backup.started_at, None, backup.source,
                                pid=backup.pid, error=error)
            failed.write()
            final = backup.path.with_name(backup.path.name.replace(".partial", ".failed"))
            os.replace(backup.path, final)
            raise ServiceError(f"base backup of {backup.resource} from {host}:{port} failed: {error}")
        final = backup.path.with_name(backup.path.name.removesuffix(".partial"))
        done = BaseBackup(backup.resource, final, "complete", backup.started_at, _now(), backup.source,
                          bytes=_dir_bytes(backup.path), pid=None)
        # Write the metadata inside .partial, then rename: the rename is what makes it complete.
        replace(done, path=backup.path).write()
        os.replace(backup.path, final)
        self.prune(backup.resource, keep)
        return done

    def prune(self, resource: str, keep: int = DEFAULT_KEEP) -> list[Path]:
        """Remove complete backups beyond the newest `keep`, and failed ones older than a day."""
        removed = []
        for old in self.complete(resource)[max(1, keep):]:
            shutil.rmtree(old.path, ignore_errors=True)
            removed.append(old.path)
        day_ago = _now() - timedelta(days=1)
        for b in self.backups(resource):
            if b.status == "failed" and b.started_at < day_ago:
                shutil.rmtree(b.path, ignore_errors=True)
                removed.append(b.path)
        return removed

    # -- chaos: make backups look old, and undo it -----------------------------------------------

    def age_backups(self, resource: str, older_than: timedelta) -> list[BaseBackup]:
        """Move `completed_at` of every backup younger than `older_than` back to exactly that age.

        The original time is kept in `original_completed_at` so `restore_ages` can undo it.
        """
        when = _now() - older_than
        changed = []
        for b in self.complete(resource):
            if b.completed_at is not None and b.completed_at > when:
                aged = replace(b, completed_at=when,
                               original_completed_at=b.original_completed_at or b.completed_at)
                aged.write()
                os.utime(b.path, (when.timestamp(), when.timestamp()))
                changed.append(aged)
        return changed

    def restore_ages(self, resource: str) -> list[BaseBackup]:
        restored = []
        for b in self.complete(resource):
            if b.original_completed_at is not None:
                fixed = replace(b, completed_at=b.original_completed_at, original_completed_at=None)
                fixed.write()
                ts = b.original_completed_at.timestamp()
                os.utime(b.path, (ts, ts))
                restored.append(fixed)
        return restored


def _finish_detached(root: str, partial: str, host: str, port: str, user: str, keep: str, timeout: str) -> None:
    """Entry point of the detached backup process started by `BackupStore.start`."""
    store = BackupStore(root)
    backup = BaseBackup.read(Path(partial))
    if backup is None:
        raise SystemExit(f"no backup metadata in {partial}")
    backup = replace(backup, pid=os.getpid())
    backup.write()
    try:
        done = store._run(backup, host, int(port), user=user, keep=int(keep), timeout=float(timeout))
    except ServiceError as exc:
        print(exc, flush=True)
        raise SystemExit(1) from None
    print(f"base backup of {done.resource} complete: {done.path} ({done.bytes} bytes)", flush=True)


def store_for_attrs(attrs: dict[str, Any]) -> BackupStore | None:
    """The backup store of an inventory resource: attrs.backup_store, or the demo fleet's `<home>/backups`."""
    if attrs.get("backup_store"):
        return BackupStore(attrs["backup_store"])
    base = attrs.get("base_dir")
    if base:
        # Demo-fleet layout: <home>/servers/<server>/<resource>
        p = Path(base)
        if len(p.parents) >= 3 and p.parents[1].name == "servers":
            return BackupStore(p.parents[2] / "backups")
    return None


# WAL a server keeps for followers that reconnect (after a restart or a pause); without it a base
# backup's checkpoint can recycle a segment a follower still needs, and only a rebuild helps then.
WAL_KEEP_SIZE = "128MB"


def keep_wal_for_followers(cluster: PostgresCluster) -> None:
    """ALTER SYSTEM SET wal_keep_size (postgresql.auto.conf, which pg_basebackup copies to new followers)."""
    cluster.psql(f"ALTER SYSTEM SET wal_keep_size = '{WAL_KEEP_SIZE}'")
    cluster.psql("SELECT pg_reload_conf()")


def clone_follower(primary_host: str, primary_port: int, base_dir: Path, port: int, *,
                   timeout: float = 600) -> PostgresCluster:
    """A new follower in `base_dir` (data in base_dir/data) from a fresh base backup of the primary.

    pg_basebackup -R writes standby.signal and primary_conninfo; the follower's own settings (its
    port) are written afterwards, since the backup copies the primary's. The follower is not started.
    """
    base_dir = Path(base_dir).absolute()
    cluster = PostgresCluster(base_dir, port)
    if cluster.datadir.exists() and any(cluster.datadir.iterdir()):
        raise ServiceError(f"cannot clone a follower into {cluster.datadir}: it is not empty; move it aside first")
    base_dir.mkdir(parents=True, exist_ok=True)
    _ensure_traversable(base_dir)
    user = pg_os_user()
    _chown_tree(base_dir, user)
    cmd = [str(find_pg_bindir() / "pg_basebackup"), "-h", primary_host, "-p", str(primary_port),
           "-U", "postgres", "-D", str(cluster.datadir), "-R", "-X", "stream", "--checkpoint=fast"]
    started = time.monotonic()
    res = subprocess.run(_as_user(cmd, user), capture_output=True, text=True, check=False, timeout=timeout)
    if res.returncode != 0:
        shutil.rmtree(cluster.datadir, ignore_errors=True)
        raise ServiceError(
            f"pg_basebackup from {primary_host}:{primary_port} into {cluster.datadir} failed after "
            f"{time.monotonic() - started:.0f}s: {res.stderr.strip()}"
        )
    cluster.write_config()
    return cluster
