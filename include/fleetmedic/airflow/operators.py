"""Playbook tasks: claim the incident, re-confirm, run steps as branches, and end at a terminal.

Every decision returns and records a human-readable reason (Patroni style), and every state change
goes through the incident store's one transition function. The incident's claim is the fence: a
step acts only while its run owns the incident, and a retried step never acts twice.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.branch import BaseBranchOperator, BranchMixIn
from airflow.sdk import BaseOperator, BaseSensorOperator
from airflow.sdk.exceptions import AirflowSkipException

from fleetmedic.airflow.connections import OPS_CONN_ID, ops_dsn
from fleetmedic.airflow.errors import RunRefused
from fleetmedic.airflow.triggers import WaitHealthyTrigger

__all__ = [
    "ActionStepOperator",
    "ClaimIncidentOperator",
    "ReconfirmOperator",
    "TerminalOperator",
    "WaitHealthySensor",
]


def incident_id_from(context: Any) -> int:
    params = context.get("params") or {}
    dag_run = context.get("dag_run")
    conf = (getattr(dag_run, "conf", None) or {}) if dag_run is not None else {}
    value = conf.get("incident_id", params.get("incident_id"))
    if value in (None, ""):
        raise ValueError("this playbook run has no incident_id: trigger it with conf {\"incident_id\": <id>}")
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"incident_id must be an integer, got {value!r}") from exc


def resource_target(resource: Any, primary: Any = None) -> Any:
    """The probe's view of an inventory resource, as the sweep builds it (detection/sweep.py load_targets):
    server details under attrs['server'], a follower's primary under attrs['primary']."""
    from fleetmedic.detection.checks import Target

    attrs = dict(resource.attrs)
    attrs["role"] = resource.role
    if primary is not None:
        attrs["primary"] = {"name": primary.name, "host": primary.host, "port": primary.port}
    if resource.server is not None:
        attrs["server"] = {"name": resource.server.name, "provider": resource.server.provider,
                           "address": resource.server.address, "attrs": dict(resource.server.attrs)}
    return Target(resource.id, resource.name, resource.kind, resource.host, resource.port, attrs)


def run_param(context: Any, name: str, default: Any = None) -> Any:
    params = context.get("params") or {}
    dag_run = context.get("dag_run")
    conf = (getattr(dag_run, "conf", None) or {}) if dag_run is not None else {}
    return conf.get(name, params.get(name, default))


class _IncidentTask:
    """Shared helpers for tasks that act on the incident a playbook run owns."""

    conn_id: str = OPS_CONN_ID

    def _store(self) -> Any:
        from fleetmedic.incidents.store import IncidentStore

        return IncidentStore(ops_dsn(self.conn_id))

    @staticmethod
    def _actor(context: Any) -> str:
        ti = context["ti"]
        return f"automation:{ti.dag_id}/{ti.task_id}"

    @staticmethod
    def _run_id(context: Any) -> str:
        return str(context["ti"].run_id)

    def _target(self, resource: Any) -> Any:
        """The probe target for a resource, with its primary when it is a follower."""
        primary = None
        if resource.primary_id is not None:
            import psycopg

            from fleetmedic.inventory import get_resource

            with psycopg.connect(ops_dsn(self.conn_id)) as conn:
                primary = get_resource(conn, int(resource.primary_id))
        return resource_target(resource, primary)

    def _resource(self, incident: Any) -> Any:
        import psycopg

        from fleetmedic.inventory import get_resource

        with psycopg.connect(ops_dsn(self.conn_id)) as conn:
            return get_resource(conn, int(incident.resource_id))

    @staticmethod
    def _dry_run(context: Any) -> bool:
        return bool(run_param(context, "dry_run", False))

    def _record(self, store: Any, incident_id: int, context: Any, *, step: str, reason: str,
                data: dict[str, Any]) -> None:
        """Record a step's decision: a fenced step transition, or in a dry run a note that changes nothing."""
        run_id = self._run_id(context)
        if self._dry_run(context):
            store.note(incident_id, actor=self._actor(context), reason=f"dry run: {reason}", step=step,
                       data={**data, "run_id": run_id, "dry_run": True})
        else:
            store.set_step(incident_id, run_id=run_id, step=step, actor=self._actor(context), reason=reason,
                           data={**data, "run_id": run_id})

    @staticmethod
    def _expected_next(store: Any, incident_id: int, run_id: str) -> str | None:
        """The task this run's latest decision pointed to (the recorded state machine)."""
        latest = None
        for ev in store.events(incident_id):
            data = ev.data or {}
            if data.get("run_id") == run_id and data.get("next"):
                latest = str(data["next"])
        return latest

    def _skip_unless_my_turn(self, store: Any, incident_id: int, context: Any) -> None:
        """Branch joins can wake a task whose path was not taken; the recorded decision is the truth."""
        task_id = context["ti"].task_id
        expected = self._expected_next(store, incident_id, self._run_id(context))
        if expected != task_id:
            raise AirflowSkipException(f"this run's last decision went to {expected!r}, not {task_id!r}")

    @staticmethod
    def _step_record(store: Any, incident_id: int, run_id: str, step: str) -> dict[str, Any] | None:
        """The latest record this run made for `step` (acting or done), or None."""
        latest = None
        for ev in store.events(incident_id):
            data = ev.data or {}
            if ev.step == step and data.get("run_id") == run_id and data.get("step_status"):
                latest = data
        return latest


