"""Render a trend report: cell formatting shared by the console and HTML, the HTML page, and files on disk."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, select_autoescape

from fleetmedic.reports.charts import CHARTS
from fleetmedic.reports.trends import TABLES, TrendReport, frame_records

__all__ = [
    "DEFAULT_ROW_LIMIT",
    "format_cell",
    "header",
    "render_html",
    "reports_dir",
    "table_rows",
    "write_report_files",
]

# Long listings (kernel panics, repeat pages) are cut to this many rows on a page; the tables keep all.
DEFAULT_ROW_LIMIT = 30

# The order tables appear in: the talk's three first.
PAGE_ORDER = ("kernel_panics", "stale", "total", "automation", "pages", "repeat_pages", "breakers", "shadow")


def reports_dir() -> Path:
    """Where rendered reports go: FLEETMEDIC_REPORTS_DIR, else <FLEETMEDIC_HOME>/reports."""
    from fleetmedic.config import local_home

    configured = os.environ.get("FLEETMEDIC_REPORTS_DIR")
    return Path(configured).absolute() if configured else local_home() / "reports"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def format_cell(column: str, value: Any) -> str:
    """How a value reads in a table: durations for *_s, percentages for *_pct, minutes for timestamps."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NaT:
        return "—"
    if column.endswith("_pct"):
        return f"{float(value):.1f}%"
    if column.endswith("_s"):
        return _duration(float(value))
    if isinstance(value, pd.Timestamp | datetime):
        return f"{value:%Y-%m-%d %H:%M}"
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str) and len(value) >= 19 and value[4] == "-" and value[10] == "T":
        try:
            return f"{datetime.fromisoformat(value):%Y-%m-%d %H:%M}"
        except ValueError:
            return value
    return str(value)


HEADERS = {
    "incident_id": "incident", "opened_at": "opened", "resolved_at": "resolved",
    "auto_resolved": "auto-resolved", "human_resolved": "by a human", "still_active": "still active",
    "auto_resolved_pct": "auto-resolved %", "escalated_pct": "escalated %", "held_pct": "held %",
    "mttr_p50_s": "MTTR p50", "mttr_p95_s": "MTTR p95", "incidents_paged": "incidents paged",
    "first_paged_at": "first paged", "last_paged_at": "last paged", "first_trip_at": "first trip",
    "last_trip_at": "last trip", "last_reason": "last reason", "shadow_incidents": "shadow incidents",
    "would_have_resolved": "would have resolved", "would_have_resolved_pct": "would have resolved %",
}
# The talk's tables say "count".
_TABLE_HEADERS = {("total", "incidents"): "count", ("stale", "incidents"): "count"}


def header(table: str, column: str) -> str:
    """A column's heading in tables people read (JSON and the ops DB keep the column names)."""
    return _TABLE_HEADERS.get((table, column)) or HEADERS.get(column, column)


