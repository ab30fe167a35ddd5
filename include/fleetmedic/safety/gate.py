"""The one gate every playbook run passes before it may act, and the permit every action takes when it acts.

`evaluate_gate` decides, in this order, and says why (Patroni style):
1. an active silence on the incident's (resource, type)      -> hold (manual runs pass)
2. the global breaker not closed (mass-failure guard, Redis) -> hold
3. the playbook's breaker open                                -> hold
4. shadow mode (`limits.mode: shadow`, or a human's `fleetmedic shadow on <type>`)
                                                              -> record the would-be path, escalate
5. an automated action on the same (resource, type) within `limits.resource_cooldown`
                                                              -> escalate, "cooldown" (manual runs pass)
6. the playbook's breaker half-open                          -> exactly one run proceeds as the probe
7. the playbook's action window (Redis) full                 -> trip the breaker (one page), hold
   Redis unreachable                                          -> trip the global breaker (one page), hold
   otherwise                                                  -> proceed (the run holds a slot in the window)

`action_permit` re-checks the breakers (and a shadow override set since the gate) at the moment of
acting (a run admitted into the action window keeps its slot when the window's trip opens the
breaker after it: the trip holds the runs over the limit, not the ones within it), takes the resource's Redis lease for the action, and records it in the window; Redis gone by
then fails closed the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fleetmedic.incidents.store import Incident, IncidentStore
from fleetmedic.playbooks.schema import Playbook
from fleetmedic.safety.breakers import (
    GLOBAL,
    Breaker,
    RedisUnavailable,
    admit_probe,
    get_breaker,
    playbook_breaker,
    redis_client,
    refresh,
    reserve_action,
    trip,
    window_count,
    window_member,
)
from fleetmedic.safety.config import SafetyConfig
from fleetmedic.safety.cooldown import cooldown_reason, last_automated_action
from fleetmedic.safety.lease import Lease, LeaseBusy, hold_lease, release_lease
from fleetmedic.safety.modes import ModeOverride, get_override
from fleetmedic.safety.shadow import happy_path
from fleetmedic.safety.silences import active_silence_for

__all__ = [
    "OUTCOMES",
    "ActionPermit",
    "GateDecision",
    "action_permit",
    "evaluate_gate",
    "hold_incident",
    "record_action",
]

OUTCOMES = ("proceed", "hold", "escalate")


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided and why; `held_by` names what holds the incident (a breaker or a silence)."""

    outcome: str
    reason: str
    held_by: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"gate outcome {self.outcome!r} is not one of {', '.join(OUTCOMES)}")

    def event_data(self) -> dict[str, Any]:
        """What the gate's audit event records (the window rebuild and the shadow report read `gate`)."""
        data = {**self.data, "gate": self.outcome}
        if self.held_by:
            data["held_by"] = self.held_by
        return data


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _since(b: Breaker) -> str:
    return f"since {b.changed_at:%Y-%m-%d %H:%M:%S}" if b.changed_at else ""


def _fail_closed(ops_dsn: str, redis_url: str, exc: Exception, *, actor: str, incident: Incident,
                 dry_run: bool) -> GateDecision:
    reason = (f"Redis at {_redact(redis_url)} is unreachable ({exc}); automation fails closed: no action "
              "until Redis is back and a human resets the global breaker (`fleetmedic breakers reset global`)")
    if dry_run:
        return GateDecision("hold", f"would hold: {reason}", GLOBAL, {"redis_unreachable": True})
    change = trip(ops_dsn, GLOBAL, actor=actor, reason=reason,
                  data={"redis": _redact(redis_url), "incident_id": incident.id})
    return GateDecision("hold", f"fail closed: {reason}", GLOBAL,
                        {"redis_unreachable": True, "tripped": change.changed, "trip_event_id": change.event_id})


def _resource_name(ops_dsn: str, resource_id: int) -> str:
    from fleetmedic.db.connect import connection

    with connection(ops_dsn) as conn:
        row = conn.execute("SELECT name FROM resources WHERE id = %s", (resource_id,)).fetchone()
    return str(row["name"]) if row else f"resource {resource_id}"


