"""Incident trends: the tables from the talk, every day and on demand.

Aggregates the ops DB over a period (default the last 7 days; trigger with a `period` such as `30d`
or `2026-05-01..2026-05-08`) into report tables: **Kernel panics in last week**, **Stale incidents
(over 2 days old)** by type and state, **Total incidents** by type, automation outcome per type
(auto-resolved %, escalated %, held %, time to resolve p50/p95), pages per type, resources paged
twice or more for the same thing (what to fix for good), breaker trips, and what shadow-mode
playbooks would have resolved. Renders HTML with PNG charts into the reports directory
(`FLEETMEDIC_REPORTS_DIR`, default `<FLEETMEDIC_HOME>/reports`) and shows them on the fleetmedic
page of this UI. Rerunning a period replaces its report. `fleetmedic report` prints the same tables.
"""

from fleetmedic.airflow.report_dags import build_incident_trends_dag

dag = build_incident_trends_dag(doc=__doc__)
