"""Human overrides of automation, each an audited incident event with actor `human:<name>` and a reason.

ack (annotate: a human owns it now), ignore until a time, resolve, and retry (start the playbook
again through Airflow's REST API, with Params). Breakers and silences have their own modules.
"""

from __future__ import annotations

import getpass
import os
from datetime import UTC, datetime
from typing import Any

from fleetmedic.incidents.store import Incident, IncidentEvent, IncidentStore
from fleetmedic.playbooks.schema import parse_duration

__all__ = ["OverrideError", "acknowledge", "human_actor", "ignore", "parse_until", "resolve", "retry", "retry_run_id"]


class OverrideError(ValueError):
    """The override does not apply to the incident as it is; the message says why and what to do."""


def human_actor(name: str | None = None) -> str:
    """`human:<name>`: `name`, else $FLEETMEDIC_USER, else the OS user."""
    who = (name or os.environ.get("FLEETMEDIC_USER") or getpass.getuser() or "").strip()
    if not who:
        raise OverrideError("who are you? set FLEETMEDIC_USER (overrides are audited with a human's name)")
    return f"human:{who}"


def _need_reason(reason: str, what: str) -> str:
    if not reason or not reason.strip():
        raise OverrideError(f"{what} needs a reason (--reason '...'): every override is audited")
    return reason.strip()


def parse_until(value: str, *, now: datetime | None = None) -> datetime:
    """A duration from now ('2h', '1d') or an ISO date-time ('2026-05-01T08:00', local time if no offset)."""
    now = now or datetime.now(UTC)
    try:
        return now + parse_duration(value)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise OverrideError(f"--until {value!r}: give a duration (2h, 1d) or an ISO date-time "
                            "(2026-05-01T08:00+00:00)") from None
    when = when if when.tzinfo else when.astimezone()
    if when <= now:
        raise OverrideError(f"--until {value!r} is in the past")
    return when


def _active(store: IncidentStore, incident_id: int) -> Incident:
    incident = store.get(incident_id)
    if incident.final:
        raise OverrideError(f"incident {incident_id} is {incident.state}: nothing to override")
    return incident


def acknowledge(dsn: str, incident_id: int, *, actor: str, reason: str) -> IncidentEvent:
    """Record that a human owns the incident now (no state change; automation's own rules still apply)."""
    why = _need_reason(reason, "ack")
    store = IncidentStore(dsn)
    incident = _active(store, incident_id)
    return store.note(incident_id, actor=actor, reason=f"acknowledged by {actor}: {why}",
                      data={"ack": True, "state": incident.state.value})


def ignore(dsn: str, incident_id: int, *, actor: str, reason: str, until: datetime) -> Incident:
    """Ignore the incident until `until`: re-detections only refresh it, automation leaves it alone."""
    why = _need_reason(reason, "ignore")
    store = IncidentStore(dsn)
    incident = _active(store, incident_id)
    if incident.state in ("remediating", "await_resolution"):
        raise OverrideError(f"incident {incident_id} is {incident.state} (run {incident.owner_run_id}): resolve it, "
                            "or wait for the run to end, before ignoring it")
    return store.transition(incident_id, "ignored", actor=actor, ignored_until=until,
                            reason=f"ignored until {until:%Y-%m-%d %H:%M %Z}: {why}")


def resolve(dsn: str, incident_id: int, *, actor: str, reason: str) -> Incident:
    """A human says it is fixed: resolved (a page sent for it resolves too)."""
    why = _need_reason(reason, "resolve")
    store = IncidentStore(dsn)
    incident = store.get(incident_id)
    if incident.state == "ignored":
        raise OverrideError(f"incident {incident_id} is ignored: it is closed already")
    return store.resolve(incident_id, actor=actor, reason=f"resolved by {actor}: {why}")


def retry_run_id(incident_id: int, attempt: int) -> str:
    return f"incident-{incident_id}-retry-{attempt}"


def retry(
    dsn: str, client: Any, incident_id: int, *, actor: str, reason: str, start_at: str | None = None,
    dry_run: bool = False, attempts: int = 20,
) -> dict[str, Any]:
    """Start the incident's playbook again (run `incident-<id>-retry-<n>`, conf with the reason and who).

    Allowed for open, held and escalated incidents: the run's claim takes a held or escalated one
    because the run carries a human's reason, and its gate lets it past silences and the cooldown
    (breakers still apply). `client` is an `AirflowClient`. Returns the DAG run.
    """
    from fleetmedic.airflow_api import AirflowApiError

    why = _need_reason(reason, "retry")
    store = IncidentStore(dsn)
    incident = _active(store, incident_id)
    if incident.state in ("remediating", "await_resolution"):
        raise OverrideError(f"incident {incident_id} is {incident.state}: run {incident.owner_run_id} owns it; "
                            "wait for it to end (or resolve the incident) before retrying")
    if incident.state == "ignored":
        raise OverrideError(f"incident {incident_id} is ignored")
    earlier = sum(1 for ev in store.events(incident_id) if (ev.data or {}).get("retry"))
    # The run's claim records the re-opening as human:<requested_by>.
    conf: dict[str, Any] = {"incident_id": incident_id, "reason": why, "requested_by": actor.removeprefix("human:")}
    if start_at:
        conf["start_at"] = start_at
    if dry_run:
        conf["dry_run"] = True
    dag_id = f"playbook_{incident.type}"
    for attempt in range(earlier + 1, earlier + 1 + attempts):
        run_id = retry_run_id(incident_id, attempt)
        try:
            run = client.trigger(dag_id, run_id=run_id, conf=conf, note=f"retry by {actor}: {why}")
        except AirflowApiError as exc:
            if exc.status_code == 409:  # that run id exists already (an earlier retry): take the next
                continue
            raise
        store.note(incident_id, actor=actor, reason=f"retry requested by {actor}: {why} (run {run_id})",
                   data={"retry": attempt, "retry_run_id": run_id, "dag_id": dag_id, "start_at": start_at,
                         "dry_run": dry_run})
        return dict(run)
    raise OverrideError(f"incident {incident_id}: runs {retry_run_id(incident_id, earlier + 1)} to "
                        f"{retry_run_id(incident_id, earlier + attempts)} all exist already")
