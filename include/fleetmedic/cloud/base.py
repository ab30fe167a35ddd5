"""The one interface every cloud provider offers: instance status, console output, reboot, start, stop."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "BOOT_MARKERS",
    "PANIC_MARKERS",
    "CloudProvider",
    "InstanceState",
    "InstanceStatus",
    "ProviderError",
    "ServerRef",
    "panic_since_boot",
]

InstanceState = Literal["running", "stopped", "impaired"]


class ProviderError(RuntimeError):
    """A cloud provider could not answer or act; the message names the server and what to check."""


@dataclass(frozen=True)
class ServerRef:
    """A server as a provider needs it: its name, which provider holds it, its address there, its attrs.

    Built from an inventory `Server`, or from the `server` dict a probe's target carries.
    """

    name: str
    provider: str
    address: str | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def from_any(cls, server: Any) -> ServerRef:
        if isinstance(server, ServerRef):
            return server
        if isinstance(server, Mapping):
            return cls(str(server["name"]), str(server.get("provider") or "local"), server.get("address"),
                       dict(server.get("attrs") or {}))
        return cls(str(server.name), str(server.provider or "local"), server.address, dict(server.attrs or {}))


@dataclass(frozen=True)
class InstanceStatus:
    """What the provider says about a server: running, stopped or impaired, and why (Patroni style)."""

    state: InstanceState
    reason: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return self.state == "running"


@runtime_checkable
class CloudProvider(Protocol):
    """Where servers live. Every method names the server in its reason and raises ProviderError on failure."""

    name: str

    def instance_status(self, server: ServerRef) -> InstanceStatus:
        """running, stopped or impaired (running but failing its status checks, e.g. a panicked kernel)."""
        ...

    def console_output(self, server: ServerRef) -> str:
        """The server's serial console text (the newest part, as the provider keeps it)."""
        ...

    def reboot(self, server: ServerRef, reason: str = "") -> str:
        """Reboot (a stopped server is started); returns what was done."""
        ...

    def start(self, server: ServerRef, reason: str = "") -> str:
        ...

    def stop(self, server: ServerRef, reason: str = "") -> str:
        ...


# A kernel writes one of these when it boots; a panic printed before the newest boot line is history.
BOOT_MARKERS = re.compile(r"Linux version \S+|fleetmedic local server \S+ booted")
PANIC_MARKERS = re.compile(r"Kernel panic - not syncing[^\n]*")


def panic_since_boot(console: str) -> str | None:
    """The first kernel panic line printed after the newest boot line, or None if the kernel has not panicked."""
    last_boot = -1
    for m in BOOT_MARKERS.finditer(console):
        last_boot = m.start()
    panic = PANIC_MARKERS.search(console, last_boot + 1)
    if panic is None:
        return None
    line_start = console.rfind("\n", 0, panic.start()) + 1
    line_end = console.find("\n", panic.start())
    return console[line_start: line_end if line_end >= 0 else len(console)].strip()
