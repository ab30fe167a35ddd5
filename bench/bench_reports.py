"""Trend report benchmark: incident_trends over ~10M incident events, against plain SQL measured in the same run.

1. fleetmedic's aggregation (`build_trends`: per-incident outcomes in slices into a temp table, GROUPING
   SETS over it, pandas shaping) against the same tables computed by plain SQL statements straight
   from the base tables (one statement for everything derived from the audit events, the others as
   build_trends runs them), in the same database, same session settings, alternating runs.
   Targets: under 30 s, and within 3x of plain SQL.
2. The whole DAG task for reference (aggregate + charts + HTML + store, replacing the period).

Run: .venv/bin/python bench/bench_reports.py [--events 10000000] [--period 30d] [--repeat 2]
     [--dsn postgresql://...  (reuse a database seeded by an earlier run with --keep)] [--keep]
Machines here are shared and noisy: each measurement is the best of --repeat runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from fleetmedic.db.migrate import migrate
from fleetmedic.localfleet.services import PostgresCluster, free_port
from fleetmedic.reports import trends
from fleetmedic.reports.period import Period, parse_period
from fleetmedic.reports.seed import seed_history

EVENTS_PER_INCIDENT = 4.1  # what the seeder's outcome mix averages
TARGET_SECONDS = 30.0
TARGET_RATIO = 3.0

BASELINE_OUTCOMES = f"""
WITH inc AS (
    SELECT id, type, opened_at FROM incidents WHERE opened_at >= %(start)s AND opened_at < %(end)s
), ev AS (
    SELECT e.incident_id,
           count(*) AS events,
           bool_or(e.to_state = 'escalated') AS escalated,
           bool_or(e.to_state = 'held') AS held,
           min(e.at) FILTER (WHERE e.to_state = 'resolved') AS resolved_at,
           bool_or(e.to_state = 'resolved' AND e.actor LIKE 'human:%%') AS human_resolved,
           bool_or(e.to_state = 'ignored') AS ignored,
           bool_or({trends.SHADOW_EVENT}) AS shadow,
           bool_or({trends.WOULD_RESOLVE_EVENT}) AS would_resolve
    FROM incident_events e JOIN inc ON inc.id = e.incident_id
    GROUP BY e.incident_id
), o AS (
    SELECT inc.type, inc.opened_at, coalesce(ev.events, 0) AS events,
           coalesce(ev.escalated, false) AS escalated, coalesce(ev.held, false) AS held, ev.resolved_at,
           coalesce(ev.human_resolved, false) AS human_resolved, coalesce(ev.ignored, false) AS ignored,
           coalesce(ev.shadow, false) AS shadow, coalesce(ev.would_resolve, false) AS would_resolve,
           extract(epoch FROM ev.resolved_at - inc.opened_at)::double precision AS ttr_s
    FROM inc LEFT JOIN ev ON ev.incident_id = inc.id
)
SELECT (opened_at AT TIME ZONE 'UTC')::date AS day, coalesce(type, '(all)') AS type,
       count(*) AS incidents,
       count(*) FILTER (WHERE resolved_at IS NOT NULL AND NOT human_resolved AND NOT escalated) AS auto_resolved,
       count(*) FILTER (WHERE escalated) AS escalated,
       count(*) FILTER (WHERE held) AS held,
       count(*) FILTER (WHERE human_resolved) AS human_resolved,
       count(*) FILTER (WHERE ignored) AS ignored,
       count(*) FILTER (WHERE resolved_at IS NULL AND NOT ignored) AS still_active,
       count(*) FILTER (WHERE resolved_at IS NOT NULL) AS resolved,
       percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY ttr_s) AS mttr_s,
       sum(events) AS events,
       count(*) FILTER (WHERE shadow) AS shadow_incidents,
       count(*) FILTER (WHERE shadow AND would_resolve) AS would_have_resolved
FROM o
GROUP BY GROUPING SETS ((type), (), ((opened_at AT TIME ZONE 'UTC')::date, type),
                        ((opened_at AT TIME ZONE 'UTC')::date))
