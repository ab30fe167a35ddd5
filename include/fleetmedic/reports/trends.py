"""The incident_trends report: aggregate the ops DB over a period into the tables the talk shows, and store them.

Large work happens in PostgreSQL (one pass over the period's audit events into a per-incident outcome
table, then small GROUP BYs over that); pandas shapes the results (percentages, ordering, the gaps in
daily series). `build_trends` only reads; `save_trends` replaces the stored report of the same
period in one transaction, so a rerun replaces it instead of adding a second one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import psycopg
from psycopg import sql

from fleetmedic.db.connect import connect
from fleetmedic.reports.period import Period, parse_period

__all__ = [
    "ALL",
    "STALE_AFTER",
    "TABLES",
    "TableSpec",
    "TrendReport",
    "build_trends",
    "latest_run",
    "load_trends",
    "save_trends",
]

log = logging.getLogger("fleetmedic.reports")

ALL = "(all)"
NO_INCIDENT = "(no incident)"
STALE_AFTER = timedelta(days=2)
ACTIVE = ("open", "remediating", "await_resolution", "held", "escalated")
# Periods longer than this are aggregated in slices of this length, with a log line per slice.
SLICE = timedelta(days=7)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TableSpec:
    """One report table: its key for `fleetmedic report NAME`, its title, its ops-DB table and columns."""

    name: str
    title: str
    db_table: str
    columns: tuple[str, ...]
    description: str


TABLES: dict[str, TableSpec] = {
    t.name: t
    for t in (
        TableSpec("total", "Total incidents", "report_total_incidents", ("type", "incidents"),
                  "incidents opened in the period, per type"),
        TableSpec("stale", "Stale incidents (over 2 days old)", "report_stale_incidents",
                  ("type", "state", "incidents"),
                  "incidents still active at the end of the period and opened more than 2 days before it"),
        TableSpec("kernel_panics", "Kernel panics", "report_kernel_panics",
                  ("incident_id", "resource", "server", "opened_at", "state", "resolved_at"),
                  "kernel_panic incidents opened in the period"),
        TableSpec("automation", "Automation outcome per type", "report_automation",
                  ("type", "incidents", "auto_resolved", "escalated", "held", "human_resolved", "ignored",
                   "still_active", "auto_resolved_pct", "escalated_pct", "held_pct", "mttr_p50_s", "mttr_p95_s"),
                  "how incidents opened in the period ended: fixed by automation, paged, held; time to resolve"),
        TableSpec("pages", "Pages per type", "report_pages",
                  ("type", "pages", "incidents_paged", "delivered", "undelivered"),
                  "pages (triggers) created in the period"),
        TableSpec("repeat_pages", "Paged twice or more for the same thing", "report_repeat_pages",
                  ("resource", "type", "pages", "incidents", "first_paged_at", "last_paged_at"),
                  "resources paged at least twice for the same incident type: what to fix for good"),
        TableSpec("breakers", "Breaker trips", "report_breaker_trips",
                  ("breaker", "trips", "first_trip_at", "last_trip_at", "last_reason"),
                  "circuit breakers that opened in the period"),
        TableSpec("shadow", "Shadow mode: would have resolved", "report_shadow",
                  ("type", "shadow_incidents", "would_have_resolved", "would_have_resolved_pct"),
                  "incidents handled by a shadow-mode playbook, and how many it would have fixed"),
        TableSpec("daily", "Per day", "report_daily",
                  ("day", "type", "incidents", "auto_resolved", "escalated", "resolved", "mttr_p50_s"),
                  "per UTC day and type (and '(all)'): the series behind the charts"),
    )
}


@dataclass
class TrendReport:
    """One computed (or loaded) report: the period, when it was made, and one DataFrame per table."""

    period: Period
    as_of: datetime
    generated_at: datetime
    incidents: int
    events: int
    tables: dict[str, pd.DataFrame]
    duration_s: float = 0.0
    run_id: int | None = None
    generated_by: str | None = None
    html_path: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # Rows each table has in full, when `tables` holds only the first ones (load_trends(limit=...)).
    row_counts: dict[str, int] = field(default_factory=dict)

    def row_count(self, name: str) -> int:
        """How many rows the table has (all of them, even when only the first few were loaded)."""
        if name in self.row_counts:
            return self.row_counts[name]
        df = self.tables.get(name)
        return 0 if df is None else len(df)

    def title(self, name: str) -> str:
        """The table's title as the talk words it, e.g. 'Kernel panics in last 7d'."""
        spec = TABLES[name]
        if name == "kernel_panics":
            return "Kernel panics in last week" if self.period.spec in ("7d", "1w") else \
                f"Kernel panics in last {self.period.spec}"
        return spec.title

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (timestamps as ISO strings, NaN as null)."""
        return {
            "run_id": self.run_id,
            "period": self.period.spec,
            "period_start": self.period.start.isoformat(),
            "period_end": self.period.end.isoformat(),
            "as_of": self.as_of.isoformat(),
            "generated_at": self.generated_at.isoformat(),
            "generated_by": self.generated_by,
            "incidents": self.incidents,
            "events": self.events,
            "duration_s": round(self.duration_s, 3),
            "html_path": self.html_path,
            "tables": {name: frame_records(df) for name, df in self.tables.items()},
        }


def frame_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """A DataFrame as a list of plain dicts: Timestamps as ISO strings, NaN/NaT as None, numpy as Python."""
    out: list[dict[str, Any]] = []
    for row in df.to_dict(orient="records"):
        clean: dict[str, Any] = {}
        for k, v in row.items():
            if v is None or (isinstance(v, float) and v != v) or v is pd.NaT:
                clean[k] = None
            elif isinstance(v, pd.Timestamp | datetime):
                clean[k] = v.isoformat()
            elif hasattr(v, "isoformat"):
                clean[k] = v.isoformat()
            elif hasattr(v, "item"):
                clean[k] = v.item()
            else:
                clean[k] = v
        out.append(clean)
    return out


def _db_rows(df: pd.DataFrame) -> Any:
    """Rows of `df` as tuples of Python values for COPY (vectorised: NaN/NaT -> None, numpy -> Python)."""
    values = df.astype(object)
    return values.where(pd.notna(df), None).itertuples(index=False, name=None)


# -- SQL ------------------------------------------------------------------------------------------

# Shadow mode (fleetmedic.safety.shadow): a shadow playbook's gate records `shadow: true`, what it
# would do (`would: act` or what stopped it) and `would_resolve` (its happy path ends in resolve).
# Tolerant of other recorders: `mode: shadow` also marks a shadow incident, and `would_have_resolved:
# true` on any of its events counts it as one the playbook would have fixed.
SHADOW_EVENT = "(e.data @> '{\"shadow\": true}' OR e.data->>'mode' = 'shadow')"
WOULD_RESOLVE_EVENT = (
    "(e.data @> '{\"would_have_resolved\": true}' OR "
    "(e.data @> '{\"would_resolve\": true}' AND coalesce(e.data->>'would', 'act') = 'act'))"
)

OUTCOMES_TABLE = """
CREATE TEMP TABLE report_outcomes (
    id bigint NOT NULL, type text NOT NULL, opened_at timestamptz NOT NULL, events integer NOT NULL,
    escalated boolean NOT NULL, held boolean NOT NULL, resolved_at timestamptz, human_resolved boolean NOT NULL,
    ignored boolean NOT NULL, shadow boolean NOT NULL, would_resolve boolean NOT NULL, ttr_s double precision
) ON COMMIT DROP
"""

# Where each slice of the period starts and ends in incident ids (ids grow with time, but not strictly:
# the opened_at filter below stays authoritative). One scan of incidents for all slices.
SLICE_IDS = """
SELECT floor(extract(epoch FROM opened_at - %(start)s) / %(slice_s)s)::int AS slice,
       min(id), max(id), count(*)
