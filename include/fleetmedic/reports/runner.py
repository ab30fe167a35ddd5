"""One incident_trends run end to end: aggregate, draw the charts, write the HTML, store it all for the period."""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path

from fleetmedic.reports.charts import render_charts
from fleetmedic.reports.period import Period, parse_period
from fleetmedic.reports.render import write_report_files
from fleetmedic.reports.trends import Progress, TrendReport, build_trends, save_trends

__all__ = ["run_incident_trends"]

log = logging.getLogger("fleetmedic.reports")


def run_incident_trends(
    dsn: str,
    period: Period | str = "7d",
    *,
    generated_by: str,
    end: datetime | None = None,
    directory: Path | None = None,
    write_files: bool = True,
    progress: Progress | None = None,
) -> TrendReport:
    """Build the report for `period` (ending at `end`, default now), render it, and replace the stored one.

    Files go to <reports dir>/incident_trends/<period>/ (see `render.reports_dir`); the charts are also
    stored in the ops DB (`report_charts`) so the Airflow UI page can show them from any machine.
    """
    say = progress or log.info
    if isinstance(period, str):
        period = parse_period(period, end=end)
    report = build_trends(dsn, period, progress=say, now=end)
    t0 = time.monotonic()
    charts = render_charts(report)
    html_path = write_report_files(report, charts, directory) if write_files else None
    say(f"incident_trends {period.spec}: {len(charts)} charts"
        f"{f' and {html_path}' if html_path else ''} in {time.monotonic() - t0:.1f}s")
    t1 = time.monotonic()
    run_id = save_trends(dsn, report, generated_by=generated_by, charts=charts,
                         html_path=str(html_path) if html_path else None)
    say(f"incident_trends {period.spec}: stored as report run {run_id} in {time.monotonic() - t1:.1f}s "
        f"(replacing any earlier report of {period.label})")
    return report