class ClaimIncidentOperator(BaseOperator, _IncidentTask):
    """Move the incident to remediating, owned by this run. Refuses incidents no run may take."""

    ui_color = "#fde68a"

    def __init__(self, *, playbook_type: str, conn_id: str = OPS_CONN_ID, **kwargs: Any):
        super().__init__(**kwargs)
        self.playbook_type = playbook_type
        self.conn_id = conn_id

    def execute(self, context: Any) -> dict[str, Any]:
        from fleetmedic.incidents.lifecycle import IllegalTransition, IncidentNotFound

        store = self._store()
        incident_id = incident_id_from(context)
        try:
            incident = store.get(incident_id)
        except IncidentNotFound as exc:
            raise RunRefused(f"incident {incident_id} does not exist; check `fleetmedic incidents list`") from exc
        if incident.type != self.playbook_type:
            raise RunRefused(
                f"incident {incident_id} is of type '{incident.type}', but this is the '{self.playbook_type}' playbook; "
                f"run playbook_{incident.type} instead"
            )
        manual_reason = run_param(context, "reason") or ""
        who = run_param(context, "requested_by") or ""
        reason = f"claimed by run {self._run_id(context)}"
        if manual_reason:
            reason += f" (manual: {manual_reason}{', by ' + who if who else ''})"
        allowed = ("open", "held", "escalated") if manual_reason or run_param(context, "manual") else ("open",)
        if incident.state not in allowed:
            raise RunRefused(
                f"refusing to run playbook_{self.playbook_type} for incident {incident_id}: it is "
                f"{incident.state}, and a run may only take an incident that is {' or '.join(allowed)}"
                + ("" if manual_reason else " (a manual run with a reason may also take held or escalated ones)")
            )
        if self._dry_run(context):
            store.note(incident_id, actor=self._actor(context), step="claim",
                       reason=f"dry run: would claim the incident ({reason}); nothing will be changed",
                       data={"run_id": self._run_id(context), "dry_run": True})
            return {"incident_id": incident_id, "version": incident.version, "dry_run": True}
        try:
            if incident.state == "open":
                claimed = store.claim(incident_id, run_id=self._run_id(context), actor=self._actor(context),
                                      reason=reason, from_states=("open",))
            else:
                claimed = self._reopen_and_claim(store, incident, context, reason, manual_reason, who)
        except IllegalTransition as exc:
            raise RunRefused(
                f"refusing to run playbook_{self.playbook_type} for incident {incident_id}: it is "
                f"{incident.state}, and a run may only claim an incident that is {' or '.join(allowed)} ({exc})"
            ) from exc
        self.log.info("incident %s claimed: %s", incident_id, reason)
        return {"incident_id": incident_id, "version": claimed.version, "resource_id": claimed.resource_id}


    def _reopen_and_claim(self, store: Any, incident: Any, context: Any, reason: str, manual_reason: str,
                          who: str) -> Any:
        """A human's retry of a held or escalated incident: held/escalated -> open -> remediating, atomically.

        Both transitions commit together, so the sweep never sees the incident open and starts a
        second run for it.
        """
        import psycopg

        actor = f"human:{who}" if who else self._actor(context)
        with psycopg.connect(ops_dsn(self.conn_id)) as conn:
            store.transition(incident.id, "open", actor=actor, expected_version=incident.version,
                             reason=f"manual run {self._run_id(context)} requested: {manual_reason}", conn=conn)
            claimed = store.claim(incident.id, run_id=self._run_id(context), actor=self._actor(context),
                                  reason=reason, from_states=("open",), conn=conn)
        return claimed


