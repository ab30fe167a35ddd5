"""Faults on a whole local server: stop every process on it, or panic its kernel; and their undos."""

from __future__ import annotations

from fleetmedic.cloud.base import ServerRef
from fleetmedic.cloud.local import LocalServer
from fleetmedic.localfleet.faults import FaultContext, FaultError, FaultResult, register_fault

__all__ = ["kernel_panic", "reboot_server", "start_server", "stop_server"]

# Server faults take a server (its resource of kind 'server') or any resource on it.
_ANY_RESOURCE = ("server", "postgres", "redis")

PANIC_LINES = (
    "Kernel panic - not syncing: Fatal exception in interrupt",
    "CPU: 1 PID: 0 Comm: swapper/1 Tainted: G      D           6.1.0-fleetmedic #1",
    "Call Trace:",
    " <IRQ>",
    " dump_stack_lvl+0x44/0x5c",
    " panic+0x118/0x2f0",
    " oops_end.cold+0x9/0x11",
    "Kernel Offset: disabled",
    "---[ end Kernel panic - not syncing: Fatal exception in interrupt ]---",
)


def _server(ctx: FaultContext) -> tuple[ServerRef, LocalServer]:
    res = ctx.resource
    if res.server is None:
        raise FaultError(f"{res.name} is on no server in the inventory; server faults need one")
    ref = ServerRef.from_any(res.server)
    if ref.provider != "local":
        raise FaultError(f"server {ref.name} is on provider {ref.provider!r}; fleetmedic injects server faults "
                         "into the local cloud only")
    return ref, LocalServer.from_ref(ref)


@register_fault("stop-server", _ANY_RESOURCE,
                "stop every process of a server and mark it stopped (target: the server or a resource on it)")
def stop_server(ctx: FaultContext) -> FaultResult:
    ref, server = _server(ctx)
    did = server.stop("chaos stop-server")
    return FaultResult(did, f"fleetmedic chaos start-server {ref.name}", {"server": ref.name})


@register_fault("start-server", _ANY_RESOURCE, "undo stop-server: boot the server, starting every process on it")
def start_server(ctx: FaultContext) -> FaultResult:
    ref, server = _server(ctx)
    try:
        did = server.start("chaos start-server")
    except Exception as exc:
        raise FaultError(str(exc)) from exc
    return FaultResult(did, "(nothing to undo)", {"server": ref.name})


@register_fault("kernel-panic", _ANY_RESOURCE,
                "panic a server's kernel: a panic on its console log and every process on it killed")
def kernel_panic(ctx: FaultContext) -> FaultResult:
    ref, server = _server(ctx)
    if server.state().get("state") == "stopped":
        raise FaultError(f"server {ref.name} is stopped; a stopped server's kernel cannot panic "
                         f"(start it first: fleetmedic chaos start-server {ref.name})")
    died = server.crash(PANIC_LINES)
    did = (f"panicked the kernel of {ref.name}: wrote '{PANIC_LINES[0]}' to {server.console}; "
           + (", ".join(died) if died else "no process was running"))
    return FaultResult(did, f"fleetmedic chaos reboot-server {ref.name}", {"server": ref.name, "killed": died})


@register_fault("reboot-server", _ANY_RESOURCE,
                "undo kernel-panic or stop-server: reboot the server, starting every process on it")
def reboot_server(ctx: FaultContext) -> FaultResult:
    ref, server = _server(ctx)
    try:
        did = server.reboot("chaos reboot-server")
    except Exception as exc:
        raise FaultError(str(exc)) from exc
    return FaultResult(did, "(nothing to undo)", {"server": ref.name})