"""


def plain_sql(dsn: str, period: Period) -> dict[str, int]:
    """Every report table by plain SQL, rows fetched as tuples; returns row counts per statement."""
    window = {"start": period.start, "end": period.end}
    as_of = period.as_of()
    counts: dict[str, int] = {}
    with psycopg.connect(dsn) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction(), conn.cursor() as cur:
            trends._session_settings(cur)
            for name, query, params in (
                ("outcomes", BASELINE_OUTCOMES, window),
                ("kernel_panics", trends.KERNEL_PANICS, window),
                ("stale", trends.STALE, {"as_of": as_of, "stale_before": as_of - trends.STALE_AFTER,
                                         "active": list(trends.ACTIVE)}),
                ("pages", trends.PAGES, window),
                ("breakers", trends.BREAKERS, window),
            ):
                cur.execute(query, params)
                counts[name] = len(cur.fetchall())
    return counts


def count_events(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM incident_events").fetchone()
    return int(row[0]) if row else 0


def seed_fast(dsn: str, incidents: int, days: int) -> None:
    """Seed with the secondary indexes dropped and rebuilt afterwards (a throwaway benchmark database)."""
    tables = ("incidents", "incident_events", "pages")
    with psycopg.connect(dsn, autocommit=True) as conn:
        defs = conn.execute(
            "SELECT i.indexname, i.indexdef FROM pg_indexes i "
            "JOIN pg_class c ON c.relname = i.indexname JOIN pg_index x ON x.indexrelid = c.oid "
            "WHERE i.schemaname = 'public' AND i.tablename = ANY(%s) AND NOT x.indisprimary "
            "AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = c.oid)",
            (list(tables),),
        ).fetchall()
        for name, _ in defs:
            conn.execute(f'DROP INDEX "{name}"')
    seed_history(dsn, incidents=incidents, days=days, progress=lambda m: print(f"  {m}", flush=True))
    t0 = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        for _, definition in defs:
            conn.execute(definition)
        conn.execute("VACUUM ANALYZE incidents, incident_events, pages")
    print(f"  rebuilt {len(defs)} indexes and vacuumed in {time.perf_counter() - t0:.1f}s", flush=True)


def best_of(n: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(n):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000, help="incident events to aggregate")
    parser.add_argument("--days", type=int, default=30, help="days of history to spread them over")
    parser.add_argument("--period", default="30d", help="report period (default: the whole history)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each side; the best counts")
    parser.add_argument("--dsn", help="use this database (seeded if it has fewer events than asked)")
    parser.add_argument("--keep", action="store_true", help="leave the temporary PostgreSQL running")
    args = parser.parse_args()

    cluster: PostgresCluster | None = None
    workdir: Path | None = None
    try:
        if args.dsn:
            dsn = args.dsn  # an ops database migrated by fleetmedic (e.g. kept from an earlier run)
        else:
            workdir = Path(tempfile.mkdtemp(prefix="fleetmedic-bench-reports-"))
            os.chmod(workdir, 0o755)
            cluster = PostgresCluster(workdir / "pg", free_port())
            cluster.start()
            cluster.create_database("bench")
            dsn = cluster.dsn("bench")
            migrate(dsn)
        have = count_events(dsn)
        if have < 0.9 * args.events:
            incidents = int(args.events / EVENTS_PER_INCIDENT)
            print(f"seeding {incidents:,} incidents (~{args.events:,} events) over {args.days} days ...", flush=True)
            seed_fast(dsn, incidents, args.days)
        events = count_events(dsn)
        period = parse_period(args.period)
        print(f"\nincident_trends {period.label} over a database of {events:,} incident events")

        ours_times, plain_times = [], []
        report = None
        for _ in range(args.repeat):  # alternate, so both sides see the same machine weather
            t, report = best_of(1, lambda: trends.build_trends(dsn, period, progress=lambda _m: None))
            ours_times.append(t)
            t, _counts = best_of(1, lambda: plain_sql(dsn, period))
            plain_times.append(t)
        assert report is not None
        ours, plain = min(ours_times), min(plain_times)
        print(f"  aggregated {report.incidents:,} incidents / {report.events:,} events of the period")
        print(f"  fleetmedic build_trends : {ours:7.2f} s  (runs: {', '.join(f'{t:.1f}' for t in ours_times)})")
        print(f"  plain SQL, same tables  : {plain:7.2f} s  (runs: {', '.join(f'{t:.1f}' for t in plain_times)})")
        ratio = ours / plain
        print(f"  ratio fleetmedic / plain SQL: {ratio:.2f}x   (target <= {TARGET_RATIO:.0f}x: "
              f"{'met' if ratio <= TARGET_RATIO else 'NOT met'})")
        print(f"  time: {ours:.1f} s   (target < {TARGET_SECONDS:.0f} s: "
              f"{'met' if ours < TARGET_SECONDS else 'NOT met'})")
        print("  build_trends steps: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items()))

        from fleetmedic.reports.runner import run_incident_trends

        out = Path(tempfile.mkdtemp(prefix="fleetmedic-bench-reports-html-"))
        try:
            full, _ = best_of(1, lambda: run_incident_trends(dsn, period, generated_by="human:bench",
                                                             directory=out, progress=lambda _m: None))
        finally:
            shutil.rmtree(out, ignore_errors=True)
        print(f"  whole DAG task (aggregate + charts + HTML + store, replacing the period): {full:.1f} s")
        if args.keep and cluster is not None:
            print(f"\nkept: {dsn}  (stop with: PostgresCluster({str(cluster.base_dir)!r}, {cluster.port}).stop())")
    finally:
        if cluster is not None and not args.keep:
            cluster.stop(mode="immediate")
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
