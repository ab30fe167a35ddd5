"""Tunables of the checks and balances, from the environment (playbook limits come from the playbook)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

from fleetmedic.playbooks.schema import parse_duration

__all__ = ["SafetyConfig"]


def _duration(name: str, default: timedelta) -> timedelta:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ValueError(f"{name}={value!r}: {exc}") from None


def _number(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number") from None


@dataclass(frozen=True)
class SafetyConfig:
    """How breakers, leases and the mass-failure guard behave.

    :param breaker_cooldown: how long a playbook breaker tripped by automation stays open before it
        lets one probe run through (FLEETMEDIC_BREAKER_COOLDOWN, e.g. 15m)
    :param action_window: the sliding window `max_actions_per_hour` counts over (one hour)
    :param lease_wait: seconds an action waits for another action's lease on the same resource
    :param guard_share: the mass-failure guard trips when more than this share of the fleet is
        unhealthy at once (FLEETMEDIC_GUARD_SHARE, default 0.2) ...
    :param guard_min_unhealthy: ... and at least this many resources are (FLEETMEDIC_GUARD_MIN_UNHEALTHY, 5)
    :param guard_recent: a health row older than this does not count as "unhealthy now"
    :param guard_rearm: after a human resets the global breaker, the guard does not trip again on
        a mass failure for this long (they judged the failures real); a failing canary still trips it
    :param redis_timeout: seconds before a Redis call counts as Redis being unreachable
    """

    breaker_cooldown: timedelta = timedelta(minutes=15)
    action_window: timedelta = timedelta(hours=1)
    lease_wait: float = 30.0
    guard_share: float = 0.2
    guard_min_unhealthy: int = 5
    guard_recent: timedelta = field(default=timedelta(minutes=2))
    guard_rearm: timedelta = field(default=timedelta(minutes=30))
    redis_timeout: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.guard_share <= 1:
            raise ValueError(f"guard_share {self.guard_share} must be a share of the fleet in (0, 1], e.g. 0.2")
        if self.guard_min_unhealthy < 1:
            raise ValueError(f"guard_min_unhealthy {self.guard_min_unhealthy} must be at least 1")

    @classmethod
    def from_env(cls) -> SafetyConfig:
        d = cls()
        return cls(
            breaker_cooldown=_duration("FLEETMEDIC_BREAKER_COOLDOWN", d.breaker_cooldown),
            action_window=d.action_window,
            lease_wait=_number("FLEETMEDIC_LEASE_WAIT", d.lease_wait),
            guard_share=_number("FLEETMEDIC_GUARD_SHARE", d.guard_share),
            guard_min_unhealthy=int(_number("FLEETMEDIC_GUARD_MIN_UNHEALTHY", d.guard_min_unhealthy)),
            guard_recent=_duration("FLEETMEDIC_GUARD_RECENT", d.guard_recent),
            guard_rearm=_duration("FLEETMEDIC_GUARD_REARM", d.guard_rearm),
            redis_timeout=_number("FLEETMEDIC_REDIS_TIMEOUT", d.redis_timeout),
        )
