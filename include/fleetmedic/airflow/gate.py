"""The playbook's gate task (breakers, cooldown, silences, shadow mode, fail-closed) and its `hold` terminal.

claim -> gate -> {reconfirm (proceed), hold, escalate}. The gate's decision is recorded with its
reason and the `next` task, so a retried or cleared gate follows the decision it already made and
never takes a second slot in the action window. The `hold` terminal moves the incident to held,
naming what holds it (a breaker or a silence); clearing that releases it and the sweep starts a new run.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.standard.operators.branch import BaseBranchOperator
from airflow.sdk import BaseOperator

from fleetmedic.airflow.connections import OPS_CONN_ID, REDIS_CONN_ID, ops_dsn, redis_url
from fleetmedic.airflow.operators import _IncidentTask, incident_id_from, run_param

__all__ = ["GateOperator", "HoldOperator"]


class GateOperator(BaseBranchOperator, _IncidentTask):
    """Ask the safety gate whether this run may act: proceed, hold or escalate (see `fleetmedic.safety.gate`).

    :param playbook: the playbook (its type and `limits`: max_actions_per_hour, resource_cooldown, mode)
    :param proceed_to: the task that runs when the gate lets the run through (the re-confirm)
    :param hold_to: the terminal that holds the incident
    :param escalate_to: the terminal that escalates (cooldown, shadow mode)
    """

    ui_color = "#fdba74"

    def __init__(self, *, playbook: Any, proceed_to: str = "reconfirm", hold_to: str = "hold",
                 escalate_to: str = "escalate", conn_id: str = OPS_CONN_ID, redis_conn_id: str = REDIS_CONN_ID,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.playbook = playbook
        self.proceed_to = proceed_to
        self.hold_to = hold_to
        self.escalate_to = escalate_to
        self.conn_id = conn_id
        self.redis_conn_id = redis_conn_id

    def choose_branch(self, context: Any) -> str:
        from fleetmedic.safety.gate import evaluate_gate

        store = self._store()
        incident_id = incident_id_from(context)
        run_id = self._run_id(context)
        record = self._step_record(store, incident_id, run_id, "gate")
        if record and record.get("step_status") == "done":
            # A retried or cleared gate: follow the decision this run already made (and counted).
            self.log.info("gate already decided %s in this run: %s", record.get("gate"), record.get("next"))
            return str(record["next"])
        incident = store.get(incident_id)
        decision = evaluate_gate(
            ops_dsn(self.conn_id), redis_url(self.redis_conn_id), incident, self.playbook, run_id=run_id,
            actor=self._actor(context), manual=bool(run_param(context, "reason")), dry_run=self._dry_run(context),
        )
        nxt = {"proceed": self.proceed_to, "hold": self.hold_to, "escalate": self.escalate_to}[decision.outcome]
        self._record(store, incident_id, context, step="gate", reason=decision.reason,
                     data={**decision.event_data(), "step_status": "done", "next": nxt})
        self.log.info("gate: %s -> %s", decision.reason, nxt)
        return nxt


class HoldOperator(BaseOperator, _IncidentTask):
    """Terminal: hold the incident (remediating -> held), naming the breaker or silence that holds it."""

    ui_color = "#fcd34d"

    def __init__(self, *, conn_id: str = OPS_CONN_ID, **kwargs: Any):
        super().__init__(**kwargs)
        self.conn_id = conn_id

    def execute(self, context: Any) -> dict[str, Any]:
        from fleetmedic.safety.gate import hold_incident

        store = self._store()
        incident_id = incident_id_from(context)
        run_id = self._run_id(context)
        actor = self._actor(context)
        self._skip_unless_my_turn(store, incident_id, context)
        task_id = context["ti"].task_id
        decision = next((ev for ev in reversed(store.events(incident_id))
                         if (ev.data or {}).get("run_id") == run_id and (ev.data or {}).get("next") == task_id), None)
        why = decision.reason if decision else "no decision recorded a reason"
        held_by = (decision.data or {}).get("held_by") if decision else None
        if self._dry_run(context):
            store.note(incident_id, actor=actor, step=task_id, data={"run_id": run_id, "dry_run": True},
                       reason=f"dry run: would hold the incident ({why}); nothing was changed")
            return {"incident_id": incident_id, "dry_run": True}
        incident = store.get(incident_id)
        if incident.state != "remediating" or incident.owner_run_id != run_id:
            self.log.warning("incident %s is %s (owner %s): this run no longer owns it; hold skipped",
                             incident_id, incident.state, incident.owner_run_id)
            return {"incident_id": incident_id, "state": incident.state, "skipped": True}
        held = hold_incident(store, incident_id, run_id=run_id, actor=actor, reason=f"held: {why}", held_by=held_by)
        self.log.info("incident %s held by %s: %s", incident_id, held_by, why)
        return {"incident_id": incident_id, "state": held.state, "held_by": held_by}
