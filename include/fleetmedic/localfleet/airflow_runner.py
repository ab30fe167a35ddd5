"""Run a real Apache Airflow 3.3 (api-server, scheduler, dag-processor, triggerer) as local processes.

No `import airflow` here: every component is the `airflow` CLI from the virtualenv's bin dir, started
as a `BackgroundProcess` (own session, pid file and log under `<home>/run/`). Everything is
configured through `AIRFLOW__SECTION__KEY` variables (`env()`), also written to
`<home>/fleetmedic-airflow.env` so an operator can `set -a; . fleetmedic-airflow.env; set +a` and run
`airflow ...` against the same instance.

Findings (verified against the installed 3.3.2 source, not guessed):

- Components: 3.x has no webserver; `airflow api-server` serves the UI, the public REST API
  (`/api/v2`), the auth manager's routes (`/auth`) AND the Execution API (`/execution/`) that task
  processes talk to. `airflow dag-processor` is always a separate process; the scheduler never parses.
- `[core] execution_api_server_url` must point at our api-server (the default is localhost:8080).
  `[api_auth] jwt_secret` must be identical in every process: the scheduler signs each task's
  Execution-API token and the api-server verifies it (same for `[api] secret_key`, `[core]
  fernet_key`). Left unset they come from the airflow.cfg Airflow writes into AIRFLOW_HOME on first
  use (racy when several processes start at once). We generate them once, persist them in
  `<home>/fleetmedic-secrets.json` (so a restart on the same metadata DB keeps working) and pass
  them as env vars, which win over airflow.cfg.
- SimpleAuthManager: `[core] simple_auth_manager_users` is `user:ROLE[,user:ROLE]`; the passwords
  file (`[core] simple_auth_manager_passwords_file`) is JSON `{"user": "password"}`. Airflow only
  generates a password for users missing from the file, so writing it before start makes the
  password known. Token: `POST /auth/token` with JSON `{"username", "password"}` -> 201
  `{"access_token"}` (see fleetmedic.airflow_api).
- Metadata DB: `postgresql+psycopg2://` for `[database] sql_alchemy_conn`; Airflow derives the
  async URL (asyncpg) by itself. `airflow db migrate` is idempotent.
- New DAG files: the dag-processor lists the bundle's files every `[dag_processor] refresh_interval`
  (default 300 s!), checked every `bundle_refresh_check_interval`; existing files are re-parsed
  every `min_file_process_interval` (default 30 s). We use 5 / 2 / 10 s.
- `[core] dags_are_paused_at_creation = False`, `load_examples = False`.
- Health (`GET /api/v2/monitor/health`, no auth) is the latest job row per component with a fresh
  heartbeat, so right after a restart on an old DB it can report the PREVIOUS (dead) job; we
  require each heartbeat to be newer than the component's pid file.
- The scheduler and triggerer serve task logs on `[logging] worker_log_server_port` (8793) and
  `trigger_log_server_port` (8794): fixed defaults collide between two stacks, so we pick free ports.
- Task processes: the LocalExecutor forks its workers (the task supervisors) into the scheduler's
  process group, but each task runner gets its own process GROUP (same session). On SIGTERM a task
  runner only calls the operator's `on_kill()` and keeps running, and the LocalExecutor waits for
  running tasks, so a plain SIGTERM to the scheduler waits out the whole timeout. `stop()` kills
  the task groups first (SIGTERM, SIGKILL after `task_grace`), then the components.
- A process a task detached with setsid keeps the task's log pipes open, and its supervisor then
  waits `[workers] socket_cleanup_timeout` (default 60 s, we use 10); `stop()` kills such
  "escaped" processes too.
- Finding our processes: setproctitle (api-server, executor workers, serve-logs, task runners)
  overwrites /proc/<pid>/environ, so AIRFLOW_HOME in the environment is not enough. We match by
  session (every component is a session leader; children stay in it), by environment, and, for
  orphans of a killed component, by an `airflow` command line with its cwd under home.
- The api-server (uvicorn) waits up to `--worker-timeout` (120 s default) for a graceful shutdown;
  we pass 30.
- Timings on a 2-core VM: `db migrate` of an empty DB ~4 s; start to ready ~10-13 s; trigger to
  success of a one-task DAG ~5 s (of which ~3 s is the task process starting); a new DAG file is
  visible in <= ~7 s; stop ~5-8 s idle, ~11-18 s with a task running.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx

from fleetmedic.localfleet.services import BackgroundProcess, ServiceError, free_port, port_in_use

__all__ = ["COMPONENTS", "AirflowStack", "airflow_processes", "find_airflow_bin"]

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
ENV_FILE_NAME = "fleetmedic-airflow.env"
SECRETS_FILE_NAME = "fleetmedic-secrets.json"
PASSWORDS_FILE_NAME = "simple_auth_manager_passwords.json"
API_CONN_ID = "fleetmedic_airflow"  # fleetmedic.airflow.connections.AIRFLOW_API_CONN_ID (that module imports Airflow)


def find_airflow_bin(venv_bin: Path | None = None) -> Path:
    """The directory holding the `airflow` executable: `venv_bin`, this interpreter's dir, or PATH."""
    candidates: list[Path] = []
    if venv_bin is not None:
        candidates.append(Path(venv_bin))
    if os.environ.get("FLEETMEDIC_AIRFLOW_BIN"):
        candidates.append(Path(os.environ["FLEETMEDIC_AIRFLOW_BIN"]))
    # Not resolved: .venv/bin/python is a symlink to the system interpreter.
    candidates.append(Path(sys.executable).parent)
    for c in candidates:
        if (c / "airflow").exists():
            return c.absolute()
    found = shutil.which("airflow")
    if found:
        return Path(found).parent
    raise ServiceError(
        "the `airflow` command was not found (looked in "
        f"{', '.join(str(c) for c in candidates)} and PATH); install the project's virtualenv "
        "(make bootstrap) or set FLEETMEDIC_AIRFLOW_BIN to the venv's bin directory"
    )


