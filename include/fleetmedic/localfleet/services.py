"""Start and stop local PostgreSQL clusters, redis-server processes and background programs.

One module serves `make demo`, the demo fleet and the test fixtures. Everything is idempotent
(starting a running service is a no-op), waits for readiness, and fails with an error that says
what is wrong and how to fix it (port busy, binary missing, stale pid file).

PostgreSQL refuses to run as root, so when we are root its binaries run as an unprivileged OS
user (`postgres` by default, `FLEETMEDIC_PG_OS_USER` to change) on directories that user owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "BackgroundProcess",
    "PostgresCluster",
    "RedisServer",
    "ServiceError",
    "find_pg_bindir",
    "free_port",
    "free_port_block",
    "port_in_use",
]


class ServiceError(RuntimeError):
    """A local service could not be started, stopped or found; the message says how to fix it."""


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for tests and ad-hoc services).

    Chosen below the kernel's ephemeral range (see `free_port_block`), where client sockets cannot
    take it between now and the moment a server binds it.
    """
    import random

    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        if not port_in_use(port, host):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_port_block(size: int, low: int = 20000, high: int = 32000) -> int:
    """A base port with `size` consecutive ports free, below the kernel's ephemeral range.

    Ports in the ephemeral range (32768+ on Linux) can be taken by any client socket at any moment,
    and a server that loses its port to one cannot start: fleets of several servers take their
    ports from below it.
    """
    import random

    for _ in range(500):
        base = random.randint(low, high - size)
        if not any(port_in_use(base + i) for i in range(size)):
            return base
    raise ServiceError(f"no block of {size} free ports between {low} and {high}")


def find_pg_bindir() -> Path:
    """Directory holding initdb/pg_ctl/postgres; FLEETMEDIC_PG_BINDIR overrides the search."""
    override = os.environ.get("FLEETMEDIC_PG_BINDIR")
    if override:
        if not (Path(override) / "pg_ctl").exists():
            raise ServiceError(f"FLEETMEDIC_PG_BINDIR={override} has no pg_ctl; point it at PostgreSQL's bin dir")
        return Path(override)
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    for c in candidates:
        if (Path(c) / "postgres").exists() and (Path(c) / "initdb").exists():
            return Path(c)
    found = shutil.which("postgres")
    if found and shutil.which("initdb"):
        return Path(found).parent
    raise ServiceError(
        "PostgreSQL server binaries not found (looked in /usr/lib/postgresql/*/bin and PATH); "
        "install them with: apt-get install postgresql  (or run: make bootstrap)"
    )