FROM incidents WHERE opened_at >= %(start)s AND opened_at < %(end)s
GROUP BY 1 ORDER BY 1
"""

# One pass over the audit events of one slice's incidents: each incident's outcome.
OUTCOMES_SLICE = f"""
INSERT INTO report_outcomes
SELECT i.id, i.type, i.opened_at,
       coalesce(ev.events, 0), coalesce(ev.escalated, false), coalesce(ev.held, false), ev.resolved_at,
       coalesce(ev.human_resolved, false), coalesce(ev.ignored, false), coalesce(ev.shadow, false),
       coalesce(ev.would_resolve, false), extract(epoch FROM ev.resolved_at - i.opened_at)::double precision
FROM incidents i
LEFT JOIN (
    SELECT e.incident_id,
           count(*) AS events,
           bool_or(e.to_state = 'escalated') AS escalated,
           bool_or(e.to_state = 'held') AS held,
           min(e.at) FILTER (WHERE e.to_state = 'resolved') AS resolved_at,
           bool_or(e.to_state = 'resolved' AND e.actor LIKE 'human:%%') AS human_resolved,
           bool_or(e.to_state = 'ignored') AS ignored,
           bool_or({SHADOW_EVENT}) AS shadow,
           bool_or({WOULD_RESOLVE_EVENT}) AS would_resolve
    FROM incident_events e
    WHERE e.incident_id BETWEEN %(min_id)s AND %(max_id)s
    GROUP BY e.incident_id
) ev ON ev.incident_id = i.id
WHERE i.id BETWEEN %(min_id)s AND %(max_id)s AND i.opened_at >= %(lo)s AND i.opened_at < %(hi)s
"""

# Automation outcome per type and overall, and per day (and type): one pass over the outcomes.
_AUTO_RESOLVED = "resolved_at IS NOT NULL AND NOT human_resolved AND NOT escalated"
OUTCOME_GROUPS = f"""
SELECT GROUPING((opened_at AT TIME ZONE 'UTC')::date) = 0 AS by_day,
       (opened_at AT TIME ZONE 'UTC')::date AS day,
       coalesce(type, '{ALL}') AS type,
       count(*) AS incidents,
       count(*) FILTER (WHERE {_AUTO_RESOLVED}) AS auto_resolved,
       count(*) FILTER (WHERE escalated) AS escalated,
       count(*) FILTER (WHERE held) AS held,
       count(*) FILTER (WHERE human_resolved) AS human_resolved,
       count(*) FILTER (WHERE ignored) AS ignored,
       count(*) FILTER (WHERE resolved_at IS NULL AND NOT ignored) AS still_active,
       count(*) FILTER (WHERE resolved_at IS NOT NULL) AS resolved,
       percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY ttr_s) AS mttr_s,
       sum(events)::bigint AS events,
       count(*) FILTER (WHERE shadow) AS shadow_incidents,
       count(*) FILTER (WHERE shadow AND would_resolve) AS would_have_resolved
