"""`fleetmedic console`: an interactive Python session (ptpython) with the incident store, fleet, breakers,
pager and reports loaded. Human actions taken there are audited with your name like any other override.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from fleetmedic.console.common import DsnOption, fail, ops_dsn
from fleetmedic.console.status_cli import SingleCommand

__all__ = ["Rows", "app", "banner", "make_namespace"]


def _text(render: Callable[[Console], None], width: int | None = None) -> str:
    buf = io.StringIO()
    columns = width or shutil.get_terminal_size((140, 40)).columns
    render(Console(file=buf, width=columns, force_terminal=False, color_system=None))
    return buf.getvalue().rstrip()


class Done:
    """What a human action did: shows as one line in the REPL; `.value` is the incident, event or change."""

    def __init__(self, message: str, value: Any) -> None:
        self.message, self.value = message, value

    def __repr__(self) -> str:
        return self.message


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value


class Rows(list[dict[str, Any]]):
    """A list of dict rows that shows itself as a table in the REPL (iterate, index, filter as a list)."""

    def __init__(self, rows: Iterable[Any], columns: Sequence[str] | None = None, title: str | None = None):
        super().__init__(dict(_plain(r)) for r in rows)
        self.columns = list(columns) if columns else (list(self[0]) if self else [])
        self.title = title

    def __repr__(self) -> str:
        if not self:
            return f"{self.title + ': ' if self.title else ''}(none)"

        def render(c: Console) -> None:
            table = Table(*self.columns, title=self.title, title_justify="left")
            for r in self:
                table.add_row(*[_cell(r.get(col)) for col in self.columns])
            c.print(table)

        return _text(render)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if hasattr(value, "strftime"):
        return f"{value:%Y-%m-%d %H:%M:%S}"
    text = str(value)
    return text if len(text) <= 70 else text[:67] + "..."


class Namespace:
    """A group of helpers with a readable repr listing them (fleet, breakers, pager, reports)."""

    def __init__(self, name: str, doc: str, **members: Callable[..., Any]) -> None:
        self._name, self._doc = name, doc
        for key, fn in members.items():
            setattr(self, key, fn)
        self._members = members

    def __repr__(self) -> str:
        lines = [f"{self._name}: {self._doc}"]
        for key, fn in self._members.items():
            first = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
            lines.append(f"  {self._name}.{key}(): {first}")
        return "\n".join(lines)


def make_namespace(dsn: str, actor: str) -> dict[str, Any]:
    """Everything the session starts with; human actions use `actor` (human:<name>) for the audit trail."""
    import psycopg

    from fleetmedic.incidents.store import IncidentStore
    from fleetmedic.inventory import get_resource, list_resources
    from fleetmedic.pager.outbox import deliver_pending, list_pages

    store = IncidentStore(dsn)

    # -- incidents -------------------------------------------------------------------------------
    def incidents(state: str | list[str] | None = None, type: str | None = None, limit: int = 20) -> Rows:
        """Incidents, newest first (state: one state or a list; type: an incident type)."""
        found = store.list(state=state, type=type, limit=limit)
        return Rows(found, ["id", "type", "resource_id", "state", "step", "opened_at", "detections", "reason"],
                    title="incidents")

    def show(incident_id: int) -> Rows:
        """One incident's audit trail (the incident itself: store.get(id))."""
        inc = store.get(incident_id)
        return Rows(store.events(incident_id), ["at", "from_state", "to_state", "step", "actor", "reason"],
                    title=f"incident {inc.id} {inc.type} on resource {inc.resource_id}: {inc.state} "
                          f"(version {inc.version})")

    def ack(incident_id: int, reason: str) -> Done:
        """Acknowledge: record that you own the incident now (audited; no state change)."""
        try:
            from fleetmedic.safety.overrides import acknowledge
        except ImportError:
            event = store.note(incident_id, actor=actor, reason=f"acknowledged by {actor}: {reason}",
                               data={"ack": True})
        else:
            event = acknowledge(dsn, incident_id, actor=actor, reason=reason)
        return Done(f"incident {incident_id}: acknowledged by {actor} (audit event {event.id})", event)

    def ignore(incident_id: int, reason: str, until: str = "1d") -> Done:
        """Ignore until a time ('2h', '1d' or an ISO date-time): re-detections only refresh it."""
        from fleetmedic.safety.overrides import ignore as ignore_
        from fleetmedic.safety.overrides import parse_until

        inc = ignore_(dsn, incident_id, actor=actor, reason=reason, until=parse_until(until))
        return Done(f"incident {incident_id}: ignored until {inc.ignored_until:%Y-%m-%d %H:%M %Z} by {actor}", inc)

    def resolve(incident_id: int, reason: str) -> Done:
        """A human says it is fixed: resolved (its page resolves too)."""
        try:
            from fleetmedic.safety.overrides import resolve as resolve_
        except ImportError:
            inc = store.resolve(incident_id, actor=actor, reason=f"resolved by {actor}: {reason}")
        else:
            inc = resolve_(dsn, incident_id, actor=actor, reason=reason)
        return Done(f"incident {incident_id}: {inc.state} (by {actor})", inc)

    # -- fleet -----------------------------------------------------------------------------------
    def fleet_ls() -> Rows:
        """The inventory: every resource with its server."""
        with psycopg.connect(dsn) as conn:
            found = list_resources(conn)
        return Rows([{"id": r.id, "name": r.name, "kind": r.kind, "role": r.role, "address": f"{r.host}:{r.port}",
                      "server": r.server.name if r.server else None, "enabled": r.enabled} for r in found],
                    title="fleet")

    def fleet_get(name_or_id: str | int) -> Any:
        """One resource (by name or id) with its server."""
        with psycopg.connect(dsn) as conn:
            return get_resource(conn, name_or_id)

    def fleet_faults() -> Rows:
        """The faults `fleet.inject` can inject into the demo fleet."""
        from fleetmedic.localfleet.faults import FAULTS

        return Rows([{"fault": f.name, "applies_to": ", ".join(f.kinds), "description": f.description}
                     for f in sorted(FAULTS.values(), key=lambda f: f.name)], title="faults")

    def fleet_inject(fault: str, target: str, yes: bool = False) -> Any:
        """Inject a real fault into a demo-fleet resource (yes=True for destructive ones); says how to undo."""
        from fleetmedic.localfleet.faults import inject

        return inject(fault, dsn, target, yes=yes)

    # -- breakers --------------------------------------------------------------------------------
    def breakers_list() -> Rows:
        """Every breaker and its state (open ones first)."""
        from fleetmedic.reports.status import breaker_states

        return Rows(breaker_states(dsn), ["name", "state", "changed_at", "changed_by", "reason"], title="breakers")

    def _breakers_module() -> Any:
        try:
            from fleetmedic.safety import breakers
        except ImportError as exc:
            raise RuntimeError("breaker overrides need fleetmedic.safety.breakers, which is not installed") from exc
        return breakers

    def reset_breaker(name: str, reason: str) -> Done:
        """Close a breaker and release the incidents it holds (audited)."""
        b = _breakers_module()
        redis_url = os.environ.get("FLEETMEDIC_REDIS_URL")
        change = b.reset(dsn, b.parse_breaker_name(name), actor=actor, reason=reason, redis_url=redis_url)
        released = f"; released incidents {change.released}" if change.released else ""
        return Done(f"{change.message}{released} (by {actor})", change)

    def trip_breaker(name: str, reason: str) -> Done:
        """Open a breaker by hand: automation of that playbook (or all, 'global') stops (audited)."""
        b = _breakers_module()
        change = b.trip(dsn, b.parse_breaker_name(name), actor=actor, reason=reason)
        return Done(f"{change.message} (by {actor})", change)

    # -- pager -----------------------------------------------------------------------------------
    def pager_list(status: str | None = None, limit: int = 20) -> Rows:
        """Pages in the outbox (status: pending, delivered or failed)."""
        pages = list_pages(dsn, status=status, limit=100000)[-limit:]
        return Rows(pages, ["id", "incident_id", "action", "status", "attempts", "created_at", "summary"],
                    title="pages")

    def pager_deliver() -> Any:
        """Deliver pending pages now with the log backend (what the pager_outbox DAG does every minute)."""
        return deliver_pending(dsn)

    # -- reports ---------------------------------------------------------------------------------
    def report_build(period: str = "7d") -> Any:
        """Compute the trend report for a period (nothing stored); .tables holds the DataFrames."""
        from fleetmedic.reports import build_trends

        return build_trends(dsn, period, progress=lambda _m: None)

    def report_stored(period: str | None = None) -> Any:
        """The newest report the incident_trends DAG stored (of `period` when given), or None."""
        from fleetmedic.reports import load_trends

        return load_trends(dsn, period=period)

    def report_show(name: str = "total", period: str = "7d") -> Rows:
        """One trend table as rows, e.g. report.show('kernel_panics', '30d')."""
        from fleetmedic.reports.trends import TABLES, frame_records

        built = report_build(period)
        key = name.replace("-", "_")
        if key not in TABLES:
            raise ValueError(f"no report table {name!r}: choose one of {', '.join(TABLES)}")
        return Rows(frame_records(built.tables[key]), TABLES[key].columns, title=built.title(key))

    def report_save(period: str = "7d") -> Any:
        """Build, render (charts, HTML) and store the report, replacing the period's (as the DAG does)."""
        from fleetmedic.reports import run_incident_trends

        return run_incident_trends(dsn, period, generated_by=actor, progress=print)

    def status() -> None:
        """Fleet health, active incidents by state, breakers, undelivered pages."""
        from fleetmedic.console.status_cli import _print
        from fleetmedic.reports.status import fleet_status

        _print(fleet_status(dsn))

    fleet = Namespace("fleet", "the inventory and the demo fleet", ls=fleet_ls, get=fleet_get, faults=fleet_faults,
                      inject=fleet_inject)
    breakers = Namespace("breakers", "circuit breakers", list=breakers_list, reset=reset_breaker, trip=trip_breaker)
    pager = Namespace("pager", "the pager outbox", list=pager_list, deliver=pager_deliver)
    reports = Namespace("reports", "trend reports", build=report_build, stored=report_stored, show=report_show,
                        save=report_save)
    return {
        "dsn": dsn, "actor": actor, "store": store, "status": status, "incidents": incidents, "show": show,
        "ack": ack, "ignore": ignore, "resolve": resolve, "reset_breaker": reset_breaker,
        "trip_breaker": trip_breaker, "fleet": fleet, "breakers": breakers, "pager": pager, "reports": reports,
    }


