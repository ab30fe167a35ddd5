"""Every DAG file imports cleanly, and every DAG and task carries what the project requires."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS_DIR = REPO / "dags"
PLAYBOOKS_DIR = REPO / "playbooks"


@pytest.fixture(scope="module")
def dagbag():
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_DIR))


def test_every_dag_file_imports_without_error(dagbag):
    assert dagbag.import_errors == {}, "\n".join(f"{k}: {v}" for k, v in dagbag.import_errors.items())
    files = {Path(d.fileloc).name for d in dagbag.dags.values()}
    assert files == {p.name for p in DAGS_DIR.glob("*.py")}


def test_each_dag_file_is_named_after_its_dag(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert Path(dag.fileloc).stem == dag_id, f"{dag.fileloc} defines {dag_id}; name the file {dag_id}.py"


def test_expected_dags_exist(dagbag):
    assert {"fleet_sweep", "pager_outbox", "playbook_resource_down"} <= set(dagbag.dag_ids)


def test_every_playbook_has_its_dag_file_and_back():
    playbooks = {p.stem for p in PLAYBOOKS_DIR.glob("*.yaml")}
    dag_files = {p.stem.removeprefix("playbook_") for p in DAGS_DIR.glob("playbook_*.py")}
    assert playbooks == dag_files, (
        "each playbooks/<type>.yaml needs dags/playbook_<type>.py (a three-line shim) and vice versa"
    )


def test_every_dag_has_tags_owner_doc_and_run_timeout(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert "fleetmedic" in dag.tags, f"{dag_id} lacks the fleetmedic tag"
        assert dag.doc_md and dag.doc_md.strip(), f"{dag_id} has no doc_md"
        assert dag.dagrun_timeout is not None, f"{dag_id} has no dagrun_timeout"
        assert dag.owner == "fleetmedic", f"{dag_id} owner is {dag.owner!r}"
        assert dag.on_failure_callback, f"{dag_id} has no DAG-level on_failure_callback"


def test_every_task_has_execution_timeout_and_failure_callback(dagbag):
    from airflow.sdk import BaseSensorOperator

    for dag_id, dag in dagbag.dags.items():
        for t in dag.tasks:
            where = f"{dag_id}.{t.task_id}"
            assert t.execution_timeout is not None, f"{where} has no execution_timeout"
            assert t.on_failure_callback, f"{where} has no on_failure_callback"
            if isinstance(t, BaseSensorOperator):
                assert t.timeout is not None and t.timeout > 0, f"sensor {where} has no timeout"


def test_every_playbook_dag_runs_in_its_own_pool(dagbag):
    for dag_id, dag in dagbag.dags.items():
        if dag_id.startswith("playbook_"):
            assert {t.pool for t in dag.tasks} == {dag_id}, f"{dag_id} tasks must use pool {dag_id}"


def test_playbook_graph_is_the_state_machine(dagbag):
    dag = dagbag.dags["playbook_resource_down"]
    assert dag.get_task("claim").downstream_task_ids == {"gate"}
    assert dag.get_task("gate").downstream_task_ids == {"reconfirm", "hold", "escalate"}
    assert dag.get_task("reconfirm").downstream_task_ids == {"resolve", "step_restart", "step_verify", "step_failover"}
    assert dag.get_task("step_restart").downstream_task_ids == {"step_verify", "step_failover", "escalate", "hold"}
    assert dag.get_task("step_verify").downstream_task_ids == {"resolve", "step_failover"}
    assert "What it means" in dag.doc_md
    assert set(dag.params.keys()) >= {"incident_id", "dry_run", "start_at", "reason"}