def _sqlalchemy_dsn(dsn: str) -> str:
    """`postgresql://...` (libpq style) -> `postgresql+psycopg2://...` for Airflow's SQLAlchemy engine."""
    parts = urlsplit(dsn)
    scheme = parts.scheme
    if scheme in ("postgresql", "postgres"):
        scheme = "postgresql+psycopg2"
    elif not scheme.startswith("postgresql+") and not scheme.startswith("sqlite"):
        raise ValueError(f"metadata DSN must be a PostgreSQL URL (postgresql://user@host:port/db), got {dsn!r}")
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, parts.fragment))


def _read_proc(pid: int, name: str) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgrp, session) of a process, or None if it is gone."""
    raw = _read_proc(pid, "stat")
    if raw is None:
        return None
    rest = raw.decode(errors="replace").rsplit(")", 1)[1].split()
    return rest[0], int(rest[2]), int(rest[3])


def _cwd_under(pid: int, home: Path) -> bool:
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    return cwd == home or home in cwd.parents


def _looks_like_airflow(cmdline: bytes) -> bool:
    """`airflow ...` (incl. setproctitle titles like "airflow worker -- <ti>") or `python .../bin/airflow ...`."""
    argv = cmdline.split(b"\0")
    if not argv or not argv[0]:
        return False
    if os.path.basename(argv[0].split(b" ")[0]) == b"airflow":
        return True
    return len(argv) > 1 and os.path.basename(argv[1]) == b"airflow"


def airflow_processes(home: Path, sessions: set[int] | None = None) -> list[int]:
    """Live (non-zombie) pids that belong to the Airflow whose AIRFLOW_HOME is `home`.

    A process belongs if any holds:
    - it is in one of `sessions` (the sessions our components lead: every Airflow child stays in
      its component's session, task runners included, although they get their own process group);
    - its environment has AIRFLOW_HOME=`home` (not enough alone: setproctitle overwrites
      /proc/<pid>/environ of the api-server, executor workers, serve-logs and task runners);
    - it is an `airflow` process whose working directory is under `home` (all our components run
      there, and their children inherit it): this finds orphans of a component that was killed.
    """
    home = Path(home).absolute()
    marker = f"AIRFLOW_HOME={home}".encode()
    sessions = sessions or set()
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        stat = _proc_stat(pid)
        if stat is None or stat[0] == "Z":
            continue
        if stat[2] in sessions:
            found.append(pid)
            continue
        environ = _read_proc(pid, "environ")
        if environ and marker in environ.split(b"\0"):
            found.append(pid)
            continue
        cmdline = _read_proc(pid, "cmdline")
        if cmdline and _looks_like_airflow(cmdline) and _cwd_under(pid, home):
            found.append(pid)
    return sorted(found)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class AirflowStack:
    """One local Airflow: metadata DB on PostgreSQL, LocalExecutor, SimpleAuthManager, four processes.

    `home` becomes AIRFLOW_HOME (config, secrets, task logs under `logs/`, component pid/log files
    under `run/`). `extra_env` is added to every process (connections as AIRFLOW_CONN_*, PYTHONPATH...).
    """

    def __init__(
        self,
        home: Path,
        port: int,
        metadata_dsn: str,
        dags_folder: Path,
        plugins_folder: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        user: str = "admin",
        password: str | None = None,
        parallelism: int = 8,
        parsing_processes: int = 2,
        host: str = "127.0.0.1",
        venv_bin: Path | None = None,
        worker_log_port: int | None = None,
        trigger_log_port: int | None = None,
        config: Mapping[str, str] | None = None,
    ) -> None:
        self.home = Path(home).absolute()
        self.port = int(port)
        self.host = host
        self.metadata_dsn = metadata_dsn
        self.dags_folder = Path(dags_folder).absolute()
        self.plugins_folder = Path(plugins_folder).absolute() if plugins_folder else self.home / "plugins"
        self.extra_env = dict(extra_env or {})
        self._user = user
        self._password_arg = password
        self.parallelism = parallelism
        self.parsing_processes = parsing_processes
        self.bin_dir = find_airflow_bin(venv_bin)
        self.worker_log_port = worker_log_port or free_port()
        self.trigger_log_port = trigger_log_port or free_port()
        self.config_overrides = dict(config or {})  # extra AIRFLOW__X__Y=value, win over ours

    # -- paths and identity -------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def env_file(self) -> Path:
        return self.home / ENV_FILE_NAME

    @property
    def passwords_file(self) -> Path:
        return self.home / PASSWORDS_FILE_NAME

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def user(self) -> str:
        return self._user

    @property
    def password(self) -> str:
        return self._ensure_password()

    def client(self, timeout: float = 30):
        """An authenticated `AirflowClient` for this stack."""
        from fleetmedic.airflow_api import AirflowClient

        return AirflowClient(self.url, self.user, self.password, timeout=timeout)

    # -- secrets ------------------------------------------------------------------------------

    def _prepare_home(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        for d in (self.run_dir, self.logs_dir, self.plugins_folder):
            d.mkdir(parents=True, exist_ok=True)

    def _secrets(self) -> dict[str, str]:
        """Fernet key, JWT secret and API secret key: generated once, persisted under home (0600)."""
        path = self.home / SECRETS_FILE_NAME
        data: dict[str, str] = {}
        if path.exists():
            data = json.loads(path.read_text())
        wanted = {
            "fernet_key": lambda: base64.urlsafe_b64encode(os.urandom(32)).decode(),
            "jwt_secret": lambda: secrets.token_urlsafe(48),
            "secret_key": lambda: secrets.token_urlsafe(32),
        }
        missing = {k: make() for k, make in wanted.items() if not data.get(k)}
        if missing:
            data.update(missing)
            self.home.mkdir(parents=True, exist_ok=True)
            _write_private(path, json.dumps(data, indent=2) + "\n")
        return data

    def _ensure_password(self) -> str:
        """The admin password: the one given, else the persisted one, else a new one (persisted)."""
        passwords: dict[str, str] = {}
        if self.passwords_file.exists():
            text = self.passwords_file.read_text().strip()
            passwords = json.loads(text) if text else {}
        wanted = self._password_arg or passwords.get(self._user) or secrets.token_urlsafe(16)
        if passwords.get(self._user) != wanted:
            passwords[self._user] = wanted
            self.home.mkdir(parents=True, exist_ok=True)
            # The format SimpleAuthManager reads: a JSON object {username: password}.
            _write_private(self.passwords_file, json.dumps(passwords) + "\n")
        return wanted

    # -- configuration ------------------------------------------------------------------------

    def airflow_config(self) -> dict[str, str]:
        """Every setting as AIRFLOW__SECTION__KEY -> value (no secrets resolution, no os.environ), and the
        connection `fleetmedic_airflow` (AIRFLOW_CONN_*) to this Airflow's own REST API."""
        s = self._secrets()
        cfg = {
            # core
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.plugins_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__FERNET_KEY": s["fernet_key"],
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{self._user}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.passwords_file),
            "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "30",
            # metadata database
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": _sqlalchemy_dsn(self.metadata_dsn),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_POOL_SIZE": "5",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_MAX_OVERFLOW": "5",
            # api-server
            "AIRFLOW__API__HOST": self.host,
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": f"{self.url}/",
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": s["secret_key"],
            "AIRFLOW__API__EXPOSE_CONFIG": "True",
            "AIRFLOW__API_AUTH__JWT_SECRET": s["jwt_secret"],
            # scheduler / triggerer: quick heartbeats so health and scheduling react in seconds
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
            "AIRFLOW__SCHEDULER__CATCHUP_BY_DEFAULT": "False",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "300",
            # a task that leaves a detached child holding its log pipes blocks its executor slot this long
            "AIRFLOW__WORKERS__SOCKET_CLEANUP_TIMEOUT": "10",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
            # dag-processor: see new and changed files within seconds
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__BUNDLE_REFRESH_CHECK_INTERVAL": "2",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": str(self.parsing_processes),
            "AIRFLOW__DAG_PROCESSOR__DAG_FILE_PROCESSOR_TIMEOUT": "50",
            "AIRFLOW__DAG_PROCESSOR__STALE_DAG_THRESHOLD": "50",
            "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "60",
            # logging
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.logs_dir),
            "AIRFLOW__LOGGING__DAG_PROCESSOR_CHILD_PROCESS_LOG_DIRECTORY": str(self.logs_dir / "dag_processor"),
            "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.worker_log_port),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self.trigger_log_port),
        }
        # The connection fleetmedic's own tasks use to call this Airflow's REST API (pool_sync).
        cfg[f"AIRFLOW_CONN_{API_CONN_ID.upper()}"] = json.dumps({
            "conn_type": "http", "host": self.host, "port": self.port, "schema": "http",
            "login": self._user, "password": self.password,
        })
        cfg.update(self.config_overrides)
        return cfg

    def env(self) -> dict[str, str]:
        """The full environment of every Airflow process (and of `airflow` CLI calls).

        Inherits os.environ minus any AIRFLOW* variable (the caller's Airflow settings must not
        leak in), then our settings, then `extra_env`.
        """
        base = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        path = base.get("PATH", "/usr/local/bin:/usr/bin:/bin")
        base.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "PATH": f"{self.bin_dir}{os.pathsep}{path}",
                "VIRTUAL_ENV": str(self.bin_dir.parent),
                "PYTHONUNBUFFERED": "1",
                "NO_COLOR": "1",
            }
        )
        base.update(self.airflow_config())
        base.update(self.extra_env)
        return base

    def write_env_file(self) -> Path:
        """Write `fleetmedic-airflow.env` (0600: it holds secrets) for operators and debugging."""
        self._prepare_home()
        lines = [
            "# written by fleetmedic (AirflowStack); edits are overwritten on start.",
            "# Use: set -a; . ./fleetmedic-airflow.env; set +a; airflow dags list",
            f"AIRFLOW_HOME={shlex.quote(str(self.home))}",
            f"PATH={shlex.quote(str(self.bin_dir))}:\"$PATH\"",
        ]
        values = {**self.airflow_config(), **self.extra_env}
        lines += [f"{k}={shlex.quote(v)}" for k, v in sorted(values.items())]
        lines.append(f"# api: {self.url}  user: {self.user}  password file: {self.passwords_file}")
        _write_private(self.env_file, "\n".join(lines) + "\n")
        return self.env_file

    # -- commands -----------------------------------------------------------------------------

    def airflow(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run one `airflow ...` CLI command against this instance and return its output."""
        self._prepare_home()
        res = subprocess.run(
            [str(self.bin_dir / "airflow"), *args], env=self.env(), cwd=self.home,
            capture_output=True, text=True, timeout=timeout, check=False,
        )
        if check and res.returncode != 0:
            raise ServiceError(
                f"`airflow {' '.join(args)}` failed (exit {res.returncode}) for AIRFLOW_HOME={self.home}:\n"
                f"{(res.stderr or res.stdout)[-3000:]}"
            )
        return res

    def migrate_db(self, timeout: float = 900, echo: bool = True) -> float:
        """`airflow db migrate` (idempotent); streams its output; returns the seconds it took."""
        self._prepare_home()
        self._ensure_password()
        self.write_env_file()
        t0 = time.monotonic()
        if echo:
            print(f"airflow: migrating metadata database {_redact(self.metadata_dsn)} ...", flush=True)
        log_path = self.run_dir / "db-migrate.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [str(self.bin_dir / "airflow"), "db", "migrate"], env=self.env(), cwd=self.home,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            )
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    log.write(line)
                    if echo and _interesting_migrate_line(line):
                        print(f"  {line.rstrip()}", flush=True)
                    if time.monotonic() - t0 > timeout:
                        raise TimeoutError
                rc = proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
            except (TimeoutError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise ServiceError(f"`airflow db migrate` took more than {timeout}s; see {log_path}") from None
        elapsed = time.monotonic() - t0
        if rc != 0:
            raise ServiceError(
                f"`airflow db migrate` failed (exit {rc}) on {_redact(self.metadata_dsn)}; "
                f"last lines of {log_path}:\n{_tail(log_path)}"
            )
        if echo:
            print(f"airflow: metadata database ready in {elapsed:.1f}s", flush=True)
        return elapsed

    def _process(self, component: str, with_env: bool = False) -> BackgroundProcess:
        """The component's BackgroundProcess; the environment is only built when it is to start."""
        exe = str(self.bin_dir / "airflow")
        argv = {
            "api-server": [exe, "api-server", "--host", self.host, "--port", str(self.port),
                           "--workers", "1", "--worker-timeout", "30"],
            "scheduler": [exe, "scheduler"],
            "dag-processor": [exe, "dag-processor"],
            "triggerer": [exe, "triggerer"],
        }[component]
        return BackgroundProcess(component, argv, self.run_dir, env=self.env() if with_env else None, cwd=self.home)

    def processes(self, with_env: bool = False) -> dict[str, BackgroundProcess]:
        return {c: self._process(c, with_env) for c in COMPONENTS}

    def logfile(self, component: str) -> Path:
        return self._process(component).logfile

    def running(self) -> bool:
        """True when all four components are running (processes alive; see `wait_ready` for health)."""
        return all(p.running() for p in self.processes().values())

    def status(self) -> dict[str, int | None]:
        """component -> pid (None when not running)."""
        return {c: p.pid() for c, p in self.processes().items()}

    def start(self, migrate: bool = True) -> dict[str, int]:
        """Migrate the DB (unless told not to) and start the four components; returns their pids.

        Components already running (pid file + live process) are left alone.
        """
        self._prepare_home()
        self._ensure_password()
        self.write_env_file()
        procs = self.processes(with_env=True)
        if not procs["api-server"].running() and port_in_use(self.port, self.host):
            raise ServiceError(
                f"cannot start the Airflow api-server for {self.home}: port {self.port} on {self.host} "
                "is already in use by another process; stop it or choose another port"
            )
        if migrate and not all(p.running() for p in procs.values()):
            self.migrate_db()
        pids = {}
        for name, proc in procs.items():
            was = proc.running()
            pids[name] = proc.start()
            if not was:
                print(f"airflow: started {name} (pid {pids[name]}, log {proc.logfile})", flush=True)
        return pids

    def health(self) -> dict | None:
        """The api-server's /api/v2/monitor/health (no auth needed), or None if it does not answer."""
        try:
            r = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5)
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        return r.json()

    def _unhealthy(self, health: dict | None) -> list[str]:
        if health is None:
            return ["api-server (not answering)"]
        problems = []
        if health.get("metadatabase", {}).get("status") != "healthy":
            problems.append("metadatabase")
        for comp, key, proc_name in (("scheduler", "latest_scheduler_heartbeat", "scheduler"),
                                     ("dag_processor", "latest_dag_processor_heartbeat", "dag-processor"),
                                     ("triggerer", "latest_triggerer_heartbeat", "triggerer")):
            info = health.get(comp) or {}
            if info.get("status") != "healthy":
                problems.append(comp)
                continue
            # Health reports the newest job row: right after a restart on the same DB that can still
            # be the previous (dead) process. Require a heartbeat newer than our process's start.
            beat = info.get(key)
            started = self._process(proc_name).pidfile
            try:
                since = datetime.fromtimestamp(started.stat().st_mtime, UTC)
            except OSError:
                since = None
            if since is not None and beat and datetime.fromisoformat(beat) < since:
                problems.append(f"{comp} (heartbeat older than our process)")
        return problems

    def wait_ready(self, timeout: float = 180, echo: bool = True) -> float:
        """Wait until the API answers and scheduler, dag-processor and triggerer are healthy.

        Fails fast, with the tail of its log, if a component process exits. Returns seconds waited.
        """
        t0 = time.monotonic()
        last_report = 0.0
        problems: list[str] = []
        while True:
            for name, proc in self.processes().items():
                if not proc.running():
                    raise ServiceError(
                        f"Airflow {name} is not running (AIRFLOW_HOME={self.home}); "
                        f"last lines of {proc.logfile}:\n{_tail(proc.logfile)}"
                    )
            problems = self._unhealthy(self.health())
            elapsed = time.monotonic() - t0
            if not problems:
                if echo:
                    print(f"airflow: ready at {self.url} after {elapsed:.1f}s", flush=True)
                return elapsed
            if elapsed > timeout:
                logs = "\n".join(f"  {p.logfile}" for p in self.processes().values())
                raise ServiceError(
                    f"Airflow at {self.url} not ready after {timeout:.0f}s; still waiting for: "
                    f"{', '.join(problems)}. Component logs:\n{logs}"
                )
            if echo and elapsed - last_report >= 10:
                last_report = elapsed
                print(f"airflow: waiting for {', '.join(problems)} ({elapsed:.0f}s)", flush=True)
            time.sleep(0.5)

    def _sessions(self) -> set[int]:
        """Sessions led by our live components (the pid in each pid file, when alive)."""
        return {pid for p in self.processes().values() if (pid := p.pid()) is not None}

    def _task_targets(self, sessions: set[int]) -> tuple[set[int], set[int]] | None:
        """What runs tasks: (process groups inside our components' sessions other than the
        components' own, i.e. task runners; pids of our processes outside those sessions, e.g. a
        daemon a task started with setsid, which would keep the task's log pipes open and make its
        supervisor wait for `[workers] socket_cleanup_timeout`). None when there is nothing."""
        groups: set[int] = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (stat := _proc_stat(int(entry))):
                if stat[0] != "Z" and stat[2] in sessions and stat[1] not in sessions:
                    groups.add(stat[1])
        escaped = {
            pid for pid in airflow_processes(self.home)
            if (stat := _proc_stat(pid)) and stat[2] not in sessions
        }
        return (groups, escaped) if groups or escaped else None

    def leftover_processes(self) -> list[int]:
        """Pids of anything still alive that belongs to this stack (see `airflow_processes`)."""
        return airflow_processes(self.home, self._sessions())

    def stop(self, timeout: float = 30, task_grace: float = 5) -> bool:
        """Stop everything: running tasks, then each component, then a sweep for leftovers.

        Running tasks are killed: a task runner only calls the operator's `on_kill()` on SIGTERM
        and keeps going (its supervisor is expected to SIGKILL it), and the LocalExecutor waits
        for running tasks on SIGTERM, so the scheduler would otherwise sit out the whole timeout.
        Each task's process group gets SIGTERM (on_kill), then SIGKILL after `task_grace` seconds;
        the supervisors report the tasks failed to the still-running api-server.
        Components get SIGTERM to their process group, SIGKILL after `timeout`.
        Returns True if anything was running; raises ServiceError if a process survives SIGKILL.
        """
        sessions = self._sessions()
        procs = self.processes()
        stopped = False
        targets = self._task_targets(sessions)
        if targets:
            stopped = True
            print(f"airflow: killing running tasks (process groups {sorted(targets[0])}, "
                  f"escaped processes {sorted(targets[1])})", flush=True)
            for sig, grace in ((signal.SIGTERM, task_grace), (signal.SIGKILL, 5.0)):
                _signal_groups(targets[0], sig)
                _signal_all(sorted(targets[1]), sig)
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline and (targets := self._task_targets(sessions)):
                    time.sleep(0.2)
                if not targets:
                    break
        # Scheduler first (stops handing out work; its task supervisors report to the api-server),
        # then the other three together.
        if procs["scheduler"].stop(timeout=timeout):
            stopped = True
        with ThreadPoolExecutor(max_workers=3) as pool:
            results = pool.map(lambda n: procs[n].stop(timeout=timeout), ("triggerer", "dag-processor", "api-server"))
            stopped = any(list(results)) or stopped
        leftovers = airflow_processes(self.home, sessions)
        if leftovers:
            stopped = True
            print(f"airflow: stopping leftover processes {leftovers}", flush=True)
            for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                _signal_all(leftovers, sig)
                deadline = time.monotonic() + grace
                while leftovers and time.monotonic() < deadline:
                    time.sleep(0.2)
                    leftovers = airflow_processes(self.home, sessions)
                if not leftovers:
                    break
        if leftovers:
            raise ServiceError(f"Airflow processes of {self.home} survived SIGKILL: {leftovers}")
        return stopped


def _signal_groups(groups: set[int], sig: int) -> None:
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _redact(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return dsn


def _interesting_migrate_line(line: str) -> bool:
    low = line.lower()
    # Errors are not echoed line by line: a failure raises with the tail of the log.
    keys = ("performing upgrade", "running upgrade", "running stamp", "tables created", "migration done")
    return any(k in low for k in keys)
