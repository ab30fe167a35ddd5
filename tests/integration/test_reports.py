"""incident_trends over a seeded month of 10k incidents: every report table filled, charts written, and the
numbers equal to counts made independently here (plain SQL, or Python over the raw rows)."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import query, run_concurrently

from fleetmedic.reports import PeriodError, parse_period
from fleetmedic.reports.runner import run_incident_trends
from fleetmedic.reports.seed import seed_history
from fleetmedic.reports.trends import ALL, TABLES, build_trends, load_trends, save_trends

END = datetime(2026, 5, 20, 15, 30, tzinfo=UTC)
ACTIVE = {"open", "remediating", "await_resolution", "held", "escalated"}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def month(ops_dsn: str) -> str:
    """10k incidents over the 30 days before END, with their audit events, pages and breaker trips."""
    summary = seed_history(ops_dsn, incidents=10_000, days=30, end=END)
    assert summary.incidents == 10_000 and summary.events > 30_000
    return ops_dsn


def _run(dsn: str, run_id: int) -> dict:
    return query(dsn, "SELECT * FROM report_runs WHERE id = %s", (run_id,))[0]


def _rows(dsn: str, table: str, run_id: int) -> list[dict]:
    return query(dsn, f"SELECT * FROM {table} WHERE run_id = %s", (run_id,))


def _raw(dsn: str, start: datetime, end: datetime) -> tuple[dict[int, dict], dict[int, list[dict]]]:
    incidents = {r["id"]: r for r in query(
        dsn, "SELECT * FROM incidents WHERE opened_at >= %s AND opened_at < %s", (start, end))}
    events: dict[int, list[dict]] = defaultdict(list)
    for e in query(dsn, "SELECT * FROM incident_events WHERE incident_id = ANY(%s) ORDER BY id", (list(incidents),)):
        events[e["incident_id"]].append(e)
    return incidents, events


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks, as PostgreSQL's percentile_cont."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def test_month_of_incidents_fills_every_report_table_and_writes_the_charts(month: str, tmp_path: Path) -> None:
    lines: list[str] = []
    report = run_incident_trends(month, "30d", end=END, generated_by="human:tester", directory=tmp_path,
                                 progress=lines.append)
    run = _run(month, report.run_id)
    assert (run["period"], run["period_start"], run["period_end"]) == (
        "30d", datetime(2026, 4, 21, tzinfo=UTC), datetime(2026, 5, 21, tzinfo=UTC))
    assert run["generated_by"] == "human:tester" and run["as_of"] == END

    for spec in TABLES.values():
        assert _rows(month, spec.db_table, report.run_id), f"{spec.db_table} is empty"
    charts = {r["name"]: bytes(r["png"]) for r in _rows(month, "report_charts", report.run_id)}
    assert set(charts) == {"incidents_per_day", "mttr_trend", "automation_rate"}
    for name, png in charts.items():
        assert png.startswith(PNG) and len(png) > 10_000, name
        assert (Path(run["html_path"]).parent / f"{name}.png").read_bytes() == png
    html = Path(run["html_path"]).read_text()
    for title in ("Kernel panics in last 30d", "Stale incidents (over 2 days old)", "Total incidents",
                  "Automation outcome per type", "Paged twice or more for the same thing"):
        assert title in html
    assert (tmp_path / "incident_trends" / "latest.html").exists()
    # a month is aggregated in week-long slices, each with a progress line
    assert [line for line in lines if " slice " in line][0].startswith("incident_trends 30d: slice 1/5")


def test_totals_stale_and_kernel_panics_match_independent_counts(month: str, tmp_path: Path) -> None:
    report = run_incident_trends(month, "30d", end=END, generated_by="human:tester", directory=tmp_path)
    run = _run(month, report.run_id)
    start, end, as_of = run["period_start"], run["period_end"], run["as_of"]

    # Total incidents: type / count, by plain SQL
    expected = {r["type"]: r["n"] for r in query(
        month, "SELECT type, count(*) AS n FROM incidents WHERE opened_at >= %s AND opened_at < %s GROUP BY type",
        (start, end))}
    got = {r["type"]: r["incidents"] for r in _rows(month, "report_total_incidents", report.run_id)}
    assert got == expected and sum(got.values()) == run["incidents"] > 9_000

    # Stale incidents (over 2 days old): type / state / count, replaying each incident's events up to as_of
    stale: Counter[tuple[str, str]] = Counter()
    old = query(month, "SELECT id, type FROM incidents WHERE opened_at < %s", (as_of - timedelta(days=2),))
    last_state: dict[int, str] = {}
    for e in query(month, "SELECT incident_id, to_state FROM incident_events WHERE at <= %s ORDER BY id", (as_of,)):
        last_state[e["incident_id"]] = e["to_state"]
    for inc in old:
        if last_state.get(inc["id"]) in ACTIVE:
            stale[(inc["type"], last_state[inc["id"]])] += 1
    got_stale = {(r["type"], r["state"]): r["incidents"] for r in _rows(month, "report_stale_incidents", report.run_id)}
    assert got_stale == dict(stale) and sum(stale.values()) > 0

    # Kernel panics in the period
    panics = [r["id"] for r in query(
        month, "SELECT id FROM incidents WHERE type = 'kernel_panic' AND opened_at >= %s AND opened_at < %s "
               "ORDER BY opened_at, id", (start, end))]
    got_panics = [r["incident_id"] for r in sorted(_rows(month, "report_kernel_panics", report.run_id),
                                                   key=lambda r: (r["opened_at"], r["incident_id"]))]
    assert got_panics == panics and len(panics) > 100


def test_automation_outcome_and_mttr_match_the_audit_trail(month: str) -> None:
    report = build_trends(month, "30d", now=END, progress=lambda _m: None)
    incidents, events = _raw(month, report.period.start, report.period.end)

    expected: dict[str, Counter[str]] = defaultdict(Counter)
    ttr: dict[str, list[float]] = defaultdict(list)
    for inc_id, inc in incidents.items():
        evs = events[inc_id]
        escalated = any(e["to_state"] == "escalated" for e in evs)
        held = any(e["to_state"] == "held" for e in evs)
        resolves = [e for e in evs if e["to_state"] == "resolved"]
        human = any(e["actor"].startswith("human:") for e in resolves)
        ignored = any(e["to_state"] == "ignored" for e in evs)
        for key in (inc["type"], ALL):
            c = expected[key]
            c["incidents"] += 1
            c["auto_resolved"] += bool(resolves and not human and not escalated)
            c["escalated"] += escalated
            c["held"] += held
            c["human_resolved"] += human
            c["ignored"] += ignored
            c["still_active"] += not resolves and not ignored
            if resolves:
                ttr[key].append((min(e["at"] for e in resolves) - inc["opened_at"]).total_seconds())

    table = {r["type"]: r for r in report.tables["automation"].to_dict(orient="records")}
    assert set(table) == set(expected)
    for key, c in expected.items():
        row = table[key]
        for column, value in c.items():
            assert row[column] == value, (key, column)
        assert row["auto_resolved_pct"] == round(100 * c["auto_resolved"] / c["incidents"], 1)
        assert row["escalated_pct"] == round(100 * c["escalated"] / c["incidents"], 1)
        assert row["mttr_p50_s"] == pytest.approx(_percentile(ttr[key], 0.5), abs=0.06)
        assert row["mttr_p95_s"] == pytest.approx(_percentile(ttr[key], 0.95), abs=0.06)
    assert 0 < table[ALL]["escalated"] < table[ALL]["auto_resolved"]
    assert statistics.median(ttr[ALL]) == pytest.approx(table[ALL]["mttr_p50_s"], abs=0.06)

    # shadow mode: the gate's shadow decisions and whether the happy path would have resolved
    shadow: dict[str, Counter[str]] = defaultdict(Counter)
    for inc_id, inc in incidents.items():
        datas = [e["data"] for e in events[inc_id]]
        if any(d.get("shadow") is True for d in datas):
            shadow[inc["type"]]["shadow_incidents"] += 1
            shadow[inc["type"]]["would_have_resolved"] += any(
                d.get("would_resolve") is True and d.get("would", "act") == "act" for d in datas)
    got = {r["type"]: r for r in report.tables["shadow"].to_dict(orient="records")}
    assert {t: {"shadow_incidents": r["shadow_incidents"], "would_have_resolved": r["would_have_resolved"]}
            for t, r in got.items()} == {t: dict(c) for t, c in shadow.items()}

    # per day: every day of the period, and the days add up to the totals
    daily = report.tables["daily"]
    per_day_all = daily[daily["type"] == ALL]
    assert len(per_day_all) == 30
    assert int(per_day_all["incidents"].sum()) == expected[ALL]["incidents"]
    assert int(daily[daily["type"] != ALL]["incidents"].sum()) == expected[ALL]["incidents"]


def test_pages_repeat_pages_and_breaker_trips_match_plain_sql(month: str) -> None:
    # a page about a failed run (no incident) counts under '(no incident)'
    query(month, "INSERT INTO pages (dedup_key, summary, created_at, status) VALUES ('run-1', 'sweep failed', %s, "
                 "'pending')", (END - timedelta(hours=1),))
    report = build_trends(month, "30d", now=END, progress=lambda _m: None)
    start, end = report.period.start, report.period.end

    expected_pages = {r["type"]: r for r in query(month, """
        SELECT coalesce(i.type, '(no incident)') AS type, count(*) AS pages,
               count(*) FILTER (WHERE p.status = 'delivered') AS delivered
        FROM pages p LEFT JOIN incidents i ON i.id = p.incident_id
        WHERE p.action = 'trigger' AND p.created_at >= %s AND p.created_at < %s GROUP BY 1""", (start, end))}
    got_pages = {r["type"]: r for r in report.tables["pages"].to_dict(orient="records")}
    assert set(got_pages) == set(expected_pages) and "(no incident)" in got_pages
    for t, r in expected_pages.items():
        assert (got_pages[t]["pages"], got_pages[t]["delivered"]) == (r["pages"], r["delivered"])
        assert got_pages[t]["undelivered"] == r["pages"] - r["delivered"]

    expected_repeat = {(r["name"], r["type"]): r["n"] for r in query(month, """
        SELECT r.name, i.type, count(*) AS n FROM pages p JOIN incidents i ON i.id = p.incident_id
        JOIN resources r ON r.id = i.resource_id
        WHERE p.action = 'trigger' AND p.created_at >= %s AND p.created_at < %s
        GROUP BY 1, 2 HAVING count(*) > 1""", (start, end))}
    got_repeat = {(r["resource"], r["type"]): r["pages"] for r in report.tables["repeat_pages"].to_dict("records")}
    assert got_repeat == expected_repeat and expected_repeat
    assert list(report.tables["repeat_pages"]["pages"]) == sorted(report.tables["repeat_pages"]["pages"],
                                                                  reverse=True)

    expected_trips = {r["breaker"]: r["n"] for r in query(month, """
        SELECT breaker, count(*) AS n FROM breaker_events WHERE state = 'open' AND at >= %s AND at < %s
        GROUP BY 1""", (start, end))}
    got_trips = {r["breaker"]: r["trips"] for r in report.tables["breakers"].to_dict("records")}
    assert got_trips == expected_trips and sum(got_trips.values()) > 10


def test_rerunning_a_period_replaces_its_report(month: str, tmp_path: Path) -> None:
    first = run_incident_trends(month, "7d", end=END, generated_by="human:tester", directory=tmp_path)
    again = run_incident_trends(month, "7d", end=END + timedelta(hours=3), generated_by="human:tester",
                                directory=tmp_path)
    other = run_incident_trends(month, "30d", end=END, generated_by="human:tester", directory=tmp_path)
    runs = query(month, "SELECT id, period FROM report_runs ORDER BY id")
    assert [(r["id"], r["period"]) for r in runs] == [(again.run_id, "7d"), (other.run_id, "30d")]
    assert first.run_id != again.run_id
    assert query(month, "SELECT count(*) AS n FROM report_total_incidents WHERE run_id = %s",
                 (first.run_id,))[0]["n"] == 0
    loaded = load_trends(month, period="7d")
    assert loaded is not None and loaded.run_id == again.run_id
    for name in TABLES:
        assert loaded.tables[name].reset_index(drop=True).equals(again.tables[name].reset_index(drop=True)), name


def test_two_runs_of_one_period_at_once_leave_one_report(month: str) -> None:
    report = build_trends(month, "7d", now=END, progress=lambda _m: None)
    results = run_concurrently(3, lambda i: save_trends(month, report, generated_by=f"human:racer{i}"))
    assert all(isinstance(r, int) for r in results), results
    runs = query(month, "SELECT id FROM report_runs")
    assert len(runs) == 1 and runs[0]["id"] == max(results)  # type: ignore[type-var]


def test_an_empty_ops_db_gives_empty_tables_and_no_data_charts(ops_dsn: str, tmp_path: Path) -> None:
    report = run_incident_trends(ops_dsn, "7d", end=END, generated_by="human:tester", directory=tmp_path)
    assert report.incidents == 0
    assert all(df.empty for df in report.tables.values())
    charts = _rows(ops_dsn, "report_charts", report.run_id)
    assert len(charts) == 3 and all(bytes(c["png"]).startswith(PNG) for c in charts)
    assert "none in this period" in Path(report.html_path).read_text()


@pytest.mark.parametrize(
    ("spec", "start", "end"),
    [
        ("7d", datetime(2026, 5, 14, tzinfo=UTC), datetime(2026, 5, 21, tzinfo=UTC)),
        ("24h", datetime(2026, 5, 19, 16, tzinfo=UTC), datetime(2026, 5, 20, 16, tzinfo=UTC)),
        ("2w", datetime(2026, 5, 7, tzinfo=UTC), datetime(2026, 5, 21, tzinfo=UTC)),
        ("2026-05-01..2026-05-08", datetime(2026, 5, 1, tzinfo=UTC), datetime(2026, 5, 8, tzinfo=UTC)),
    ],
)
def test_periods_round_up_so_a_rerun_hits_the_same_window(spec: str, start: datetime, end: datetime) -> None:
    period = parse_period(spec, end=END)
    assert (period.start, period.end) == (start, end)
    assert parse_period(spec, end=END + timedelta(minutes=20)) == period


def test_a_scheduled_run_at_midnight_keeps_its_window() -> None:
    midnight = datetime(2026, 5, 20, tzinfo=UTC)
    assert parse_period("7d", end=midnight).end == midnight


@pytest.mark.parametrize("spec", ["", "7", "seven days", "0d", "2026-05-08..2026-05-01", "99999d"])
def test_a_period_that_is_not_understood_says_what_is(spec: str) -> None:
    with pytest.raises(PeriodError, match="period"):
        parse_period(spec, end=END)
