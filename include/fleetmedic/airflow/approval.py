"""Approval before a risky step (`approval: required`): a human approves, rejects or escalates in the UI.

Built on Airflow's human-in-the-loop branch operator: the task waits in `awaiting_input` (no
worker slot, no trigger) until someone answers in the Airflow UI or the REST API, or until the
response timeout, whose default answer is "Escalate". The answer and who gave it are recorded on
the incident like every other decision.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import HITLBranchOperator

from fleetmedic.airflow.connections import OPS_CONN_ID
from fleetmedic.airflow.operators import _IncidentTask, incident_id_from

__all__ = ["APPROVE", "ESCALATE", "REJECT", "StepApprovalOperator"]

APPROVE = "Approve"
REJECT = "Reject"
ESCALATE = "Escalate"


class StepApprovalOperator(HITLBranchOperator, _IncidentTask):
    """Ask a human before step `step` runs: Approve -> the step; Reject or Escalate -> escalate.

    :param step: the playbook step that needs approval
    :param step_task_id: the task that runs the step
    :param response_timeout: how long to wait for an answer; no answer escalates
    """

    ui_color = "#fbcfe8"

    def __init__(self, *, step: str, step_task_id: str, description: str, response_timeout: timedelta,
                 conn_id: str = OPS_CONN_ID, **kwargs: Any):
        super().__init__(
            subject=f"Approve step '{step}'?",
            body=description,
            options=[APPROVE, REJECT, ESCALATE],
            defaults=[ESCALATE],
            options_mapping={APPROVE: step_task_id, REJECT: "escalate", ESCALATE: "escalate"},
            response_timeout=response_timeout,
            **kwargs,
        )
        self.step = step
        self.step_task_id = step_task_id
        self.conn_id = conn_id

    def execute(self, context: Any) -> Any:
        store = self._store()
        incident_id = incident_id_from(context)
        self._skip_unless_my_turn(store, incident_id, context)
        incident = store.get(incident_id)
        resource = self._resource(incident)
        if self._dry_run(context):
            self._record(store, incident_id, context, step=f"approve_{self.step}",
                         reason=f"would ask a human to approve step '{self.step}'; assuming approval",
                         data={"step_status": "done", "next": self.step_task_id})
            return self.do_branch(context, self.step_task_id)
        self.body = (f"Incident {incident_id} ({incident.type}) on {resource.name}: automation wants to run "
                     f"step '{self.step}'. {self.body or ''} Latest: {incident.reason}")
        self._record(store, incident_id, context, step=f"approve_{self.step}",
                     reason=f"waiting for a human to approve step '{self.step}' (no answer within "
                            f"{self.response_timeout} escalates)",
                     data={"step_status": "waiting"})
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        store = self._store()
        incident_id = incident_id_from(context)
        chosen = (event.get("chosen_options") or [ESCALATE])[0]
        who = event.get("responded_by_user") or None
        name = (who or {}).get("name") if isinstance(who, dict) else who
        nxt = self.options_mapping.get(chosen, "escalate")
        if name:
            reason = f"{name} chose {chosen} for step '{self.step}'"
        else:
            reason = f"no answer within {self.response_timeout}: {chosen} (the default) for step '{self.step}'"
        self._record(store, incident_id, context, step=f"approve_{self.step}", reason=reason,
                     data={"step_status": "done", "next": nxt, "answer": chosen, "answered_by": name})
        return super().execute_complete(context, event)