class ReconfirmOperator(BaseBranchOperator, _IncidentTask):
    """Probe once more before acting: healthy now means a transient fault, resolved without action."""

    ui_color = "#bfdbfe"

    def __init__(self, *, checks_by_kind: dict[str, str], first_step: str, steps: list[str],
                 probe_timeout: float = 5.0, entry_task_ids: dict[str, str] | None = None,
                 conn_id: str = OPS_CONN_ID, **kwargs: Any):
        super().__init__(**kwargs)
        # Where each step starts: its own task, or the approval task in front of it.
        self.entry_task_ids = entry_task_ids or {}
        self.checks_by_kind = checks_by_kind
        self.first_step = first_step
        self.steps = steps
        self.probe_timeout = probe_timeout
        self.conn_id = conn_id

    def choose_branch(self, context: Any) -> str:
        from fleetmedic.detection.checks import run_one

        store = self._store()
        incident_id = incident_id_from(context)
        start_at = run_param(context, "start_at") or ""
        if start_at:
            if start_at not in self.steps:
                raise ValueError(f"start_at '{start_at}' is not a step of this playbook (steps: {', '.join(self.steps)})")
            self._record(store, incident_id, context, step="reconfirm",
                         reason=f"operator asked to start at step '{start_at}'; skipping re-confirm",
                         data={"step_status": "done", "next": self._entry(start_at)})
            return self._entry(start_at)
        incident = store.get(incident_id)
        resource = self._resource(incident)
        check = self.checks_by_kind.get(resource.kind)
        if not check:
            reason = f"no detect check for a {resource.kind} resource; starting at '{self.first_step}'"
            self._record(store, incident_id, context, step="reconfirm", reason=reason,
                         data={"step_status": "done", "next": self._entry(self.first_step)})
            return self._entry(self.first_step)
        target = self._target(resource)
        result = asyncio.run(run_one(target, check, self.probe_timeout))
        if result.healthy:
            reason = f"healthy on re-confirm ({check}: {result.reason}); transient, no action taken"
            nxt = "resolve"
        else:
            reason = f"still failing on re-confirm ({check}: {result.reason}); starting at '{self.first_step}'"
            nxt = self._entry(self.first_step)
        self._record(store, incident_id, context, step="reconfirm", reason=reason,
                     data={"step_status": "done", "healthy": result.healthy, "next": nxt})
        self.log.info(reason)
        return nxt

    def _entry(self, step: str) -> str:
        return self.entry_task_ids.get(step, f"step_{step}")


