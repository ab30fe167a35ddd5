"""One Airflow pool per playbook (`playbook_<type>`, `limits.concurrency` slots), kept in sync through the REST API.

The set-up command (`LocalStack.up`), the `pool_sync` DAG (every 5 minutes, so a changed or new
playbook gets its pool without a human) and `fleetmedic pools sync` call `sync_pools`; pools of
playbooks that no longer exist are removed. Deferred tasks (a step waiting for health in the
triggerer) do not hold a slot: the pool caps remediations acting at once, not ones waiting.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from fleetmedic.playbooks.schema import Playbook

__all__ = ["POOL_PREFIX", "PoolChange", "desired_pools", "pool_name", "sync_pools"]

POOL_PREFIX = "playbook_"


def pool_name(incident_type: str) -> str:
    """The pool of a playbook: the same name as its DAG."""
    return f"{POOL_PREFIX}{incident_type}"


@dataclass(frozen=True)
class PoolChange:
    """What `sync_pools` did to one pool: created, updated, deleted or unchanged."""

    pool: str
    action: str
    slots: int | None
    before: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def desired_pools(playbooks: Iterable[Playbook]) -> dict[str, tuple[int, str]]:
    """pool name -> (slots, description) for these playbooks."""
    return {
        pool_name(pb.type): (pb.limits.concurrency,
                             f"fleetmedic: at most {pb.limits.concurrency} {pb.type} remediations at once "
                             f"(playbooks/{pb.type}.yaml limits.concurrency)")
        for pb in playbooks
    }


def sync_pools(client: Any, playbooks: Iterable[Playbook], *, prune: bool = True) -> list[PoolChange]:
    """Create or resize each playbook's pool; with `prune`, delete `playbook_*` pools of gone playbooks.

    `client` is an `AirflowClient`. Idempotent: a second call reports every pool unchanged.
    """
    want = desired_pools(playbooks)
    have = {p["name"]: p for p in client.list_pools() if str(p["name"]).startswith(POOL_PREFIX)}
    changes: list[PoolChange] = []
    for name, (slots, description) in sorted(want.items()):
        current = have.get(name)
        if current is None:
            client.create_pool(name, slots, description=description)
            changes.append(PoolChange(name, "created", slots))
        elif current["slots"] != slots or current.get("description") != description or current.get("include_deferred"):
            client.update_pool(name, slots, description=description)
            changes.append(PoolChange(name, "updated", slots, current["slots"]))
        else:
            changes.append(PoolChange(name, "unchanged", slots))
    if prune:
        for name in sorted(set(have) - set(want)):
            client.delete_pool(name)
            changes.append(PoolChange(name, "deleted", None, have[name]["slots"]))
    return changes
