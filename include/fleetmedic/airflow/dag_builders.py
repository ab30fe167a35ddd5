"""The one place that builds fleetmedic's DAGs: the sweep, one DAG per playbook, the pager outbox."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, Param, task
from airflow.sdk.definitions.edges import Label

from fleetmedic.airflow.approval import StepApprovalOperator
from fleetmedic.airflow.callbacks import page_on_dag_failure, page_on_failure
from fleetmedic.airflow.gate import GateOperator, HoldOperator
from fleetmedic.airflow.operators import (
    ActionStepOperator,
    ClaimIncidentOperator,
    ReconfirmOperator,
    TerminalOperator,
    WaitHealthySensor,
)
from fleetmedic.airflow.sensors import FleetProbeSensor
from fleetmedic.detection.checks import CHECKS
from fleetmedic.playbooks.schema import TERMINALS, Playbook

__all__ = ["build_outbox_dag", "build_playbook_dag", "build_pool_sync_dag", "build_sweep_dag"]

START = datetime(2026, 1, 1)
OWNER = "fleetmedic"


def _default_args(**extra: Any) -> dict[str, Any]:
    return {
        "owner": OWNER,
        "retries": 0,
        "execution_timeout": timedelta(minutes=5),
        "on_failure_callback": page_on_failure,
        **extra,
    }


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def build_sweep_dag(playbooks: list[Playbook], *, doc: str) -> DAG:
    """`fleet_sweep`: plan shards, probe each shard (deferred), open/refresh incidents, trigger playbooks."""
    from fleetmedic.detection.sweep import rules_from_playbooks

    rules = [r.to_dict() for r in rules_from_playbooks(playbooks)]
    playbook_dags = {pb.type: pb.dag_id for pb in playbooks}
    window = _env_float("FLEETMEDIC_SWEEP_WINDOW", 45.0)
    interval = _env_float("FLEETMEDIC_PROBE_INTERVAL", 5.0)
    probe_timeout = _env_float("FLEETMEDIC_PROBE_TIMEOUT", 3.0)
    shard_size = int(_env_float("FLEETMEDIC_SHARD_SIZE", 500))

    with DAG(
        dag_id="fleet_sweep",
        description="Probe the fleet like a customer would, confirm failures, open incidents, start playbooks",
        doc_md=doc,
        # Back-to-back runs: each run probes for up to `window` seconds (ending early when something
        # new is confirmed), and with max_active_runs=1 the next run starts as soon as it ends.
        schedule=timedelta(seconds=int(_env_float("FLEETMEDIC_SWEEP_EVERY", 30))),
        start_date=START,
        catchup=False,
        max_active_runs=1,
        dagrun_timeout=timedelta(minutes=5),
        tags=["fleetmedic", "detection"],
        default_args=_default_args(execution_timeout=timedelta(minutes=2)),
        on_failure_callback=page_on_dag_failure,
    ) as dag:

        @task
        def plan_shards() -> list[dict[str, int]]:
            import psycopg

            from fleetmedic.airflow.connections import ops_dsn
            from fleetmedic.detection.sweep import plan_shards as plan

            with psycopg.connect(ops_dsn()) as conn:
                row = conn.execute("SELECT count(*) FROM resources WHERE enabled").fetchone()
            count = int(row[0]) if row else 0
            return plan(count, shard_size)

        shards = plan_shards()
        probes = FleetProbeSensor.partial(
            task_id="probe_shard",
            rules=rules,
            window=window,
            interval=interval,
            probe_timeout=probe_timeout,
            timeout=timedelta(seconds=window + 120),
            execution_timeout=timedelta(seconds=window + 120),
        ).expand_kwargs(shards)

        @task
        def open_incidents(shard_events: list[dict[str, Any]]) -> list[dict[str, Any]]:
            from fleetmedic.airflow.connections import ops_dsn
            from fleetmedic.detection.incidents import open_incidents_for_findings

            summary, runs = open_incidents_for_findings(ops_dsn(), list(shard_events), playbook_dags)
            print(summary.line())
            # Incidents in await_resolution resolve once their check passes again (detection/awaiting.py).
            from fleetmedic.detection.awaiting import settle_awaiting_incidents

            print(settle_awaiting_incidents(ops_dsn(), rules).line())
            return runs

        runs = open_incidents(probes.output)
        TriggerDagRunOperator.partial(
            task_id="start_playbook",
            skip_when_already_exists=True,
            wait_for_completion=False,
            execution_timeout=timedelta(minutes=1),
        ).expand_kwargs(runs)
    return dag


def build_playbook_dag(pb: Playbook, *, pool: str | None = None) -> DAG:
    """`playbook_<type>`: claim -> re-confirm -> one branch task per step -> terminals.

    The graph in the UI is the playbook's state machine; the runbook is the DAG's doc.
    """
    step_names = [s.name for s in pb.steps]
    longest = sum((s.timeout for s in pb.steps), timedelta()) + timedelta(minutes=5)
    doc = f"# {pb.title}\n\n**type** `{pb.type}` · **severity** {pb.severity} · **applies to** " \
          f"{', '.join(pb.applies_to)} · **mode** {pb.limits.mode}\n\n{pb.runbook}"
    with DAG(
        dag_id=pb.dag_id,
        description=pb.title,
        doc_md=doc,
        schedule=None,
        start_date=START,
        catchup=False,
        max_active_runs=max(1, pb.limits.concurrency * 4),
        dagrun_timeout=longest,
        tags=["fleetmedic", "playbook", pb.type],
        default_args=_default_args(**({"pool": pool} if pool else {})),
        on_failure_callback=page_on_dag_failure,
        params={
            "incident_id": Param(type="integer", minimum=1, description="the incident this run resolves"),
            "dry_run": Param(False, type="boolean", description="record what would be done, change nothing"),
            "start_at": Param("", type="string", enum=["", *step_names],
                              description="skip re-confirm and earlier steps; start at this step"),
            "reason": Param("", type="string", description="why a human started this run (audited)"),
        },
        render_template_as_native_obj=True,
    ) as dag:
        claim = ClaimIncidentOperator(task_id="claim", playbook_type=pb.type,
                                      execution_timeout=timedelta(minutes=1))
        # Breakers, cooldown, silences, shadow mode, Redis fail-closed (safety/gate.py).
        gate = GateOperator(task_id="gate", playbook=pb, execution_timeout=timedelta(minutes=1))
        hold = HoldOperator(task_id="hold", trigger_rule="none_failed_min_one_success",
                            execution_timeout=timedelta(minutes=1))
        # A step with `approval: required` is entered through a human-in-the-loop task in front of it.
        entry = {s.name: (f"approve_{s.name}" if s.approval == "required" else f"step_{s.name}") for s in pb.steps}
        reconfirm = ReconfirmOperator(
            task_id="reconfirm",
            checks_by_kind={CHECKS[d.check][0]: d.check for d in pb.detects},
            first_step=pb.steps[0].name,
            steps=step_names,
            entry_task_ids=entry,
            execution_timeout=timedelta(minutes=1),
        )
        used = {"resolve", "escalate"} | {t for s in pb.steps for t in s.next.values() if t in TERMINALS}
        terminals = {
            name: TerminalOperator(task_id=name, terminal=name, trigger_rule="none_failed_min_one_success",
                                   execution_timeout=timedelta(minutes=1))
            for name in TERMINALS
            if name in used
        }

        def task_id_for(target: str) -> str:
            return target if target in TERMINALS else entry[target]

        step_tasks: dict[str, Any] = {}
        for s in pb.steps:
            if s.action:
                step_tasks[s.name] = ActionStepOperator(
                    task_id=f"step_{s.name}", step=s.name, action=s.action,
                    next_ok=task_id_for(s.next["ok"]), next_error=task_id_for(s.next["error"]),
                    step_params=dict(s.params), execution_timeout=s.timeout,
                    trigger_rule="none_failed_min_one_success",
                    doc_md=f"Action `{s.action}`; ok → {s.next['ok']}, error → {s.next['error']}",
                )
            else:
                assert s.wait_healthy is not None
                step_tasks[s.name] = WaitHealthySensor(
                    task_id=f"step_{s.name}", step=s.name, check=s.wait_healthy,
                    next_healthy=task_id_for(s.next["healthy"]), next_timeout=task_id_for(s.next["timeout"]),
                    step_timeout=s.timeout, trigger_rule="none_failed_min_one_success",
                    doc_md=f"Wait until `{s.wait_healthy}` passes (up to {s.timeout}); "
                           f"healthy → {s.next['healthy']}, timeout → {s.next['timeout']}",
                )
        approvals: dict[str, Any] = {}
        for s in pb.steps:
            if s.approval == "required":
                what = f"`{s.action}`" if s.action else f"waiting for `{s.wait_healthy}`"
                approvals[s.name] = StepApprovalOperator(
                    task_id=entry[s.name], step=s.name, step_task_id=f"step_{s.name}",
                    description=f"The step runs {what} (timeout {s.timeout}).",
                    response_timeout=s.approval_timeout,
                    execution_timeout=timedelta(minutes=1),
                    trigger_rule="none_failed_min_one_success",
                    doc_md=f"Human approval for step `{s.name}`: Approve runs it; Reject, Escalate or no answer "
                           f"within {s.approval_timeout} escalates.",
                )
                approvals[s.name] >> Label("Approve") >> step_tasks[s.name]
                approvals[s.name] >> Label("Reject / Escalate") >> terminals["escalate"]

        def entry_task(name: str) -> Any:
            return approvals.get(name, step_tasks[name])

        claim >> gate
        gate >> Label("proceed") >> reconfirm
        gate >> Label("hold") >> hold
        gate >> Label("escalate") >> terminals["escalate"]
        reconfirm >> Label("healthy now") >> terminals["resolve"]
        reconfirm >> Label("still failing") >> entry_task(pb.steps[0].name)
        for name in step_names:
            if name != pb.steps[0].name:
                reconfirm >> Label("start_at") >> entry_task(name)
        for s in pb.steps:
            for outcome, target in s.next.items():
                dest = terminals[target] if target in TERMINALS else entry_task(target)
                step_tasks[s.name] >> Label(outcome) >> dest
            if s.action:
                # The action permit refused (a breaker opened, Redis gone): the incident is held.
                step_tasks[s.name] >> Label("held") >> hold
            if s.action and "escalate" not in s.next.values():
                # An action interrupted mid-flight is never retried blindly: it escalates.
                step_tasks[s.name] >> Label("interrupted") >> terminals["escalate"]
    return dag


def _housekeeping_dag(dag_id: str, description: str, *, doc: str, schedule: str, tag: str,
                      task_timeout: timedelta) -> DAG:
    """A small scheduled DAG of fleetmedic's own upkeep: one run at a time, no catch-up, pages on failure."""
    return DAG(
        dag_id=dag_id,
        description=description,
        doc_md=doc,
        schedule=schedule,
        start_date=START,
        catchup=False,
        max_active_runs=1,
        dagrun_timeout=timedelta(minutes=5),
        tags=["fleetmedic", tag],
        default_args=_default_args(execution_timeout=task_timeout),
        on_failure_callback=page_on_dag_failure,
    )