def banner(namespace: dict[str, Any]) -> str:
    from fleetmedic.db.connect import redact_dsn

    return "\n".join([
        f"fleetmedic console: ops DB {redact_dsn(namespace['dsn'])}; you act as {namespace['actor']} "
        "(every change is audited with that name)",
        "  status()                          fleet health, active incidents, breakers, undelivered pages",
        "  incidents(state=, type=, limit=)  incidents, newest first      show(id)  an incident's audit trail",
        "  ack(id, reason)  ignore(id, reason, until='1d')  resolve(id, reason)          human overrides",
        "  reset_breaker(name, reason)  trip_breaker(name, reason)                       breaker overrides",
        "  store     the IncidentStore (get, events, list, transition, ...)",
        "  fleet     fleet.ls(), fleet.get(name), fleet.faults(), fleet.inject(fault, target)",
        "  breakers  breakers.list(), breakers.reset(name, reason), breakers.trip(name, reason)",
        "  pager     pager.list(status=), pager.deliver()",
        "  reports   reports.show('kernel_panics', '7d'), reports.build('30d'), reports.stored(), reports.save()",
        "Type a name to see what it holds; exit with Ctrl-D.",
    ])


app = typer.Typer(cls=SingleCommand, invoke_without_command=True, add_completion=False)