def table_rows(report: TrendReport, name: str, limit: int | None = DEFAULT_ROW_LIMIT) -> tuple[list[str], list[list[str]], int]:
    """(headings, formatted rows, rows left out) of one table."""
    spec = TABLES[name]
    df = report.tables.get(name)
    total = report.row_count(name)
    shown = frame_records(df if limit is None or df is None else df.head(limit)) if df is not None else []
    rows = [[format_cell(c, r.get(c)) for c in spec.columns] for r in shown]
    return [header(name, c) for c in spec.columns], rows, max(0, total - len(shown))


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>fleetmedic · incident trends · {{ period_label }}</title>
<style>
 body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem; color: #1d2733; }
 h1 { font-size: 1.4rem; margin-bottom: .2rem; } h2 { font-size: 1.1rem; margin: 1.6rem 0 .4rem; }
 .meta { color: #56616d; font-size: .85rem; }
 table { border-collapse: collapse; font-size: .85rem; margin-top: .3rem; }
 th, td { border-bottom: 1px solid #dde3e8; padding: .25rem .7rem; text-align: left; }
 th { background: #f2f5f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
 .empty { color: #56616d; font-style: italic; } .more { color: #56616d; font-size: .8rem; }
 .desc { color: #56616d; font-size: .8rem; margin: 0; }
 .charts { display: flex; flex-wrap: wrap; gap: .6rem; }
 .charts img { width: 32%; min-width: 420px; border: 1px solid #dde3e8; }
</style></head><body>
<h1>{{ heading }}</h1>
<p class="meta">{{ period_label }} · {{ incidents }} incidents, {{ events }} audit events ·
 generated {{ generated_at }}{% if generated_by %} by {{ generated_by }}{% endif %} in {{ duration }}</p>
<div class="charts">{% for chart in charts %}<img src="{{ chart.src }}" alt="{{ chart.title }}" title="{{ chart.title }}">
{% endfor %}</div>
{% for t in tables %}
<h2 id="{{ t.name }}">{{ t.title }}</h2>
<p class="desc">{{ t.description }}</p>
{% if t.rows %}
<table class="report" data-table="{{ t.name }}"><thead><tr>{% for h in t.headers %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in t.rows %}<tr>{% for cell in row %}<td{% if t.numeric[loop.index0] %} class="num"{% endif %}>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
{% if t.more %}<p class="more">… and {{ t.more }} more rows (all of them are in the ops DB table {{ t.db_table }})</p>{% endif %}
{% else %}<p class="empty">none in this period</p>{% endif %}
{% endfor %}
</body></html>
"""

_env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
_page = _env.from_string(_TEMPLATE)


def _numeric(df: pd.DataFrame | None, columns: Iterable[str]) -> list[bool]:
    if df is None:
        return [False for _ in columns]
    return [c in df.columns and pd.api.types.is_numeric_dtype(df[c]) for c in columns]


def table_context(report: TrendReport, limit: int | None = DEFAULT_ROW_LIMIT) -> list[dict[str, Any]]:
    """Each table of the page, formatted: name, title, description, headers, rows, numeric flags, rows left out."""
    out = []
    for name in PAGE_ORDER:
        headers, rows, more = table_rows(report, name, limit)
        columns = list(TABLES[name].columns)
        out.append({
            "name": name, "title": report.title(name), "description": TABLES[name].description,
            "db_table": TABLES[name].db_table, "headers": headers, "rows": rows, "more": more,
            "numeric": _numeric(report.tables.get(name), columns),
        })
    return out


def render_html(
    report: TrendReport,
    *,
    chart_src: Callable[[str], str] = lambda name: f"{name}.png",
    charts: Iterable[str] = tuple(CHARTS),
    heading: str = "Incident trends",
    limit: int | None = DEFAULT_ROW_LIMIT,
) -> str:
    """The report as one HTML page; `chart_src(name)` says where each chart's PNG is (file or URL)."""
    return _page.render(
        heading=heading,
        period_label=report.period.label,
        incidents=f"{report.incidents:,}",
        events=f"{report.events:,}",
        generated_at=f"{report.generated_at:%Y-%m-%d %H:%M} UTC",
        generated_by=report.generated_by,
        duration=_duration(report.duration_s) if report.duration_s >= 1 else f"{report.duration_s:.2f}s",
        charts=[{"src": chart_src(n), "title": CHARTS.get(n, n)} for n in charts],
        tables=table_context(report, limit),
    )


def write_report_files(
    report: TrendReport, charts: dict[str, tuple[str, bytes]], directory: Path | None = None
) -> Path:
    """Write index.html and the PNGs to <reports dir>/incident_trends/<period slug>/; returns the index path.

    The files are replaced in place (a rerun of the period overwrites them); `latest.html` next to the
    period directories points at the newest one.
    """
    base = (directory or reports_dir()) / "incident_trends"
    target = base / report.period.slug
    target.mkdir(parents=True, exist_ok=True)
    for name, (_title, png) in charts.items():
        _atomic_write(target / f"{name}.png", png)
    index = target / "index.html"
    _atomic_write(index, render_html(report, charts=charts.keys()).encode())
    latest = (f'<!doctype html><meta http-equiv="refresh" content="0; url={report.period.slug}/index.html">'
              f'<a href="{report.period.slug}/index.html">latest incident trends</a>\n')
    _atomic_write(base / "latest.html", latest.encode())
    return index


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
