"""Where servers live: one provider interface (base.py), `local` processes and `aws` EC2 behind it."""

from __future__ import annotations

import threading
from collections.abc import Callable

from fleetmedic.cloud.base import (
    CloudProvider,
    InstanceStatus,
    ProviderError,
    ServerRef,
    panic_since_boot,
)

__all__ = [
    "CloudProvider",
    "InstanceStatus",
    "ProviderError",
    "ServerRef",
    "get_provider",
    "known_providers",
    "panic_since_boot",
    "register_provider",
]


def _local() -> CloudProvider:
    from fleetmedic.cloud.local import LocalProvider

    return LocalProvider()


def _aws() -> CloudProvider:
    from fleetmedic.cloud.aws import AwsProvider

    return AwsProvider()


# provider name (servers.provider) -> factory; each provider is built once, on first use.
_FACTORIES: dict[str, Callable[[], CloudProvider]] = {"local": _local, "aws": _aws}
_PROVIDERS: dict[str, CloudProvider] = {}
_LOCK = threading.Lock()


def register_provider(name: str, factory: Callable[[], CloudProvider]) -> None:
    """Use `factory` for servers whose provider is `name` (replaces a provider built before)."""
    with _LOCK:
        _FACTORIES[name] = factory
        _PROVIDERS.pop(name, None)


def get_provider(name: str) -> CloudProvider:
    """The provider for `servers.provider` = `name`; ProviderError naming the known ones otherwise."""
    with _LOCK:
        if name not in _PROVIDERS:
            factory = _FACTORIES.get(name)
            if factory is None:
                raise ProviderError(f"no cloud provider named {name!r} (known: {', '.join(sorted(_FACTORIES))}); "
                                    "fix the server's provider in the inventory")
            _PROVIDERS[name] = factory()
        return _PROVIDERS[name]


def known_providers() -> list[str]:
    """The provider names a server may have (servers.provider)."""
    with _LOCK:
        return sorted(_FACTORIES)
