"""Pager outbox: deliver pages that are pending, retrying the ones whose delivery failed before.

Pages are written to the `pages` table first (in the same transaction as the escalation), so an
undelivered page is never lost, and the (dedup_key, action) key means one is never sent twice.
"""

from fleetmedic.airflow.dag_builders import build_outbox_dag

dag = build_outbox_dag(doc=__doc__)