def evaluate_gate(
    ops_dsn: str,
    redis_url: str,
    incident: Incident | int,
    playbook: Playbook,
    *,
    run_id: str,
    actor: str,
    manual: bool = False,
    dry_run: bool = False,
    config: SafetyConfig | None = None,
) -> GateDecision:
    """Decide whether this run may act on the incident: proceed, hold or escalate, with the reason.

    `manual`: a human started the run with a reason (silences and cooldown do not stop it; breakers
    and Redis still do). `dry_run`: decide without changing anything (no window slot, no trip, no probe).
    """
    cfg = config or SafetyConfig.from_env()
    inc = incident if isinstance(incident, Incident) else IncidentStore(ops_dsn).get(int(incident))
    if inc.type != playbook.type:
        raise ValueError(f"incident {inc.id} is of type {inc.type!r}, not {playbook.type!r}: wrong playbook for the gate")
    pb_name = playbook_breaker(playbook.type)
    limits = playbook.limits
    if not dry_run:
        refresh(ops_dsn, actor=actor, names=[GLOBAL, pb_name])
    resource = _resource_name(ops_dsn, inc.resource_id)

    if not manual:
        silence = active_silence_for(ops_dsn, inc.resource_id, inc.type)
        if silence is not None:
            return GateDecision("hold", f"silenced, automation stays off {resource}: {silence.describe()}",
                                silence.held_by, {"silence_id": silence.id})

    g = get_breaker(ops_dsn, GLOBAL)
    if not g.closed:
        return GateDecision("hold", f"global breaker is {g.state} {_since(g)}: {g.reason}", GLOBAL)

    b = get_breaker(ops_dsn, pb_name)
    if b.state == "open":
        return GateDecision("hold", f"breaker {pb_name} is open {_since(b)}: {b.reason}", pb_name)

    override = get_override(ops_dsn, playbook.type)
    if limits.mode == "shadow" or override is not None:
        return _shadow(ops_dsn, redis_url, inc, playbook, b, resource, run_id=run_id, cfg=cfg, override=override)

    if not manual:
        hit = last_automated_action(ops_dsn, inc.resource_id, inc.type, within=limits.resource_cooldown,
                                    exclude_run_id=run_id)
        if hit is not None:
            return GateDecision("escalate", cooldown_reason(hit, limits.resource_cooldown, inc.type), None, {
                "cooldown": True, "last_action_incident_id": hit.incident_id, "last_action_run_id": hit.run_id,
                "last_action": hit.action, "last_action_at": hit.at,
                "resource_cooldown_s": limits.resource_cooldown.total_seconds(),
            })

    if b.state == "half_open":
        if dry_run:
            ok = b.probe_incident_id in (None, inc.id)
            return GateDecision("proceed" if ok else "hold",
                                f"would {'be the probe of' if ok else 'wait for the probe of'} half-open {pb_name}",
                                None if ok else pb_name)
        admitted, b = admit_probe(ops_dsn, pb_name, inc.id, actor=actor)
        if admitted:
            return GateDecision("proceed", f"breaker {pb_name} is half-open and lets this run test the water as its "
                                           "one probe: its outcome closes the breaker (resolved) or opens it again (escalated)",
                                None, {"probe": True})
        if b.state != "closed":
            return GateDecision("hold", f"breaker {pb_name} is {b.state}; incident {b.probe_incident_id} is its "
                                        "one probe run, waiting for its outcome", pb_name)
        # Closed meanwhile (the probe resolved): fall through to the window like any run.

    limit = limits.max_actions_per_hour
    try:
        client = redis_client(redis_url, cfg.redis_timeout)
        if dry_run:
            n = window_count(client, pb_name, since=b.window_since, window=cfg.action_window)
            ok = n < limit
            return GateDecision("proceed" if ok else "hold",
                                f"would {'proceed' if ok else 'trip ' + pb_name}: {n} of at most {limit} runs "
                                f"of playbook_{playbook.type} in the last hour", None if ok else pb_name)
        window = reserve_action(client, ops_dsn, pb_name, window_member(inc.id, run_id), limit=limit,
                                since=b.window_since, window=cfg.action_window)
    except RedisUnavailable as exc:
        return _fail_closed(ops_dsn, redis_url, exc, actor=actor, incident=inc, dry_run=dry_run)
    if window.admitted:
        checked = ("a human's run: silences and the resource cooldown do not apply" if manual else
                   f"no silence, no action on {resource} within the {limits.resource_cooldown} cooldown")
        return GateDecision(
            "proceed",
            f"admitted: run {window.count} of at most {limit} of playbook_{playbook.type} in the last hour; "
            f"no breaker open; {checked}",
            None, {"window_count": window.count, "window_limit": limit, "manual": manual},
        )
    reason = (f"max_actions_per_hour reached: {window.count} runs of playbook_{playbook.type} already acted in the "
              f"last hour (limit {limit}); breaker {pb_name} trips and holds its incidents")
    change = trip(ops_dsn, pb_name, actor=actor, reason=reason, cooldown=cfg.breaker_cooldown,
                  data={"window_count": window.count, "window_limit": limit, "incident_id": inc.id})
    why = reason if change.changed else f"breaker {pb_name} is open: {change.breaker.reason}"
    return GateDecision("hold", why, pb_name, {"window_count": window.count, "window_limit": limit,
                                               "tripped": change.changed, "trip_event_id": change.event_id})


