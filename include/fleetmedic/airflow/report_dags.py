"""Reporting DAGs: `incident_trends` (daily, and on demand with a `period` Param)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, Param, task

from fleetmedic.airflow.callbacks import page_on_dag_failure, page_on_failure

__all__ = ["PERIOD_PATTERN", "build_incident_trends_dag", "report_end"]

START = datetime(2026, 1, 1)
OWNER = "fleetmedic"
# What `fleetmedic.reports.period.parse_period` accepts: a length (24h, 7d, 2w) or days (end exclusive).
PERIOD_PATTERN = r"^\s*(\d+\s*[hdwHDW]|\d{4}-\d{2}-\d{2}\.\.\d{4}-\d{2}-\d{2})\s*$"


def report_end(context: Any) -> datetime | None:
    """Where a run's period ends: a scheduled run's data interval end (a UTC midnight, so a rerun of
    that run covers the same window); None (now) for a manual run, which reports up to the moment."""
    dag_run = context.get("dag_run")
    run_type = str(getattr(dag_run, "run_type", "") or "")
    if run_type.lower().endswith("scheduled"):
        end = context.get("data_interval_end") or getattr(dag_run, "data_interval_end", None)
        return end if isinstance(end, datetime) else None
    return None


def build_incident_trends_dag(*, doc: str) -> DAG:
    """`incident_trends`: aggregate the ops DB over the period into the report tables, charts and HTML."""
    with DAG(
        dag_id="incident_trends",
        description="Trend tables and charts: totals, stale incidents, kernel panics, automation outcome, pages",
        doc_md=doc,
        schedule="@daily",
        start_date=START,
        catchup=False,
        max_active_runs=1,
        dagrun_timeout=timedelta(minutes=30),
        tags=["fleetmedic", "reports"],
        default_args={
            "owner": OWNER,
            "retries": 1,
            "retry_delay": timedelta(minutes=2),
            "execution_timeout": timedelta(minutes=20),
            "on_failure_callback": page_on_failure,
        },
        on_failure_callback=page_on_dag_failure,
        params={
            "period": Param(
                "7d", type="string", pattern=PERIOD_PATTERN,
                description="how far back: a length ending now such as 24h, 7d, 30d or 2w, or days such as "
                            "2026-05-01..2026-05-08 (end day exclusive). A rerun of the same period replaces it.",
            ),
        },
    ) as dag:

        @task(task_id="build_report")
        def build_report(**context: Any) -> dict[str, Any]:
            """Aggregate, draw the charts, write the HTML, and store the report (replacing the period's)."""
            from fleetmedic.airflow.connections import ops_dsn
            from fleetmedic.reports import run_incident_trends

            params = context.get("params") or {}
            period = str(params.get("period") or "7d").strip()
            ti = context.get("ti")
            report = run_incident_trends(
                ops_dsn(), period, end=report_end(context),
                generated_by=f"automation:incident_trends/{getattr(ti, 'task_id', 'build_report')}",
                progress=lambda line: print(line, flush=True),
            )
            return {
                "run_id": report.run_id,
                "period": report.period.label,
                "incidents": report.incidents,
                "events": report.events,
                "html_path": report.html_path,
                "duration_s": round(report.duration_s, 2),
            }

        build_report()
    return dag
