"""Pools: one Airflow pool per playbook (`playbook_<type>`), sized from its `limits.concurrency`.

Every 5 minutes this DAG reads the playbooks and creates, resizes or prunes their pools through
Airflow's REST API (connection `fleetmedic_airflow`), so a changed or new playbook gets its pool
without anyone running a command. `fleetmedic pools sync` does the same at once.
"""

from fleetmedic.airflow.dag_builders import build_pool_sync_dag

dag = build_pool_sync_dag(doc=__doc__)
