"""Fleet sweep: ask every database what a customer would ask ("can I connect and run a query?").

Back to back (a run every 30 s at most, each probing for up to 45 s): plan shards of the inventory, probe each shard every few seconds from the triggerer
(no worker slot held while waiting), write `health`, apply each playbook's confirmation rule,
open or refresh one incident per (resource, type), and start one playbook run per open incident
with run id `incident-<id>` (a repeated trigger is a no-op).
"""

from fleetmedic.airflow.dag_builders import build_sweep_dag
from fleetmedic.playbooks.loader import load_all

dag = build_sweep_dag(list(load_all().playbooks.values()), doc=__doc__)
