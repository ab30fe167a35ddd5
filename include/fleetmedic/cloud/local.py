"""The `local` cloud: a server is a directory whose processes (PostgreSQL, Redis) stop and start together.

A local server's directory holds:

- `instances.json`: the instances that live on it (name, kind, port, base dir, extra args), written
  when the demo fleet (or anyone placing an instance there) registers them. PostgreSQL data
  directories found under the server directory count too, so an instance placed there without a
  manifest entry still stops and starts with its server.
- `state.json`: what the cloud knows: `running` (the default) or `stopped`, since when and why.
- `console.log`: the serial console. Boot lines, shutdown lines and kernel panics are appended;
  a panic printed after the newest boot line means the kernel is dead (the server is impaired).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleetmedic.cloud.base import InstanceStatus, ProviderError, ServerRef, panic_since_boot

__all__ = ["CONSOLE_TAIL_BYTES", "LocalInstance", "LocalProvider", "LocalServer"]

# EC2 keeps the last 64 KiB of console output; the local cloud shows the same amount.
CONSOLE_TAIL_BYTES = 64 * 1024

_PORT_LINE = re.compile(r"^port\s*=\s*(\d+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class LocalInstance:
    """One database process on a local server."""

    name: str
    kind: str  # postgres | redis
    port: int
    base_dir: Path
    args: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "port": self.port, "base_dir": str(self.base_dir), "args": list(self.args)}

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> LocalInstance:
        return cls(name, str(d["kind"]), int(d["port"]), Path(d["base_dir"]), tuple(d.get("args") or ()))

    def _process(self) -> Any:
        from fleetmedic.localfleet.services import PostgresCluster, RedisServer

        if self.kind == "postgres":
            return PostgresCluster(self.base_dir, self.port)
        if self.kind == "redis":
            return RedisServer(self.base_dir, self.port, extra_args=self.args)
        raise ProviderError(f"instance {self.name} has kind {self.kind!r}; the local cloud runs postgres and redis")

    def label(self) -> str:
        return f"{self.kind} {self.name} on port {self.port}"

    def running(self) -> bool:
        return bool(self._process().running())

    def start(self) -> str:
        proc = self._process()
        if self.kind == "postgres" and not proc.initialized():
            # Never initdb an empty cluster in place of lost data: that would hide the loss.
            raise ProviderError(f"data directory {proc.datadir} is missing or empty; not started")
        if proc.running():
            return f"{self.label()} was already running"
        proc.start()
        return f"started {self.label()}"

    def stop(self) -> str | None:
        proc = self._process()
        stopped = proc.stop(mode="fast") if self.kind == "postgres" else proc.stop()
        return f"stopped {self.label()}" if stopped else None

    def kill(self) -> str | None:
        pid = self._process().kill()
        return f"{self.label()} (pid {pid}) died" if pid else None


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class LocalServer:
    """A local server: its directory, instances, state file and console log."""

    directory: Path
    name: str = ""
    console_path: Path | None = None

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).absolute()
        if not self.name:
            self.name = self.directory.name
        if self.console_path is None:
            self.console_path = self.directory / "console.log"

    @classmethod
    def from_ref(cls, server: ServerRef) -> LocalServer:
        directory = server.attrs.get("dir")
        if not directory:
            raise ProviderError(
                f"server {server.name} has provider 'local' but no attrs.dir: the local cloud needs the server's "
                "directory; register it with the demo fleet (`fleetmedic demo up`) or set attrs.dir"
            )
        console = server.attrs.get("console_log")
        return cls(Path(directory), server.name, Path(console) if console else None)

    # -- files ---------------------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.directory / "instances.json"

    @property
    def state_path(self) -> Path:
        return self.directory / "state.json"

    @property
    def console(self) -> Path:
        assert self.console_path is not None
        return self.console_path

    def _require_dir(self) -> None:
        if not self.directory.is_dir():
            raise ProviderError(f"local server {self.name}: directory {self.directory} does not exist")

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise state changes (stop, start, reboot, crash) on this server across processes."""
        self._require_dir()
        with open(self.directory / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def _write_json(path: Path, value: Any) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
        os.replace(tmp, path)

    # -- instances -----------------------------------------------------------------------------

    def register_instance(self, name: str, kind: str, port: int, base_dir: Path | str,
                          args: Sequence[str] = ()) -> None:
        """Record that instance `name` lives on this server (idempotent)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.lock():
            manifest = self._read_manifest()
            manifest[name] = LocalInstance(name, kind, int(port), Path(base_dir).absolute(), tuple(args)).to_json()
            self._write_json(self.manifest_path, manifest)

    def _read_manifest(self) -> dict[str, Any]:
        try:
            value = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ProviderError(f"local server {self.name}: cannot read {self.manifest_path}: {exc}; "
                                "fix or remove the file and register the instances again") from exc
        return dict(value) if isinstance(value, dict) else {}

    def instances(self) -> list[LocalInstance]:
        """The manifest's instances, plus PostgreSQL data directories found under the server directory."""
        found = {name: LocalInstance.from_json(name, d) for name, d in self._read_manifest().items()}
        known_dirs = {i.base_dir for i in found.values()}
        if self.directory.is_dir():
            for child in sorted(self.directory.iterdir()):
                conf = child / "data" / "postgresql.fleetmedic.conf"
                if child.absolute() in known_dirs or child.name in found or not conf.exists():
                    continue
                m = _PORT_LINE.search(conf.read_text(errors="replace"))
                if m:
                    found[child.name] = LocalInstance(child.name, "postgres", int(m.group(1)), child.absolute())
        # PostgreSQL before Redis, then by name: a stable order for boots and messages.
        return sorted(found.values(), key=lambda i: (i.kind != "postgres", i.name))

    # -- state and console ---------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        try:
            value = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {"state": "running", "reason": "no state file: never stopped by the cloud"}
        except (OSError, ValueError) as exc:
            raise ProviderError(f"local server {self.name}: cannot read {self.state_path}: {exc}") from exc
        return dict(value)

    def _set_state(self, state: str, reason: str, **extra: Any) -> None:
        self._write_json(self.state_path, {"state": state, "at": _now().isoformat(), "reason": reason, **extra})

    def console_text(self, max_bytes: int = CONSOLE_TAIL_BYTES) -> str:
        try:
            with open(self.console, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - max_bytes))
                data = fh.read()
        except FileNotFoundError as exc:
            raise ProviderError(f"local server {self.name} has no console log at {self.console}") from exc
        text = data.decode("utf-8", errors="replace")
        if size > max_bytes:
            text = text.split("\n", 1)[-1]  # drop the partial first line
        return text

    def _uptime(self) -> float:
        booted = self.state().get("booted_at")
        if booted:
            try:
                return max(0.0, (_now() - datetime.fromisoformat(booted)).total_seconds())
            except ValueError:
                pass
        try:
            return max(0.0, time.time() - self.console.stat().st_mtime)
        except OSError:
            return 0.0

    def append_console(self, lines: Sequence[str], *, uptime: float | None = None) -> None:
        """Append kernel-style lines (`[  seconds.micros] text`) to the console log."""
        base = self._uptime() if uptime is None else uptime
        with open(self.console, "a") as fh:
            for i, line in enumerate(lines):
                fh.write(f"[{base + i * 0.000137:12.6f}] {line}\n")

    # -- what the cloud does -------------------------------------------------------------------

    def running_instances(self) -> tuple[list[LocalInstance], list[LocalInstance]]:
        instances = self.instances()
        up = [i for i in instances if i.running()]
        return up, instances

    def _boot(self, why: str) -> list[str]:
        """Start every instance and mark the server running; the console gets fresh boot lines."""
        self.append_console([f"fleetmedic local server {self.name} booted ({why})"], uptime=0.0)
        done, failed = [], []
        for inst in self.instances():
            try:
                done.append(inst.start())
            except Exception as exc:  # one instance failing to start must not hide the others' outcome
                failed.append(f"{inst.name}: {str(exc).splitlines()[0]}")
        self.append_console([*(d for d in done), *(f"failed to start {f}" for f in failed)], uptime=0.5)
        self._set_state("running", why, booted_at=_now().isoformat())
        if failed:
            raise ProviderError(f"{self.name} booted but {len(failed)} instance(s) did not start: {'; '.join(failed)}"
                                + (f" (started: {', '.join(done)})" if done else ""))
        return done

    def _shutdown(self) -> list[str]:
        stopped = []
        for inst in reversed(self.instances()):
            msg = inst.stop()
            if msg:
                stopped.append(msg)
        return stopped

    def stop(self, reason: str) -> str:
        with self.lock():
            state = self.state()
            if state.get("state") == "stopped":
                return f"{self.name} was already stopped ({state.get('reason')})"
            self.append_console(["reboot: System halted by the cloud" + (f" ({reason})" if reason else "")])
            stopped = self._shutdown()
            self._set_state("stopped", reason or "stopped through the local cloud")
        return f"stopped server {self.name}: " + (", ".join(stopped) if stopped else "no process was running")

    def start(self, reason: str) -> str:
        with self.lock():
            state = self.state()
            if state.get("state") != "stopped":
                return f"{self.name} is already running; nothing started"
            done = self._boot(reason or "started through the local cloud")
        return f"booted server {self.name}: " + (", ".join(done) if done else "it has no instances")

    def reboot(self, reason: str) -> str:
        with self.lock():
            was = self.state().get("state", "running")
            panic = panic_since_boot(self.console_text()) if self.console.exists() else None
            if was != "stopped" and panic is None:
                self.append_console(["reboot: Restarting system" + (f" ({reason})" if reason else "")])
            stopped = self._shutdown()
            done = self._boot(reason or "rebooted through the local cloud")
        before = ("it was stopped" if was == "stopped" else f"its kernel had panicked ({panic})" if panic
                  else "it was running")
        return (f"rebooted server {self.name} ({before}"
                + (f"; {', '.join(stopped)}" if stopped else "") + "): "
                + (", ".join(done) if done else "it has no instances"))

    def crash(self, panic_lines: Sequence[str]) -> list[str]:
        """A kernel panic: the lines reach the console and every process dies at once (SIGKILL)."""
        with self.lock():
            self.append_console(panic_lines)
            return [msg for inst in self.instances() if (msg := inst.kill())]