FROM report_outcomes
GROUP BY GROUPING SETS ((type), (), ((opened_at AT TIME ZONE 'UTC')::date, type),
                        ((opened_at AT TIME ZONE 'UTC')::date))
"""

KERNEL_PANICS = """
SELECT i.id AS incident_id, r.name AS resource, s.name AS server, i.opened_at, i.state, i.resolved_at
FROM incidents i
JOIN resources r ON r.id = i.resource_id
LEFT JOIN servers s ON s.id = r.server_id
WHERE i.type = 'kernel_panic' AND i.opened_at >= %(start)s AND i.opened_at < %(end)s
ORDER BY i.opened_at, i.id
"""

# Active at `as_of` (its latest event by then left it in an active state) and opened 2+ days before.
STALE = """
SELECT i.type, st.state, count(*) AS incidents
FROM incidents i
CROSS JOIN LATERAL (
    SELECT e.to_state AS state FROM incident_events e
    WHERE e.incident_id = i.id AND e.at <= %(as_of)s
    ORDER BY e.id DESC LIMIT 1
) st
WHERE i.opened_at < %(stale_before)s
  AND (i.state <> 'resolved' OR i.resolved_at > %(as_of)s)
  AND st.state = ANY(%(active)s)
GROUP BY i.type, st.state
"""

# Pages (triggers) created in the period per (resource, type); from it, pages per type (an incident has
# one resource and one type, so distinct incidents add up) and the resources paged twice or more.
PAGES = f"""
WITH per_resource AS MATERIALIZED (
    SELECT i.resource_id, i.type, count(*) AS pages, count(DISTINCT p.incident_id) AS incidents,
           count(*) FILTER (WHERE p.status = 'delivered') AS delivered,
           count(*) FILTER (WHERE p.status <> 'delivered') AS undelivered,
           min(p.created_at) AS first_paged_at, max(p.created_at) AS last_paged_at
    FROM pages p LEFT JOIN incidents i ON i.id = p.incident_id
    WHERE p.action = 'trigger' AND p.created_at >= %(start)s AND p.created_at < %(end)s
    GROUP BY i.resource_id, i.type
)
SELECT false AS repeat, NULL::text AS resource, coalesce(type, '{NO_INCIDENT}') AS type, sum(pages)::bigint AS pages,
       sum(incidents)::bigint AS incidents_paged, sum(incidents)::bigint AS incidents,
       sum(delivered)::bigint AS delivered, sum(undelivered)::bigint AS undelivered,
       min(first_paged_at) AS first_paged_at, max(last_paged_at) AS last_paged_at