def _shadow(ops_dsn: str, redis_url: str, inc: Incident, playbook: Playbook, b: Breaker, resource: str, *,
            run_id: str, cfg: SafetyConfig, override: ModeOverride | None = None) -> GateDecision:
    """Shadow mode: record what would be done (and whether anything would have stopped it), then escalate."""
    limits = playbook.limits
    path, terminal = happy_path(playbook)
    would, why_not = "act", ""
    hit = last_automated_action(ops_dsn, inc.resource_id, inc.type, within=limits.resource_cooldown,
                                exclude_run_id=run_id)
    if hit is not None:
        would, why_not = "escalate", cooldown_reason(hit, limits.resource_cooldown, inc.type)
    elif b.state == "half_open" and b.probe_incident_id not in (None, inc.id):
        would, why_not = "hold", f"breaker {b.name} is half-open with probe incident {b.probe_incident_id}"
    else:
        try:
            n = window_count(redis_client(redis_url, cfg.redis_timeout), b.name, since=b.window_since,
                             window=cfg.action_window)
            if n >= limits.max_actions_per_hour:
                would, why_not = "hold", f"{n} runs in the last hour: max_actions_per_hour {limits.max_actions_per_hour}"
        except RedisUnavailable as exc:
            would, why_not = "hold", f"Redis unreachable ({exc})"
    plan = " -> ".join([*path, terminal])
    if would == "act":
        said = f"would run {plan} on {resource}"
    else:
        said = f"would not act on {resource} ({would}: {why_not}); its plan is {plan}"
    why_shadow = "limits.mode: shadow" if limits.mode == "shadow" or override is None else override.describe()
    return GateDecision(
        "escalate",
        f"shadow mode ({why_shadow}): {said}; escalating as if no automation existed",
        None,
        {"shadow": True, "would": would, "would_resolve": would == "act" and terminal == "resolve",
         "plan": path, "plan_terminal": terminal, **({"would_not_because": why_not} if why_not else {}),
         **({"shadow_by": override.actor} if override is not None and limits.mode != "shadow" else {})},
    )


def hold_incident(store: IncidentStore, incident_id: int, *, run_id: str, actor: str, reason: str,
                  held_by: str | None) -> Incident:
    """remediating -> held, fenced by the run's claim; `held_by` says what must clear to release it."""
    return store.transition(
        incident_id, "held", actor=actor, reason=reason, expected_state="remediating", expected_run_id=run_id,
        owner_run_id=None, data={"run_id": run_id, "held_by": held_by or GLOBAL},
    )


def record_action(client: Any, ops_dsn: str, incident: Incident, run_id: str, *,
                  window: timedelta = timedelta(hours=1)) -> int:
    """Count an action that is about to happen in its playbook's window (idempotent per run).

    The gate already reserved the run's slot; this makes sure it is there even if Redis restarted
    empty since (the window is then rebuilt from the ops DB). Returns the window's count. Raises
    `RedisUnavailable`.
    """
    name = playbook_breaker(incident.type)
    b = get_breaker(ops_dsn, name)
    result = reserve_action(client, ops_dsn, name, window_member(incident.id, run_id), limit=-1,
                            since=b.window_since, window=window)
    return result.count


@dataclass(frozen=True)
class ActionPermit:
    """May this step act now? `outcome`: act, hold or escalate; `reason` says why, for the audit trail."""

    allowed: bool
    outcome: str
    reason: str
    held_by: str | None = None
    lease: Lease | None = None
    data: dict[str, Any] = field(default_factory=dict)


