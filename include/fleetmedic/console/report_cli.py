"""`fleetmedic report [NAME] [--period 7d]`: the trend tables from the talk, printed like the talk shows them."""

from __future__ import annotations

import psycopg
import typer
from rich.table import Table

from fleetmedic.console.common import DsnOption, JsonOption, console, err, fail, ops_dsn, print_json
from fleetmedic.console.status_cli import SingleCommand

__all__ = ["NAMES", "app"]

# Command-line names (dashes) -> report table names; the first three are the talk's.
NAMES = {
    "kernel-panics": "kernel_panics",
    "stale": "stale",
    "total": "total",
    "automation": "automation",
    "pages": "pages",
    "repeat-pages": "repeat_pages",
    "breakers": "breakers",
    "shadow": "shadow",
    "daily": "daily",
}
DEFAULT = ("kernel_panics", "stale", "total", "automation", "pages", "repeat_pages", "breakers", "shadow")

app = typer.Typer(cls=SingleCommand, invoke_without_command=True, add_completion=False)


@app.callback()
def report(
    name: str = typer.Argument(
        "all", metavar="NAME",
        help=f"which table: all (default), {', '.join(NAMES)}"),
    period: str = typer.Option("7d", "--period", "-p",
                               help="a length ending now (24h, 7d, 30d, 2w) or days (2026-05-01..2026-05-08)"),
    stored: bool = typer.Option(False, "--stored",
                                help="print the report the incident_trends DAG stored for the period, "
                                     "instead of computing it now"),
    save: bool = typer.Option(False, "--save",
                              help="also store it (replacing the period's report), with charts and HTML, "
                                   "as the incident_trends DAG does"),
    limit: int = typer.Option(30, "--limit", min=0, help="rows per listing (0: all)"),
    dsn: str | None = DsnOption,
    as_json: bool = JsonOption,
) -> None:
    """Trend tables over a period: the talk's 'Kernel panics in last week', 'Stale incidents (over 2 days
    old)', 'Total incidents', and automation outcome, pages, repeat pages, breaker trips, shadow mode.

    Computed now from the ops DB (nothing stored), or --stored from the last incident_trends DAG run.
    Examples: `fleetmedic report`, `fleetmedic report kernel-panics --period 30d`,
    `fleetmedic report total --json`, `fleetmedic report --stored`.
    """
    from fleetmedic.db.connect import OpsDatabaseUnavailable
    from fleetmedic.reports import PeriodError, build_trends, load_trends, parse_period

    key = name.strip().lower().replace("_", "-")
    if key != "all" and key not in NAMES:
        fail(f"no report table {name!r}: choose all or one of {', '.join(NAMES)}", 2)
    if stored and save:
        fail("--stored prints a stored report and --save stores a new one: give one of them", 2)
    try:
        wanted = parse_period(period)
    except PeriodError as exc:
        fail(str(exc), 2)
    tables = DEFAULT if key == "all" else (NAMES[key],)
    dsn = ops_dsn(dsn)
    progress = (lambda line: err.print(f"[dim]{line}[/dim]", highlight=False)) if not as_json else (lambda _l: None)
    try:
        if stored:
            result = load_trends(dsn, period=wanted.spec)
            if result is None:
                fail(f"no stored report for period {wanted.spec}: run the incident_trends DAG with period "
                     f"{wanted.spec}, or `fleetmedic report --save --period {wanted.spec}`")
        elif save:
            from fleetmedic.reports import run_incident_trends
            from fleetmedic.safety.overrides import OverrideError, human_actor

            try:
                actor = human_actor()
            except OverrideError as exc:
                fail(str(exc))
            result = run_incident_trends(dsn, wanted, generated_by=actor, progress=progress)
        else:
            result = build_trends(dsn, wanted, progress=progress)
    except OpsDatabaseUnavailable as exc:
        fail(str(exc))
    except psycopg.errors.UndefinedTable as exc:
        fail(f"{exc.diag.message_primary}: this ops database predates the report tables; run `fleetmedic db migrate`")

    if as_json:
        body = result.as_dict()
        body["tables"] = {t: body["tables"][t] for t in tables}
        print_json(body)
        return
    _print(result, tables, limit or None)


def _print(result, tables: tuple[str, ...], limit: int | None) -> None:  # type: ignore[no-untyped-def]
    from fleetmedic.reports.render import table_rows

    where = f"report run {result.run_id}, generated {result.generated_at:%Y-%m-%d %H:%M} UTC" if result.run_id \
        else f"computed {result.generated_at:%Y-%m-%d %H:%M} UTC"
    console.print(f"[bold]{result.period.label}[/bold]: {result.incidents:,} incidents, {result.events:,} audit "
                  f"events ({where})", highlight=False)
    if result.html_path:
        console.print(f"HTML: {result.html_path}", highlight=False)
    for name in tables:
        headers, rows, more = table_rows(result, name, limit)
        if not rows:
            console.print(f"\n[bold]{result.title(name)}[/bold]: none", highlight=False)
            continue
        table = Table(title=result.title(name), title_justify="left", title_style="bold")
        for i, h in enumerate(headers):
            table.add_column(h, no_wrap=i == 0)
        for row in rows:
            table.add_row(*row)
        console.print()
        console.print(table)
        if more:
            console.print(f"  … and {more} more (--limit 0 for all)", highlight=False)