FROM per_resource GROUP BY type
UNION ALL
SELECT true, r.name, g.type, g.pages, g.incidents, g.incidents, g.delivered, g.undelivered, g.first_paged_at, g.last_paged_at
FROM per_resource g JOIN resources r ON r.id = g.resource_id
WHERE g.pages >= 2
"""

BREAKERS = """
SELECT breaker, count(*) AS trips, min(at) AS first_trip_at, max(at) AS last_trip_at,
       (array_agg(reason ORDER BY at DESC, id DESC))[1] AS last_reason
FROM breaker_events
WHERE state = 'open' AND at >= %(start)s AND at < %(end)s
GROUP BY breaker
"""


def _frame(cur: psycopg.Cursor[Any], query: str, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
    cur.execute(query, params)  # type: ignore[arg-type]
    names = [d.name for d in cur.description or []]
    return pd.DataFrame.from_records(cur.fetchall(), columns=names)


def _pct(part: pd.Series, whole: pd.Series) -> pd.Series:
    return (100.0 * part / whole.where(whole > 0)).round(1).fillna(0.0)


def _work_mem() -> str:
    value = os.environ.get("FLEETMEDIC_REPORT_WORK_MEM", "256MB")
    if not value.replace("MB", "").replace("GB", "").replace("kB", "").isdigit():
        raise ValueError(f"FLEETMEDIC_REPORT_WORK_MEM={value!r}: give a PostgreSQL size such as 256MB")
    return value


def _session_settings(cur: psycopg.Cursor[Any]) -> None:
    # Sorting and hashing a month of a large fleet's events wants memory rather than temp files; the
    # outcome table should stay in memory too (temp_buffers must be set before the first temp table).
    # JIT compiles each of these one-off queries for half a second or more and wins nothing back.
    work_mem = _work_mem()
    for name, value in (("work_mem", work_mem), ("temp_buffers", work_mem), ("jit", "off")):
        cur.execute(sql.SQL("SET LOCAL {} = {}").format(sql.Identifier(name), sql.Literal(value)))


def build_trends(
    dsn: str,
    period: Period | str,
    *,
    progress: Progress | None = None,
    now: datetime | None = None,
) -> TrendReport:
    """Compute every report table for `period` (a Period or a spec such as '7d'); writes nothing.

    Runs in one REPEATABLE READ transaction, so all tables describe the same moment. `progress`
    receives a line per step, and one per week-long slice of a period longer than a week.
    """
    say = progress or log.info
    if isinstance(period, str):
        period = parse_period(period, end=now)
    generated_at = now or datetime.now(UTC)
    as_of = period.as_of(generated_at)
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    window = {"start": period.start, "end": period.end}
    with connect(dsn, row_factory=psycopg.rows.tuple_row, application_name="fleetmedic-reports") as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction(), conn.cursor() as cur:
            _session_settings(cur)
            cur.execute(OUTCOMES_TABLE)
            slice_s = SLICE.total_seconds() if period.length > SLICE else period.length.total_seconds()
            cur.execute(SLICE_IDS, {**window, "slice_s": slice_s})
            slices = cur.fetchall()
            total_slices = max(1, int(-(-period.length.total_seconds() // slice_s)))
            done = 0
            for n, min_id, max_id, count in slices:
                ts = time.monotonic()
                lo = period.start + timedelta(seconds=n * slice_s)
                hi = min(period.end, lo + timedelta(seconds=slice_s))
                cur.execute(OUTCOMES_SLICE, {"lo": lo, "hi": hi, "min_id": min_id, "max_id": max_id})
                done += int(count)
                if total_slices > 1:
                    say(f"incident_trends {period.spec}: slice {n + 1}/{total_slices} {lo:%Y-%m-%d}..{hi:%Y-%m-%d}: "
                        f"{int(count):,} incidents in {time.monotonic() - ts:.1f}s ({done:,} so far)")
            timings["outcomes"] = time.monotonic() - t0
            say(f"incident_trends {period.spec}: outcomes of {done:,} incidents in {timings['outcomes']:.1f}s")

            def step(name: str, query: str, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
                ts = time.monotonic()
                df = _frame(cur, query, params)
                timings[name] = time.monotonic() - ts
                return df

            groups = _split_mttr(step("outcome_groups", OUTCOME_GROUPS))
            kernel = step("kernel_panics", KERNEL_PANICS, window)
            stale = step("stale", STALE, {"as_of": as_of, "stale_before": as_of - STALE_AFTER,
                                          "active": list(ACTIVE)})
            pages = step("pages", PAGES, window)
            breakers = step("breakers", BREAKERS, window)
            say(f"incident_trends {period.spec}: tables aggregated in {time.monotonic() - t0:.1f}s")

    ts = time.monotonic()
    automation = groups[~groups["by_day"]] if len(groups) else groups
    daily = groups[groups["by_day"]] if len(groups) else groups
    overall = automation[automation["type"] == ALL] if len(automation) else automation
    incidents = int(overall["incidents"].sum()) if len(overall) else 0
    events = int(overall["events"].sum()) if len(overall) else 0
    tables: dict[str, pd.DataFrame] = {
        "total": _shape_total(automation),
        "stale": _sorted(stale, ["type", "state"], TABLES["stale"].columns),
        "kernel_panics": _sorted(kernel, ["opened_at", "incident_id"], TABLES["kernel_panics"].columns),
        "automation": _shape_automation(automation),
        "pages": _sorted(pages[~pages["repeat"]] if len(pages) else pages, ["pages", "type"],
                         TABLES["pages"].columns, ascending=[False, True]),
        "repeat_pages": _sorted(pages[pages["repeat"]] if len(pages) else pages, ["pages", "resource", "type"],
                                TABLES["repeat_pages"].columns, ascending=[False, True, True]),
        "breakers": _sorted(breakers, ["trips", "breaker"], TABLES["breakers"].columns, ascending=[False, True]),
        "shadow": _shape_shadow(automation),
        "daily": _shape_daily(daily, period),
    }
    timings["shape"] = time.monotonic() - ts
    took = time.monotonic() - t0
    say(f"incident_trends {period.spec}: {incidents:,} incidents, {events:,} events, done in {took:.1f}s")
    return TrendReport(period=period, as_of=as_of, generated_at=generated_at, incidents=incidents, events=events,
                       tables=tables, duration_s=took, timings=timings)


def _split_mttr(groups: pd.DataFrame) -> pd.DataFrame:
    """percentile_cont(ARRAY[0.5, 0.95]) sorts once for both: split its array into mttr_p50_s / mttr_p95_s."""
    if groups.empty:
        return groups.assign(mttr_p50_s=pd.Series(dtype="float64"), mttr_p95_s=pd.Series(dtype="float64"))
    pairs = groups.pop("mttr_s").map(lambda v: v if v is not None else [None, None])
    groups["mttr_p50_s"] = pd.to_numeric(pairs.map(lambda v: v[0]), errors="coerce")
    groups["mttr_p95_s"] = pd.to_numeric(pairs.map(lambda v: v[1]), errors="coerce")
    return groups


def _empty(columns: tuple[str, ...]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})


def _sorted(df: pd.DataFrame, by: list[str], columns: tuple[str, ...],
            ascending: bool | list[bool] = True) -> pd.DataFrame:
    if df.empty:
        return _empty(columns)
    return df.sort_values(by, ascending=ascending, kind="stable").reset_index(drop=True)[list(columns)]


def _shape_total(automation: pd.DataFrame) -> pd.DataFrame:
    per_type = automation[automation["type"] != ALL]
    if per_type.empty:
        return _empty(TABLES["total"].columns)
    out = per_type[["type", "incidents"]].sort_values(["incidents", "type"], ascending=[False, True])
    return out.reset_index(drop=True).astype({"incidents": "int64"})


def _shape_automation(automation: pd.DataFrame) -> pd.DataFrame:
    cols = TABLES["automation"].columns
    if automation.empty or int(automation["incidents"].sum()) == 0:
        return _empty(cols)
    df = automation.copy()
    counts = ["incidents", "auto_resolved", "escalated", "held", "human_resolved", "ignored", "still_active"]
    df[counts] = df[counts].astype("int64")
    for part in ("auto_resolved", "escalated", "held"):
        df[f"{part}_pct"] = _pct(df[part], df["incidents"])
    for q in ("mttr_p50_s", "mttr_p95_s"):
        df[q] = pd.to_numeric(df[q], errors="coerce").round(1)
    df["_all"] = df["type"] == ALL
    df = df.sort_values(["_all", "incidents", "type"], ascending=[True, False, True], kind="stable")
    return df.reset_index(drop=True)[list(cols)]


def _shape_shadow(automation: pd.DataFrame) -> pd.DataFrame:
    cols = TABLES["shadow"].columns
    if automation.empty:
        return _empty(cols)
    df = automation[(automation["type"] != ALL) & (automation["shadow_incidents"] > 0)].copy()
    if df.empty:
        return _empty(cols)
    df[["shadow_incidents", "would_have_resolved"]] = df[["shadow_incidents", "would_have_resolved"]].astype("int64")
    df["would_have_resolved_pct"] = _pct(df["would_have_resolved"], df["shadow_incidents"])
    return df.sort_values(["shadow_incidents", "type"], ascending=[False, True]).reset_index(drop=True)[list(cols)]


def _shape_daily(daily: pd.DataFrame, period: Period) -> pd.DataFrame:
    """Every day of the period for every type seen (zeros where nothing happened), plus '(all)' per day."""
    cols = TABLES["daily"].columns
    if daily.empty:
        return _empty(cols)
    first = period.start.date()
    last = (period.end - timedelta(microseconds=1)).date()
    days = pd.date_range(first, last, freq="D").date
    types = sorted(t for t in daily["type"].unique() if t != ALL) + [ALL]
    grid = pd.MultiIndex.from_product([days, types], names=["day", "type"])
    df = daily.set_index(["day", "type"]).reindex(grid)
    counts = ["incidents", "auto_resolved", "escalated", "resolved"]
    df[counts] = df[counts].fillna(0).astype("int64")
    df["mttr_p50_s"] = pd.to_numeric(df["mttr_p50_s"], errors="coerce").round(1)
    return df.reset_index()[list(cols)]


# -- storing and loading ----------------------------------------------------------------------------

def save_trends(
    dsn: str | psycopg.Connection[Any],
    report: TrendReport,
    *,
    generated_by: str,
    charts: Mapping[str, tuple[str, bytes]] | None = None,
    html_path: str | None = None,
    report_name: str = "incident_trends",
) -> int:
    """Store `report` (and its PNG charts: name -> (title, png)), replacing any earlier one of the same period.

    One transaction: the old run's rows go (ON DELETE CASCADE) and the new ones come in together, so a
    reader sees either the old report or the new one. Returns the new report_runs id.
    """
    from fleetmedic.db.connect import connection

    with connection(dsn, application_name="fleetmedic-reports") as conn, conn.transaction(), conn.cursor() as cur:
        # Two concurrent runs for the same period: the second waits here, then replaces the first.
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('report:' || %s || ':' || %s))",
                    (report_name, report.period.slug))
        cur.execute(
            "DELETE FROM report_runs WHERE report = %s AND period_start = %s AND period_end = %s",
            (report_name, report.period.start, report.period.end),
        )
        cur.execute(
            """
            INSERT INTO report_runs (report, period, period_start, period_end, as_of, generated_at, generated_by,
                                     incidents, events, duration_s, html_path)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id
            """,
            (report_name, report.period.spec, report.period.start, report.period.end, report.as_of,
             report.generated_at, generated_by, report.incidents, report.events, report.duration_s, html_path),
        )
        row = cur.fetchone()
        assert row is not None
        run_id = int(row[0] if not isinstance(row, dict) else row["id"])
        for name, spec in TABLES.items():
            df = report.tables.get(name)
            if df is None or df.empty:
                continue
            cols = ["run_id", *spec.columns]
            stmt = sql.SQL("COPY {} ({}) FROM STDIN").format(
                sql.Identifier(spec.db_table), sql.SQL(", ").join(map(sql.Identifier, cols)))
            with cur.copy(stmt) as copy:
                for values in _db_rows(df[list(spec.columns)]):
                    copy.write_row((run_id, *values))
        for name, (title, png) in (charts or {}).items():
            cur.execute("INSERT INTO report_charts (run_id, name, title, png) VALUES (%s, %s, %s, %s)",
                        (run_id, name, title, png))
    report.run_id = run_id
    report.generated_by = generated_by
    report.html_path = html_path
    return run_id


def latest_run(dsn: str, *, period: str | None = None, report_name: str = "incident_trends") -> dict[str, Any] | None:
    """The newest stored run (optionally of a period spec such as '7d'), as a dict, or None."""
    with connect(dsn) as conn:
        return conn.execute(
            "SELECT * FROM report_runs WHERE report = %s AND (%s::text IS NULL OR period = %s) "
            "ORDER BY generated_at DESC, id DESC LIMIT 1",
            (report_name, period, period),
        ).fetchone()


def load_trends(
    dsn: str, *, run_id: int | None = None, period: str | None = None, limit: int | None = None,
) -> TrendReport | None:
    """A stored report: by run id, else the newest (of `period` when given); None when there is none.

    `limit` loads only the first rows of each table (row_count() still says how many there are).
    """
    with connect(dsn, row_factory=psycopg.rows.dict_row) as conn:
        if run_id is None:
            run = conn.execute(
                "SELECT * FROM report_runs WHERE report = 'incident_trends' AND (%s::text IS NULL OR period = %s) "
                "ORDER BY generated_at DESC, id DESC LIMIT 1", (period, period)).fetchone()
        else:
            run = conn.execute("SELECT * FROM report_runs WHERE id = %s", (run_id,)).fetchone()
        if run is None:
            return None
        tables: dict[str, pd.DataFrame] = {}
        counts: dict[str, int] = {}
        with conn.cursor(row_factory=psycopg.rows.tuple_row) as cur:
            for name, spec in TABLES.items():
                order = sql.SQL(", ").join(sql.SQL(o) for o in _LOAD_ORDER.get(name, spec.columns[:1]))
                query = sql.SQL("SELECT {} FROM {} WHERE run_id = %s ORDER BY {} LIMIT %s").format(
                    sql.SQL(", ").join(map(sql.Identifier, spec.columns)), sql.Identifier(spec.db_table), order)
                cur.execute(query, (run["id"], limit))
                df = pd.DataFrame.from_records(cur.fetchall(), columns=list(spec.columns))
                tables[name] = df if not df.empty else _empty(spec.columns)
                if limit is not None:
                    cur.execute(sql.SQL("SELECT count(*) FROM {} WHERE run_id = %s").format(
                        sql.Identifier(spec.db_table)), (run["id"],))
                    row = cur.fetchone()
                    counts[name] = int(row[0]) if row else 0
    period_obj = Period(spec=run["period"], start=run["period_start"], end=run["period_end"])
    return TrendReport(period=period_obj, as_of=run["as_of"], generated_at=run["generated_at"],
                       incidents=run["incidents"], events=run["events"], tables=tables,
                       duration_s=run["duration_s"] or 0.0, run_id=run["id"], generated_by=run["generated_by"],
                       html_path=run["html_path"], row_counts=counts)


_LOAD_ORDER: dict[str, tuple[str, ...]] = {
    "total": ("incidents DESC", "type"),
    "stale": ("type", "state"),
    "kernel_panics": ("opened_at", "incident_id"),
    "automation": (f"type = '{ALL}'", "incidents DESC", "type"),
    "pages": ("pages DESC", "type"),
    "repeat_pages": ("pages DESC", "resource", "type"),
    "breakers": ("trips DESC", "breaker"),
    "shadow": ("shadow_incidents DESC", "type"),
    "daily": ("day", f"type = '{ALL}'", "type"),
}


def chart_png(dsn: str, run_id: int, name: str) -> bytes | None:
    """One stored chart's PNG bytes, or None."""
    with connect(dsn) as conn:
        row = conn.execute("SELECT png FROM report_charts WHERE run_id = %s AND name = %s", (run_id, name)).fetchone()
    return bytes(row["png"]) if row else None


def chart_list(dsn: str, run_id: int) -> list[dict[str, str]]:
    """The charts stored with a run: name and title, in name order."""
    with connect(dsn) as conn:
        return list(conn.execute(
            "SELECT name, title FROM report_charts WHERE run_id = %s ORDER BY name", (run_id,)).fetchall())