class ActionStepOperator(BaseBranchOperator, _IncidentTask):
    """Run one remediation action, record its reason, and follow `next.ok` or `next.error`."""

    ui_color = "#fecaca"

    def __init__(self, *, step: str, action: str, next_ok: str, next_error: str,
                 step_params: dict[str, Any] | None = None, conn_id: str = OPS_CONN_ID, **kwargs: Any):
        super().__init__(**kwargs)
        self.step = step
        self.action = action
        self.next_ok = next_ok
        self.next_error = next_error
        self.step_params = step_params or {}
        self.conn_id = conn_id

    def choose_branch(self, context: Any) -> str:
        from fleetmedic.actions.base import ActionContext
        from fleetmedic.actions.registry import ACTIONS

        store = self._store()
        incident_id = incident_id_from(context)
        run_id = self._run_id(context)
        actor = self._actor(context)
        record = self._step_record(store, incident_id, run_id, self.step)
        if record and record.get("step_status") == "done":
            # A retried or cleared task: the action already ran in this run; follow its recorded outcome.
            self.log.info("step %s already ran in this run (%s); not acting twice", self.step, record.get("reason"))
            return str(record["next"])
        if record and record.get("step_status") == "acting":
            reason = (f"step '{self.step}' was interrupted while running {self.action} in an earlier try; "
                      "its outcome is unknown, so automation will not act again")
            store.set_step(incident_id, run_id=run_id, step=self.step, actor=actor, reason=reason,
                           data={"run_id": run_id, "step_status": "done", "outcome": "error",
                                 "next": "escalate"})
            return "escalate"
        self._skip_unless_my_turn(store, incident_id, context)
        incident = store.get(incident_id)
        resource = self._resource(incident)
        spec = ACTIONS[self.action]
        dry_run = self._dry_run(context)
        if dry_run:
            self._record(store, incident_id, context, step=self.step,
                         reason=f"would run {spec.name} on {resource.name} ({spec.description}); "
                                f"assuming it works, next {self.next_ok}",
                         data={"step_status": "done", "action": self.action, "outcome": "ok",
                               "next": self.next_ok})
            return self.next_ok
        from fleetmedic.airflow.connections import redis_url
        from fleetmedic.safety.gate import action_permit

        # The second belt (safety/gate.py): breakers checked again, the resource's Redis lease held
        # while acting, the action counted; a refusal holds or escalates, Redis gone fails closed.
        with action_permit(ops_dsn(self.conn_id), redis_url(), incident, run_id=run_id, step=self.step,
                           action=self.action, actor=actor,
                           ttl=(self.execution_timeout or timedelta(minutes=5)) + timedelta(minutes=1)) as permit:
            if not permit.allowed:
                store.set_step(incident_id, run_id=run_id, step=self.step, actor=actor, reason=permit.reason,
                               data={**permit.data, "run_id": run_id, "step_status": "done",
                                     "outcome": permit.outcome, "held_by": permit.held_by, "next": permit.outcome})
                self.log.info("step %s: %s -> %s", self.step, permit.reason, permit.outcome)
                return permit.outcome
            # Take the fence before acting: this CAS fails if another run took the incident.
            store.set_step(incident_id, run_id=run_id, step=self.step, actor=actor,
                           reason=f"{'would run' if dry_run else 'running'} {spec.name} on {resource.name}",
                           data={"run_id": run_id, "step_status": "acting", "action": self.action,
                                 "dry_run": dry_run})
            ctx = ActionContext(incident_id=incident_id, incident_type=incident.type, resource=resource,
                                ops_dsn=ops_dsn(self.conn_id), dry_run=dry_run, params=self.step_params)
            started = time.monotonic()
            result = spec.fn(ctx)
        nxt = self.next_ok if result.ok else self.next_error
        store.set_step(incident_id, run_id=run_id, step=self.step, actor=actor, reason=result.reason,
                       data={"run_id": run_id, "step_status": "done", "action": self.action,
                             "outcome": "ok" if result.ok else "error", "next": nxt,
                             "seconds": round(time.monotonic() - started, 2), **result.data})
        self.log.info("step %s: %s -> %s", self.step, result.reason, nxt)
        return nxt