class LocalProvider:
    """The `local` cloud provider (see the module docstring)."""

    name = "local"

    def instance_status(self, server: ServerRef) -> InstanceStatus:
        srv = LocalServer.from_ref(server)
        srv._require_dir()
        state = srv.state()
        up, instances = srv.running_instances()
        procs = f"{len(up)}/{len(instances)} processes running" + (
            f" ({', '.join(i.name for i in up)})" if up else "")
        data = {"processes_running": len(up), "processes": len(instances), "state_file": state}
        if state.get("state") == "stopped":
            return InstanceStatus("stopped", f"server {server.name} is stopped since {state.get('at')} "
                                             f"({state.get('reason')}); {procs}", data)
        panic = panic_since_boot(srv.console_text())
        if panic:
            return InstanceStatus("impaired", f"server {server.name} is impaired: its console shows "
                                              f"'{panic}' since its last boot; {procs}", {**data, "panic": panic})
        return InstanceStatus("running", f"server {server.name} is running; {procs}", data)

    def console_output(self, server: ServerRef) -> str:
        return LocalServer.from_ref(server).console_text()

    def reboot(self, server: ServerRef, reason: str = "") -> str:
        return LocalServer.from_ref(server).reboot(reason)

    def start(self, server: ServerRef, reason: str = "") -> str:
        return LocalServer.from_ref(server).start(reason)

    def stop(self, server: ServerRef, reason: str = "") -> str:
        return LocalServer.from_ref(server).stop(reason)