@app.callback()
def console_(
    user: str | None = typer.Option(None, "--as", help="your name for the audit trail (default: $FLEETMEDIC_USER, "
                                                        "else your OS user)"),
    command: str | None = typer.Option(None, "--command", "-c",
                                       help="run this Python in the session, print the result, and exit"),
    dsn: str | None = DsnOption,
) -> None:
    """Open the fleetmedic REPL (ptpython): status(), incidents(), show(id), ack/ignore/resolve, breakers, reports.

    Every change made there goes through the same audited functions as the console commands, with
    actor human:<you>.
    """
    try:
        actor = _human_actor(user)
    except ValueError as exc:
        fail(str(exc))
    namespace = make_namespace(ops_dsn(dsn), actor)
    if command is not None:
        _run_command(command, namespace)
        return
    print(banner(namespace), flush=True)
    from ptpython.repl import embed

    history = Path(os.environ.get("FLEETMEDIC_CONSOLE_HISTORY", Path.home() / ".fleetmedic_console_history"))
    embed(globals=namespace, locals=namespace, title="fleetmedic", history_filename=str(history),
          configure=_configure)


def _human_actor(user: str | None) -> str:
    try:
        from fleetmedic.safety.overrides import human_actor
    except ImportError:
        import getpass

        who = (user or os.environ.get("FLEETMEDIC_USER") or getpass.getuser() or "").strip()
        if not who:
            raise ValueError("who are you? pass --as NAME or set FLEETMEDIC_USER (actions are audited)") from None
        return f"human:{who}"
    return human_actor(user)


def _configure(repl: Any) -> None:
    repl.show_status_bar = False
    repl.confirm_exit = False
    repl.enable_history_search = True
    repl.prompt_style = "classic"


def _run_command(command: str, namespace: dict[str, Any]) -> None:
    try:
        compiled = compile(command, "<fleetmedic console>", "eval")
    except SyntaxError:
        exec(compile(command, "<fleetmedic console>", "exec"), namespace)  # noqa: S102 - the user's own code
        return
    result = eval(compiled, namespace)  # noqa: S307 - the user's own code
    if result is not None:
        print(repr(result))
