"""Pure parts of the safety package: guard thresholds, shadow paths, names, override parsing, pool sizing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fleetmedic.playbooks.loader import default_playbooks_dir, load_playbook
from fleetmedic.playbooks.schema import Limits
from fleetmedic.safety.breakers import breaker_page_key, parse_breaker_name
from fleetmedic.safety.config import SafetyConfig
from fleetmedic.safety.gate import GateDecision
from fleetmedic.safety.guard import FleetHealth, trip_reason
from fleetmedic.safety.overrides import OverrideError, human_actor, parse_until
from fleetmedic.safety.pools import desired_pools
from fleetmedic.safety.shadow import happy_path

CONFIG = SafetyConfig()


def health(fleet: int, unhealthy: int, canaries_failing: tuple[str, ...] = ()) -> FleetHealth:
    return FleetHealth(fleet, tuple(f"pg{i}" for i in range(unhealthy)), canaries_failing, canaries_failing)


@pytest.mark.parametrize(("fleet", "unhealthy", "trips"), [
    (10, 4, False),   # 40% but fewer than 5
    (10, 5, True),    # 50% and 5
    (25, 5, False),   # exactly 20% is not more than 20%
    (24, 5, True),    # 20.8%
    (100, 19, False),
    (100, 21, True),
    (0, 0, False),
])
def test_guard_trips_on_more_than_the_share_and_at_least_the_minimum(fleet, unhealthy, trips):
    assert (trip_reason(health(fleet, unhealthy), CONFIG) is not None) is trips


def test_guard_reason_names_counts_and_resources():
    reason = trip_reason(health(12, 6), CONFIG)
    assert reason is not None
    assert reason.startswith("mass failure: 6 of 12 resources (50%) unhealthy at once")
    assert "pg0, pg1" in reason and "monitoring is the likelier suspect" in reason


def test_a_failing_canary_trips_whatever_the_share():
    reason = trip_reason(health(100, 1, ("canary-pg",)), CONFIG)
    assert reason is not None and reason.startswith("canary check failed on canary-pg")


def test_config_rejects_a_share_outside_0_1():
    with pytest.raises(ValueError, match="guard_share 1.5"):
        SafetyConfig(guard_share=1.5)


def test_config_from_env(monkeypatch):
    monkeypatch.setenv("FLEETMEDIC_BREAKER_COOLDOWN", "5m")
    monkeypatch.setenv("FLEETMEDIC_GUARD_SHARE", "0.3")
    cfg = SafetyConfig.from_env()
    assert cfg.breaker_cooldown == timedelta(minutes=5) and cfg.guard_share == 0.3
    monkeypatch.setenv("FLEETMEDIC_BREAKER_COOLDOWN", "soon")
    with pytest.raises(ValueError, match="FLEETMEDIC_BREAKER_COOLDOWN='soon'"):
        SafetyConfig.from_env()


def test_happy_path_of_resource_down_ends_in_resolve():
    pb = load_playbook(default_playbooks_dir() / "resource_down.yaml")
    path, terminal = happy_path(pb)
    assert path[0] == "restart (resource.restart)" and terminal == "resolve"


def test_breaker_names_and_page_keys():
    assert parse_breaker_name(" global ") == "global"
    assert parse_breaker_name("follower_behind") == "playbook:follower_behind"
    with pytest.raises(ValueError, match="use 'global' or 'playbook:<type>'"):
        parse_breaker_name("playbook:")
    assert breaker_page_key("playbook:resource_down", 7) == "fleetmedic-breaker-playbook-resource_down-trip-7"


def test_gate_decision_outcomes_and_event_data():
    with pytest.raises(ValueError, match="not one of proceed, hold, escalate"):
        GateDecision("maybe", "why")
    assert GateDecision("hold", "why", "global", {"x": 1}).event_data() == {"x": 1, "gate": "hold", "held_by": "global"}
    assert GateDecision("proceed", "why").event_data() == {"gate": "proceed"}


def test_until_takes_a_duration_or_an_iso_time():
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_until("2h", now=now) == now + timedelta(hours=2)
    assert parse_until("2026-05-02T08:00+00:00", now=now) == datetime(2026, 5, 2, 8, 0, tzinfo=UTC)
    with pytest.raises(OverrideError, match="in the past"):
        parse_until("2026-04-01T00:00+00:00", now=now)
    with pytest.raises(OverrideError, match="give a duration"):
        parse_until("tomorrow", now=now)


def test_human_actor_from_the_environment(monkeypatch):
    monkeypatch.setenv("FLEETMEDIC_USER", "alice")
    assert human_actor() == "human:alice"
    assert human_actor("bob") == "human:bob"


def test_one_pool_per_playbook_sized_from_concurrency():
    pb = load_playbook(default_playbooks_dir() / "resource_down.yaml")
    small = pb.model_copy(update={"limits": Limits(concurrency=2)})
    assert desired_pools([small])["playbook_resource_down"][0] == 2
