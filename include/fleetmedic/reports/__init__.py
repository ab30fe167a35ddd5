"""Trend reports over the ops DB: pandas-shaped aggregations, report tables, HTML and PNG charts."""

from __future__ import annotations

from fleetmedic.reports.period import Period, PeriodError, parse_period
from fleetmedic.reports.trends import TABLES, TrendReport, build_trends, load_trends, save_trends

__all__ = [
    "TABLES",
    "Period",
    "PeriodError",
    "TrendReport",
    "build_trends",
    "load_trends",
    "parse_period",
    "run_incident_trends",
    "save_trends",
]


def run_incident_trends(*args, **kwargs):  # type: ignore[no-untyped-def]
    """See fleetmedic.reports.runner.run_incident_trends (imported lazily: it pulls in matplotlib)."""
    from fleetmedic.reports.runner import run_incident_trends as run

    return run(*args, **kwargs)
