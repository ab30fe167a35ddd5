"""Playbook DAG for playbooks/old_base_backup.yaml: the YAML holds the runbook and the steps."""

from fleetmedic.airflow.dag_builders import playbook_dag_from_file

dag = playbook_dag_from_file(__file__)