def pg_os_user() -> str | None:
    """The OS user PostgreSQL runs as when we are root; None when we are not root."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("FLEETMEDIC_PG_OS_USER", "postgres")
    try:
        pwd.getpwnam(name)
    except KeyError as exc:
        raise ServiceError(
            f"running as root, PostgreSQL needs an unprivileged OS user '{name}', which does not exist; "
            f"create it with: useradd --system {name}  (or run: make bootstrap)"
        ) from exc
    return name


def _chown_tree(path: Path, user: str | None) -> None:
    if user is None:
        return
    pw = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, pw.pw_uid, pw.pw_gid)
        for name in dirs + files:
            os.lchown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)


def _ensure_traversable(path: Path) -> None:
    """Make every ancestor of `path` searchable by others, so the postgres user can reach it."""
    for parent in [path, *path.parents]:
        if str(parent) == "/":
            break
        mode = parent.stat().st_mode
        if not mode & 0o001:
            os.chmod(parent, mode | 0o001)


def service_env() -> dict[str, str]:
    """The environment for database servers we start: without Airflow's variables.

    A playbook task may restart a database; the server must not look like part of that task (nor of
    the local Airflow), or stopping Airflow would take the database down with it.
    """
    return {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}


def _as_user(cmd: Sequence[str], user: str | None) -> list[str]:
    if user is None:
        return list(cmd)
    return ["runuser", "-u", user, "--", *cmd]


def _pid_alive(pid: int) -> bool:
    """True if `pid` runs. An exited process that nobody reaped yet (a zombie) does not count: we
    reap it if it is our child, and otherwise look at its state (a reparented zombie can linger
    forever when PID 1 does not reap, as in some containers)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _wait(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@dataclass
class PostgresCluster:
    """A PostgreSQL cluster in `base_dir` (data in `base_dir/data`), listening on 127.0.0.1:`port` only.

    Authentication is `trust` for loopback: it is a local demo/test cluster, never exposed.
    """

    base_dir: Path
    port: int
    host: str = "127.0.0.1"
    superuser: str = "postgres"
    settings: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir).absolute()

    @property
    def datadir(self) -> Path:
        return self.base_dir / "data"

    @property
    def logfile(self) -> Path:
        return self.base_dir / "postgres.log"

    @property
    def pidfile(self) -> Path:
        return self.datadir / "postmaster.pid"

    def dsn(self, dbname: str = "postgres", user: str | None = None) -> str:
        return f"postgresql://{user or self.superuser}@{self.host}:{self.port}/{dbname}"

    def _pg(self, tool: str) -> str:
        return str(find_pg_bindir() / tool)

    def _run(self, cmd: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        # Own session, neutral cwd and env: a server started from an Airflow task outlives the task
        # and is not mistaken for one of Airflow's processes.
        return subprocess.run(
            _as_user(cmd, pg_os_user()), capture_output=True, text=True, timeout=timeout, check=False,
            start_new_session=True, cwd="/", env=service_env(),
        )

    def initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").exists()

    def init(self) -> bool:
        """initdb if the data directory is empty; returns True when it created a cluster."""
        if self.initialized():
            return False
        user = pg_os_user()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        _ensure_traversable(self.base_dir)
        self.datadir.mkdir(mode=0o700, exist_ok=True)
        _chown_tree(self.base_dir, user)
        res = self._run(
            [self._pg("initdb"), "-D", str(self.datadir), "-U", self.superuser, "--auth=trust",
             "--encoding=UTF8", "--no-instructions"]
        )
        if res.returncode != 0:
            raise ServiceError(f"initdb failed for {self.datadir}: {res.stderr.strip() or res.stdout.strip()}")
        self.write_config()
        return True

    def write_config(self) -> None:
        conf = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": "''",
            "wal_level": "replica",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            "hot_standby": "on",
            "fsync": "off" if os.environ.get("FLEETMEDIC_PG_FSYNC", "off") == "off" else "on",
            "shared_buffers": "32MB",
            "max_connections": "200",
            "logging_collector": "off",
            "log_line_prefix": "'%m [%p] '",
            **dict(self.settings),
        }
        lines = ["# written by fleetmedic; edits are overwritten"]
        lines += [f"{k} = {v}" for k, v in conf.items()]
        auto = self.datadir / "postgresql.fleetmedic.conf"
        auto.write_text("\n".join(lines) + "\n")
        main_conf = self.datadir / "postgresql.conf"
        text = main_conf.read_text()
        include = "include_if_exists = 'postgresql.fleetmedic.conf'"
        if include not in text:
            main_conf.write_text(text + "\n" + include + "\n")
        (self.datadir / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "host replication all 127.0.0.1/32 trust\n"
        )
        _chown_tree(self.base_dir, pg_os_user())

    def running(self) -> bool:
        if not self.pidfile.exists():
            return False
        try:
            pid = int(self.pidfile.read_text().splitlines()[0])
        except (ValueError, IndexError, OSError):
            return False
        return _pid_alive(pid)

    def ready(self) -> bool:
        res = subprocess.run(
            [self._pg("pg_isready"), "-h", self.host, "-p", str(self.port), "-t", "2"],
            capture_output=True, text=True, check=False,
        )
        return res.returncode == 0

    def start(self, timeout: float = 60) -> None:
        """Start (initdb first if needed) and wait until it accepts connections. No-op if running."""
        self.init()
        if self.running():
            if _wait(self.ready, timeout):
                return
            raise ServiceError(f"PostgreSQL in {self.datadir} is running but not ready on port {self.port}; see {self.logfile}")
        if self.pidfile.exists():
            # A stale pid file from a crash (kill -9): pg_ctl copes, but say so for the operator.
            print(f"note: removing stale pid file {self.pidfile}")
            self.pidfile.unlink()
        if port_in_use(self.port, self.host):
            raise ServiceError(
                f"cannot start PostgreSQL for {self.datadir}: port {self.port} on {self.host} is already in use "
                "by another process; stop it or choose another port"
            )
        res = self._run(
            [self._pg("pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile), "-w",
             "-t", str(int(timeout)), "start"],
            timeout=timeout + 10,
        )
        if res.returncode != 0:
            tail = ""
            if self.logfile.exists():
                tail = "\n".join(self.logfile.read_text(errors="replace").splitlines()[-8:])
            raise ServiceError(
                f"PostgreSQL in {self.datadir} failed to start on port {self.port}: "
                f"{res.stderr.strip() or res.stdout.strip()}\n--- last lines of {self.logfile} ---\n{tail}"
            )
        if not _wait(self.ready, timeout):
            raise ServiceError(f"PostgreSQL on port {self.port} did not become ready in {timeout}s; see {self.logfile}")

    def stop(self, mode: str = "fast", timeout: float = 60) -> bool:
        """Stop if running; returns True when it stopped something."""
        if not self.running():
            return False
        res = self._run(
            [self._pg("pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "-t", str(int(timeout)), "stop"],
            timeout=timeout + 10,
        )
        if res.returncode != 0 and self.running():
            raise ServiceError(f"could not stop PostgreSQL in {self.datadir}: {res.stderr.strip()}")
        return True

    def kill(self) -> int | None:
        """SIGKILL the postmaster, leaving its pid file behind (a crash)."""
        if not self.running():
            return None
        pid = int(self.pidfile.read_text().splitlines()[0])
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: not _pid_alive(pid), 10)
        return pid

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        res = subprocess.run(
            [self._pg("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", self.dsn(dbname), "-c", sql],
            capture_output=True, text=True, check=False,
        )
        if res.returncode != 0:
            raise ServiceError(f"psql on port {self.port} failed: {res.stderr.strip()}")
        return res.stdout.strip()

    def create_database(self, name: str) -> bool:
        exists = self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'")
        if exists == "1":
            return False
        self.psql(f'CREATE DATABASE "{name}"')
        return True


@dataclass
class RedisServer:
    """A redis-server on 127.0.0.1:`port`, state in `base_dir`, no persistence."""

    base_dir: Path
    port: int
    host: str = "127.0.0.1"
    extra_args: Sequence[str] = ()

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir).absolute()

    @property
    def pidfile(self) -> Path:
        return self.base_dir / "redis.pid"

    @property
    def logfile(self) -> Path:
        return self.base_dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @staticmethod
    def binary() -> str:
        found = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
        if not found:
            raise ServiceError("redis-server not found; install it with: apt-get install redis-server  (or run: make bootstrap)")
        return found

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def running(self) -> bool:
        return self.pid() is not None

    def ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, timeout: float = 30) -> None:
        if self.running():
            if _wait(self.ready, timeout):
                return
            raise ServiceError(f"redis-server (pid file {self.pidfile}) is running but not answering on port {self.port}")
        if self.pidfile.exists():
            print(f"note: removing stale pid file {self.pidfile}")
            self.pidfile.unlink()
        if port_in_use(self.port, self.host):
            raise ServiceError(
                f"cannot start redis-server in {self.base_dir}: port {self.port} on {self.host} is already in use; "
                "stop that process or choose another port"
            )
        self.base_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.binary(), "--port", str(self.port), "--bind", self.host, "--daemonize", "yes",
            "--pidfile", str(self.pidfile), "--logfile", str(self.logfile), "--dir", str(self.base_dir),
            "--save", "", "--appendonly", "no", "--protected-mode", "no", *self.extra_args,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, start_new_session=True, cwd="/",
                             env=service_env())
        if res.returncode != 0:
            raise ServiceError(f"redis-server failed to start on port {self.port}: {res.stderr.strip() or res.stdout.strip()}")
        if not _wait(self.ready, timeout):
            raise ServiceError(f"redis-server on port {self.port} did not answer PING within {timeout}s; see {self.logfile}")

    def stop(self, timeout: float = 20) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        if not _wait(lambda: not _pid_alive(pid), timeout):
            os.kill(pid, signal.SIGKILL)
            _wait(lambda: not _pid_alive(pid), 5)
        self.pidfile.unlink(missing_ok=True)
        return True

    def kill(self) -> int | None:
        pid = self.pid()
        if pid is None:
            return None
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: not _pid_alive(pid), 10)
        return pid


