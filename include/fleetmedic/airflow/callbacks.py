"""Failure callbacks: any exception or timeout escalates the incident and pages a human, once."""

from __future__ import annotations

import logging
import os
from typing import Any

from fleetmedic.airflow.connections import ops_dsn

__all__ = ["page_details", "page_on_dag_failure", "page_on_failure", "run_url"]

log = logging.getLogger(__name__)


def run_url(dag_id: str, run_id: str) -> str:
    base = os.environ.get("AIRFLOW__API__BASE_URL", "http://localhost:8080").rstrip("/")
    return f"{base}/dags/{dag_id}/runs/{run_id}"


def page_details(context: Any, store: Any, incident_id: int) -> dict[str, Any]:
    """What the page says beyond its summary: where, what failed, what automation already tried."""
    ti = context.get("ti")
    dag_run = context.get("dag_run")
    dag_id = getattr(ti, "dag_id", None) or getattr(dag_run, "dag_id", "")
    run_id = getattr(ti, "run_id", None) or getattr(dag_run, "run_id", "")
    tried = [
        f"{ev.at:%H:%M:%S} {ev.step or ev.to_state}: {ev.reason}"
        for ev in store.events(incident_id)
        if ev.step or ev.from_state
    ]
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "task_id": getattr(ti, "task_id", None),
        "run_url": run_url(dag_id, run_id) if dag_id and run_id else None,
        "tried": tried,
    }


def _incident_id(context: Any) -> int | None:
    dag_run = context.get("dag_run")
    conf = (getattr(dag_run, "conf", None) or {}) if dag_run is not None else {}
    params = context.get("params") or {}
    value = conf.get("incident_id", params.get("incident_id"))
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _escalate_or_page(context: Any, *, what: str, task_id: str | None) -> None:
    from fleetmedic.incidents.store import IncidentStore
    from fleetmedic.pager.outbox import enqueue_page

    ti = context.get("ti")
    dag_run = context.get("dag_run")
    dag_id = getattr(ti, "dag_id", None) or getattr(dag_run, "dag_id", "unknown")
    run_id = getattr(ti, "run_id", None) or getattr(dag_run, "run_id", "unknown")
    store = IncidentStore(ops_dsn())
    incident_id = _incident_id(context)
    actor = f"automation:{dag_id}/{task_id or 'dagrun'}"
    if incident_id is not None:
        try:
            incident = store.get(incident_id)
        except Exception:  # the incident does not exist: page about the run instead
            incident = None
        if incident is not None:
            if incident.state == "remediating" and incident.owner_run_id not in (None, run_id):
                log.warning("incident %s is owned by run %s, not %s: not escalating from here",
                            incident_id, incident.owner_run_id, run_id)
                return
            step = incident.step if incident.owner_run_id == run_id else None
            store.escalate(incident_id, actor=actor, reason=what, step=step or task_id,
                           details=page_details(context, store, incident_id))
            return
    import psycopg

    with psycopg.connect(ops_dsn()) as conn:
        enqueue_page(
            conn, incident_id=None, dedup_key=f"fleetmedic-run-{dag_id}-{run_id}-{task_id or 'dagrun'}",
            summary=f"[fleetmedic] {dag_id} failed: {what}",
            details={"dag_id": dag_id, "run_id": run_id, "task_id": task_id, "run_url": run_url(dag_id, run_id)},
        )


def page_on_failure(context: Any) -> None:
    """Task failure callback: exceptions and execution/sensor timeouts wake a human."""
    from fleetmedic.airflow.errors import RunRefused

    ti = context.get("ti")
    exc = context.get("exception")
    if isinstance(exc, RunRefused):
        log.warning("run refused, nobody paged: %s", exc)
        return
    task_id = getattr(ti, "task_id", None)
    what = f"task {task_id} failed: {type(exc).__name__}: {exc}" if exc else f"task {task_id} failed"
    try:
        _escalate_or_page(context, what=what, task_id=task_id)
    except Exception:
        # The callback must never hide the original failure; the log is the page of last resort.
        log.exception("fleetmedic could not record the page for %s", what)


def _refused_or_dry(context: Any) -> bool:
    """A dry run never pages; nor does a manual run that was refused before it claimed anything."""
    from fleetmedic.incidents.store import IncidentStore

    dag_run = context.get("dag_run")
    conf = (getattr(dag_run, "conf", None) or {}) if dag_run is not None else {}
    if conf.get("dry_run"):
        return True
    incident_id = _incident_id(context)
    if incident_id is None or not conf.get("reason"):
        return False
    run_id = getattr(dag_run, "run_id", None)
    events = IncidentStore(ops_dsn()).events(incident_id)
    return not any((ev.data or {}).get("run_id") == run_id for ev in events)


def page_on_dag_failure(context: Any) -> None:
    """DAG failure callback (e.g. dagrun_timeout): escalate and page like a task failure."""
    reason = context.get("reason") or "dag run failed"
    dag_run = context.get("dag_run")
    what = f"run {getattr(dag_run, 'run_id', '?')} failed: {reason}"
    try:
        if _refused_or_dry(context):
            log.warning("%s: a refused or dry run; nobody paged", what)
            return
        _escalate_or_page(context, what=what, task_id=None)
    except Exception:
        log.exception("fleetmedic could not record the page for %s", what)