def _admitted_before_window_trip(ops_dsn: str, b: Breaker, incident_id: int, run_id: str) -> bool:
    """Does this run keep the slot its gate reserved, although the breaker is open?

    Only when the breaker was tripped by its action window filling up (`max_actions_per_hour`): the
    window holds at most `limit` slots, so the runs admitted into it are within the limit, and the trip
    is for the runs after them. A trip by a human, or one re-opened by a failed half-open probe, stops
    every run that has not acted yet.
    """
    from fleetmedic.db.connect import connection

    if b.trip_event_id is None:
        return False
    with connection(ops_dsn) as conn:
        trip_row = conn.execute("SELECT data ? 'window_limit' AND actor NOT LIKE 'human:%%' AS window_trip "
                                "FROM breaker_events WHERE id = %s", (b.trip_event_id,)).fetchone()
        if not trip_row or not trip_row["window_trip"]:
            return False
        admitted = conn.execute(
            "SELECT 1 FROM incident_events WHERE incident_id = %s AND step = 'gate' AND data->>'run_id' = %s "
            "AND data->>'gate' = 'proceed' AND NOT coalesce((data->>'probe')::boolean, false) "
            "AND at >= coalesce(%s, '-infinity'::timestamptz) LIMIT 1",
            (incident_id, run_id, b.window_since)).fetchone()
    return admitted is not None


def _permit(ops_dsn: str, redis_url: str, inc: Incident, *, run_id: str, step: str, action: str, actor: str,
            ttl: timedelta, cfg: SafetyConfig) -> tuple[ActionPermit, Any]:
    g = get_breaker(ops_dsn, GLOBAL)
    if not g.closed:
        return ActionPermit(False, "hold", f"not running {action}: global breaker is {g.state} {_since(g)}: {g.reason}",
                            GLOBAL), None
    name = playbook_breaker(inc.type)
    b = get_breaker(ops_dsn, name)
    slot_kept = b.state == "open" and _admitted_before_window_trip(ops_dsn, b, inc.id, run_id)
    if (b.state == "open" and not slot_kept) or (b.state == "half_open" and b.probe_incident_id != inc.id):
        return ActionPermit(False, "hold", f"not running {action}: breaker {name} is {b.state} {_since(b)}: "
                                           f"{b.reason}", name), None
    override = get_override(ops_dsn, inc.type)
    if override is not None:
        return ActionPermit(False, "escalate", f"not running {action}: playbook_{inc.type} was {override.describe()}; "
                                               "escalating as if no automation existed", None,
                            data={"shadow": True, "shadow_by": override.actor}), None
    client = redis_client(redis_url, cfg.redis_timeout)
    owner = f"incident-{inc.id}/{run_id}/{step}"
    try:
        cm = hold_lease(client, inc.resource_id, owner=owner, ttl=ttl, wait=cfg.lease_wait)
        lease = cm.__enter__()
    except LeaseBusy as exc:
        return ActionPermit(False, "escalate", f"not running {action}: {exc}", None,
                            data={"lease_holder": exc.holder}), None
    except RedisUnavailable as exc:
        decision = _fail_closed(ops_dsn, redis_url, exc, actor=actor, incident=inc, dry_run=False)
        return ActionPermit(False, "hold", f"not running {action}: {decision.reason}", GLOBAL, data=decision.data), None
    try:
        count = record_action(client, ops_dsn, inc, run_id, window=cfg.action_window)
    except RedisUnavailable as exc:
        try:
            release_lease(client, lease)
        except RedisUnavailable:
            pass
        decision = _fail_closed(ops_dsn, redis_url, exc, actor=actor, incident=inc, dry_run=False)
        return ActionPermit(False, "hold", f"not running {action}: {decision.reason}", GLOBAL, data=decision.data), None
    return ActionPermit(True, "act", f"holding the lease on resource {inc.resource_id} ({lease.token}); "
                                     f"action {count} of playbook_{inc.type} in the last hour",
                        lease=lease, data={"lease": lease.token, "window_count": count}), cm


@contextmanager
def action_permit(
    ops_dsn: str,
    redis_url: str,
    incident: Incident,
    *,
    run_id: str,
    step: str,
    action: str,
    actor: str,
    ttl: timedelta = timedelta(minutes=10),
    config: SafetyConfig | None = None,
) -> Iterator[ActionPermit]:
    """Check again right before acting, and hold the resource's lease while the block acts.

    Refused (`allowed` False) when a breaker opened since the gate (hold), when Redis is unreachable
    (fail closed: the global breaker trips, one page; hold), or when another action keeps the lease
    past `lease_wait` (escalate). Allowed: the action is counted in the window and the lease is
    released, by its token, when the block ends.
    """
    cfg = config or SafetyConfig.from_env()
    permit, lease_cm = _permit(ops_dsn, redis_url, incident, run_id=run_id, step=step, action=action, actor=actor,
                               ttl=ttl, cfg=cfg)
    try:
        yield permit
    finally:
        if lease_cm is not None:
            lease_cm.__exit__(None, None, None)