def build_outbox_dag(*, doc: str) -> DAG:
    """`pager_outbox`: deliver pages that are pending (new, or failed earlier and due for a retry)."""
    with _housekeeping_dag("pager_outbox", "Deliver pending pages from the outbox to the configured backend",
                           doc=doc, schedule="* * * * *", tag="pager", task_timeout=timedelta(minutes=3)) as dag:

        @task
        def deliver() -> dict[str, Any]:
            from fleetmedic.airflow.connections import ops_dsn
            from fleetmedic.airflow.pager import backend_from_connection
            from fleetmedic.pager.outbox import deliver_pending

            backend = backend_from_connection()
            report = deliver_pending(ops_dsn(), backend)
            print(f"pager backend: {backend.name}")
            print(report)
            return {"report": str(report)}

        deliver()
    return dag


def build_pool_sync_dag(*, doc: str) -> DAG:
    """`pool_sync`: keep one pool per playbook, sized from its limits.concurrency, through the REST API."""
    with _housekeeping_dag("pool_sync", "Create, resize and prune the playbook_<type> pools from the playbooks",
                           doc=doc, schedule="*/5 * * * *", tag="safety", task_timeout=timedelta(minutes=2)) as dag:

        @task
        def sync() -> dict[str, Any]:
            from fleetmedic.airflow.connections import airflow_api_client
            from fleetmedic.playbooks.loader import load_all
            from fleetmedic.safety.pools import sync_pools

            loaded = load_all()
            for path, error in loaded.errors.items():
                print(f"skipped {path} (its DAG is an import error too): {error}")
            with airflow_api_client() as client:
                # While a playbook is broken, keep every pool: pruning would only hide the breakage.
                changes = sync_pools(client, loaded.playbooks.values(), prune=not loaded.errors)
            changed = [c.as_dict() for c in changes if c.action != "unchanged"]
            for c in changed:
                print(f"pool {c['pool']}: {c['action']} (slots {c['before']} -> {c['slots']})")
            print(f"pools: {len(changes)} playbook pool(s), {len(changed)} changed")
            return {"changed": changed}

        sync()
    return dag


def playbook_dag_from_file(dag_file: str) -> DAG:
    """Build the DAG for `dags/playbook_<type>.py` from `playbooks/<type>.yaml`.

    One DAG file per playbook, so a broken playbook is one import error naming its YAML file and
    every other playbook still loads.
    """
    from pathlib import Path

    from fleetmedic.playbooks.loader import default_playbooks_dir, load_playbook

    stem = Path(dag_file).stem
    if not stem.startswith("playbook_"):
        raise ValueError(f"{dag_file}: playbook DAG files are named playbook_<type>.py")
    pb = load_playbook(default_playbooks_dir() / f"{stem.removeprefix('playbook_')}.yaml")
    # The pool caps this playbook's concurrent remediations (limits.concurrency). The set-up (`make
    # demo`) creates it, the pool_sync DAG keeps it in sync every 5 minutes, `fleetmedic pools sync` at once.
    return build_playbook_dag(pb, pool=f"playbook_{pb.type}")
