"""Real fault injection into the demo fleet: each fault says what it did and how to undo it.

Families of faults live in modules of this package and add themselves with `register_fault`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fleetmedic.inventory import Resource

__all__ = ["FAULTS", "Fault", "FaultContext", "FaultError", "FaultResult", "register_fault"]


class FaultError(RuntimeError):
    """The fault cannot be injected into that target; the message says why."""


@dataclass(frozen=True)
class FaultContext:
    ops_dsn: str
    resource: Resource
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FaultResult:
    did: str  # what was done, for the operator
    undo: str  # the command that undoes it
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Fault:
    name: str
    kinds: tuple[str, ...]  # resource kinds it applies to
    description: str
    fn: Callable[[FaultContext], FaultResult]


FAULTS: dict[str, Fault] = {}


def register_fault(name: str, kinds: tuple[str, ...], description: str):
    def add(fn: Callable[[FaultContext], FaultResult]) -> Callable[[FaultContext], FaultResult]:
        if name in FAULTS:
            raise ValueError(f"fault {name!r} is registered twice")
        FAULTS[name] = Fault(name, kinds, description, fn)
        return fn

    return add


def inject(name: str, ops_dsn: str, target: str, **options: Any) -> FaultResult:
    """Inject fault `name` into resource `target` (a name from the inventory)."""
    import psycopg

    from fleetmedic.inventory import get_resource

    fault = FAULTS.get(name)
    if fault is None:
        raise FaultError(f"unknown fault {name!r} (faults: {', '.join(sorted(FAULTS))})")
    with psycopg.connect(ops_dsn) as conn:
        resource = get_resource(conn, target)
    if resource.kind not in fault.kinds and "any" not in fault.kinds:
        raise FaultError(f"{name} applies to {', '.join(fault.kinds)} resources; {target} is {resource.kind}")
    return fault.fn(FaultContext(ops_dsn=ops_dsn, resource=resource, options=options))


for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