class WaitHealthySensor(BaseSensorOperator, BranchMixIn, _IncidentTask):
    """Wait (deferred, no worker slot held) until the check passes; branch to `next.healthy` or `next.timeout`."""

    ui_color = "#bbf7d0"

    def __init__(self, *, step: str, check: str, next_healthy: str, next_timeout: str, step_timeout: timedelta,
                 interval: float = 3.0, conn_id: str = OPS_CONN_ID, **kwargs: Any):
        # The trigger ends at the step deadline and branches to next.timeout; the sensor timeout is
        # only the backstop (it fails the task, which pages).
        kwargs.setdefault("timeout", step_timeout + timedelta(minutes=2))
        kwargs.setdefault("execution_timeout", step_timeout + timedelta(minutes=2))
        super().__init__(**kwargs)
        self.step = step
        self.check = check
        self.next_healthy = next_healthy
        self.next_timeout = next_timeout
        self.step_timeout = step_timeout
        self.interval = interval
        self.conn_id = conn_id

    def poke(self, context: Any) -> bool:  # pragma: no cover - this sensor always defers
        raise NotImplementedError("WaitHealthySensor always defers")

    def execute(self, context: Any) -> None:
        store = self._store()
        incident_id = incident_id_from(context)
        run_id = self._run_id(context)
        record = self._step_record(store, incident_id, run_id, self.step)
        if record and record.get("step_status") == "done":
            self.do_branch(context, str(record["next"]))
            return
        self._skip_unless_my_turn(store, incident_id, context)
        incident = store.get(incident_id)
        resource = self._resource(incident)
        if self._dry_run(context):
            self._record(store, incident_id, context, step=self.step,
                         reason=f"would wait up to {self.step_timeout} for {self.check} to pass on {resource.name}; "
                                f"assuming it does, next {self.next_healthy}",
                         data={"step_status": "done", "outcome": "healthy", "next": self.next_healthy})
            self.do_branch(context, self.next_healthy)
            return
        store.set_step(incident_id, run_id=run_id, step=self.step, actor=self._actor(context),
                       reason=f"waiting up to {self.step_timeout} for {self.check} to pass on {resource.name}",
                       data={"run_id": run_id, "step_status": "waiting"})
        t = self._target(resource)
        target = {"resource_id": t.resource_id, "name": t.name, "kind": t.kind, "host": t.host, "port": t.port,
                  "attrs": t.attrs}
        self.defer(
            trigger=WaitHealthyTrigger(target=target, check=self.check,
                                       deadline=time.time() + self.step_timeout.total_seconds(),
                                       interval=self.interval),
            method_name="execute_complete",
            timeout=self.step_timeout + timedelta(minutes=1),
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> None:
        store = self._store()
        incident_id = incident_id_from(context)
        run_id = self._run_id(context)
        if event.get("healthy"):
            reason = f"{self.check} passes again after {event.get('probes')} probe(s): {event.get('reason')}"
            nxt = self.next_healthy
        else:
            reason = (f"{self.check} still failing after {self.step_timeout} ({event.get('probes')} probes): "
                      f"{event.get('reason')}")
            nxt = self.next_timeout
        store.set_step(incident_id, run_id=run_id, step=self.step, actor=self._actor(context), reason=reason,
                       data={"run_id": run_id, "step_status": "done", "outcome": "healthy" if event.get("healthy")
                             else "timeout", "next": nxt, "probes": event.get("probes")})
        self.log.info("step %s: %s -> %s", self.step, reason, nxt)
        self.do_branch(context, nxt)


class TerminalOperator(BaseOperator, _IncidentTask):
    """End of a path: resolve, await_resolution or escalate, with the last step's reason."""

    def __init__(self, *, terminal: str, conn_id: str = OPS_CONN_ID, **kwargs: Any):
        super().__init__(**kwargs)
        if terminal not in ("resolve", "await_resolution", "escalate"):
            raise ValueError(f"unknown terminal {terminal!r}")
        self.terminal = terminal
        self.conn_id = conn_id
        self.ui_color = {"resolve": "#86efac", "await_resolution": "#fde047", "escalate": "#fca5a5"}[terminal]

    def execute(self, context: Any) -> dict[str, Any]:
        from fleetmedic.airflow.callbacks import page_details

        store = self._store()
        incident_id = incident_id_from(context)
        run_id = self._run_id(context)
        actor = self._actor(context)
        self._skip_unless_my_turn(store, incident_id, context)
        incident = store.get(incident_id)
        last = next((ev for ev in reversed(store.events(incident_id))
                     if (ev.data or {}).get("run_id") == run_id and ev.step), None)
        why = last.reason if last else "no step recorded a reason"
        if self._dry_run(context):
            store.note(incident_id, actor=actor, step=self.terminal, data={"run_id": run_id, "dry_run": True},
                       reason=f"dry run: would {self.terminal.replace('_', ' ')} the incident ({why}); "
                              "nothing was changed")
            return {"incident_id": incident_id, "state": incident.state, "dry_run": True}
        if incident.state != "remediating" or incident.owner_run_id != run_id:
            self.log.warning("incident %s is %s (owner %s): this run no longer owns it; %s skipped",
                             incident_id, incident.state, incident.owner_run_id, self.terminal)
            return {"incident_id": incident_id, "state": incident.state, "skipped": True}
        if self.terminal == "resolve":
            done = store.resolve(incident_id, actor=actor, reason=f"resolved: {why}",
                                 expected_version=incident.version)
        elif self.terminal == "await_resolution":
            done = store.transition(incident_id, "await_resolution", actor=actor, expected_version=incident.version,
                                    reason=f"automation acted; waiting for health to return: {why}")
        else:
            done, _page = store.escalate(
                incident_id, actor=actor, reason=f"automation could not fix it: {why}",
                step=last.step if last else None, details=page_details(context, store, incident_id),
            )
        self.log.info("incident %s -> %s: %s", incident_id, done.state, why)
        return {"incident_id": incident_id, "state": done.state}