@dataclass
class BackgroundProcess:
    """A long-running program in its own session (process group), tracked by a pid file."""

    name: str
    argv: Sequence[str]
    run_dir: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir).absolute()

    @property
    def pidfile(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return self.run_dir / f"{self.name}.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def running(self) -> bool:
        return self.pid() is not None

    def start(self) -> int:
        pid = self.pid()
        if pid is not None:
            return pid
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.logfile, "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                list(self.argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(self.env) if self.env is not None else None, cwd=self.cwd, start_new_session=True,
            )
        finally:
            log.close()
        self.pidfile.write_text(str(proc.pid))
        return proc.pid

    def stop(self, timeout: float = 30) -> bool:
        """SIGTERM the whole process group, then SIGKILL what is left after `timeout`."""
        pid = self.pid()
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return False
        try:
            pgid = os.getpgid(pid)
        except ProcessLookupError:
            pgid = None
        targets = (lambda sig: os.killpg(pgid, sig)) if pgid else (lambda sig: os.kill(pid, sig))
        try:
            targets(signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not _wait(lambda: not _group_alive(pgid, pid), timeout):
            try:
                targets(signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait(lambda: not _group_alive(pgid, pid), 10)
        self.pidfile.unlink(missing_ok=True)
        return True


def _group_alive(pgid: int | None, pid: int) -> bool:
    if pgid is None:
        return _pid_alive(pid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Reap our own zombie children so they do not count as alive.
    try:
        os.waitpid(-pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    return _zombie_free_group(pgid)


def _zombie_free_group(pgid: int) -> bool:
    """True when some non-zombie process is still in the group."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # fields after the ')' : state ppid pgrp ...
        rest = stat.rsplit(")", 1)[1].split()
        if int(rest[2]) == pgid and rest[0] != "Z":
            return True
    return False
