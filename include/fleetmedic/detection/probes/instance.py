"""Server checks through the server's cloud provider: is it running, and has its kernel panicked."""

from __future__ import annotations

import asyncio

from fleetmedic.cloud import ProviderError, ServerRef, get_provider, panic_since_boot
from fleetmedic.detection.checks import Target, register_check

__all__ = ["instance_console", "instance_status", "server_of"]


def server_of(target: Target) -> ServerRef:
    """The server a target lives on (for a `server` resource: the server itself)."""
    server = target.attrs.get("server")
    if not server:
        raise ProviderError(f"{target.name} has no server in the inventory; register its server "
                            "(servers table, resources.server_id)")
    return ServerRef.from_any(server)


@register_check("instance.status", "server")
async def instance_status(target: Target, timeout: float) -> tuple[bool, float | None, str]:
    """Healthy when the provider says the server is running (not stopped, not impaired)."""
    try:
        server = server_of(target)
        status = await asyncio.to_thread(get_provider(server.provider).instance_status, server)
    except ProviderError as exc:
        return False, None, str(exc)
    return status.healthy, None, status.reason


@register_check("instance.console", "server")
async def instance_console(target: Target, timeout: float) -> tuple[bool, float | None, str]:
    """Unhealthy when the console shows a kernel panic printed after the server's newest boot.

    A console that cannot be read is no evidence of a panic: the check passes and says so, because
    its failure reboots the server (whether the server answers at all is `instance.status`'s job).
    """
    try:
        server = server_of(target)
        text = await asyncio.wait_for(
            asyncio.to_thread(get_provider(server.provider).console_output, server), timeout=timeout * 0.8)
    except (ProviderError, TimeoutError) as exc:
        why = str(exc) or f"no answer within {timeout * 0.8:g}s"
        return True, None, f"console of {target.name} could not be read ({why}); no evidence of a kernel panic"
    panic = panic_since_boot(text)
    if panic:
        return False, None, f"console of {server.name} shows a kernel panic since its last boot: {panic}"
    return True, None, f"no kernel panic on the console of {server.name} since its last boot"
