"""`fleetmedic breakers` (list, trip, reset, history) and `fleetmedic shadow` (on, off, report): audited human overrides."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from fleetmedic.console.common import DsnOption, JsonOption, console, fail, ops_dsn, print_json

app = typer.Typer(help="Circuit breakers: list, trip, reset. Every trip and reset is audited with your name.",
                  no_args_is_help=True)
shadow_app = typer.Typer(help="Shadow mode: put a playbook in shadow now, take it out, and what playbooks in shadow "
                              "would have done.", no_args_is_help=True)

RedisOption = typer.Option(None, "--redis-url", help="Redis URL (default: FLEETMEDIC_REDIS_URL or .local/demo.env)")
ReasonOption = typer.Option(..., "--reason", "-r", help="why (recorded in the audit trail)")


def redis_url(url: str | None) -> str | None:
    if url:
        return url
    from fleetmedic.config import load_settings

    try:
        return load_settings().redis_url
    except RuntimeError:
        return None


def _playbooks() -> list[Any]:
    from fleetmedic.playbooks.loader import load_all

    try:
        return list(load_all().playbooks.values())
    except Exception:  # a broken playbook must not hide the breakers
        return []


def _name(value: str) -> str:
    from fleetmedic.safety.breakers import parse_breaker_name

    try:
        return parse_breaker_name(value)
    except ValueError as exc:
        fail(str(exc), 2)


def _actor() -> str:
    from fleetmedic.safety.overrides import OverrideError, human_actor

    try:
        return human_actor()
    except OverrideError as exc:
        fail(str(exc))


@app.command("list")
def breakers_list(dsn: str | None = DsnOption, redis: str | None = RedisOption, as_json: bool = JsonOption) -> None:
    """Every breaker: state, since when, why, the half-open probe, incidents held, runs in the window.

    Listing also applies the breakers' own clock (open -> half-open after its cooldown, closed after a
    resolved probe), recorded as automation.
    """
    from fleetmedic.safety.breakers import (
        RedisUnavailable,
        held_incidents,
        list_breakers,
        playbook_breaker,
        redis_client,
        refresh,
        window_count,
    )

    dsn = ops_dsn(dsn)
    refresh(dsn)
    breakers = list_breakers(dsn, also=[playbook_breaker(pb.type) for pb in _playbooks()])
    url = redis_url(redis)
    client = redis_client(url) if url else None
    rows = []
    for b in breakers:
        window: int | None = None
        if client is not None and b.name != "global":
            try:
                window = window_count(client, b.name, since=b.window_since)
            except RedisUnavailable:
                window = None
        rows.append({**b.as_dict(), "held": held_incidents(dsn, b.name), "window": window})
    if as_json:
        print_json(rows)
        return
    table = Table("breaker", "state", "since", "by", "held", "runs/1h", "probe", "reason")
    colors = {"closed": "green", "open": "red", "half_open": "yellow"}
    for r in rows:
        table.add_row(r["name"], f"[{colors[r['state']]}]{r['state']}[/]",
                      f"{r['changed_at']:%m-%d %H:%M:%S}" if r["changed_at"] else "", r["changed_by"] if r["version"] else "",
                      str(len(r["held"])), "" if r["window"] is None else str(r["window"]),
                      str(r["probe_incident_id"] or ""), (r["reason"] or "")[:80])
    console.print(table)


@app.command("trip")
def breakers_trip(name: str = typer.Argument(..., help="global, or playbook:<type> (or just <type>)"),
                  reason: str = ReasonOption, dsn: str | None = DsnOption, as_json: bool = JsonOption) -> None:
    """Open a breaker by hand: automation it covers holds its incidents until `breakers reset`."""
    from fleetmedic.safety.breakers import trip

    breaker = _name(name)
    change = trip(ops_dsn(dsn), breaker, actor=_actor(), reason=reason)
    if as_json:
        print_json({"changed": change.changed, "message": change.message, "breaker": change.breaker.as_dict()})
        return
    console.print(change.message + (" (one page sent)" if change.page else ""), highlight=False)


@app.command("reset")
def breakers_reset(name: str = typer.Argument(..., help="global, or playbook:<type> (or just <type>)"),
                   reason: str = ReasonOption, dsn: str | None = DsnOption, redis: str | None = RedisOption,
                   as_json: bool = JsonOption) -> None:
    """Close a breaker: its incidents go back to open and the sweep starts their playbook runs."""
    from fleetmedic.safety.breakers import reset

    breaker = _name(name)
    change = reset(ops_dsn(dsn), breaker, actor=_actor(), reason=reason, redis_url=redis_url(redis))
    if as_json:
        print_json({"changed": change.changed, "message": change.message, "released": change.released,
                    "breaker": change.breaker.as_dict()})
        return
    console.print(change.message, highlight=False)
    if change.released:
        console.print(f"released {len(change.released)} held incident(s): "
                      f"{', '.join(map(str, change.released))}; the sweep starts their playbook runs", highlight=False)


@app.command("history")
def breakers_history(name: str | None = typer.Argument(None, help="one breaker (default: all)"),
                     limit: int = typer.Option(50, help="at most this many"), dsn: str | None = DsnOption,
                     as_json: bool = JsonOption) -> None:
    """Breaker events, newest first: trips, half-opens, probes, resets."""
    from fleetmedic.db.connect import connection, dict_cursor

    breaker = _name(name) if name else None
    with connection(ops_dsn(dsn)) as conn, dict_cursor(conn) as cur:
        cur.execute("SELECT * FROM breaker_events WHERE %(b)s::text IS NULL OR breaker = %(b)s "
                    "ORDER BY id DESC LIMIT %(n)s", {"b": breaker, "n": limit})
        rows = cur.fetchall()
    if as_json:
        print_json(rows)
        return
    table = Table("at", "breaker", "state", "actor", "reason")
    for r in rows:
        table.add_row(f"{r['at']:%m-%d %H:%M:%S}", r["breaker"], r["state"], r["actor"], r["reason"][:100])
    console.print(table)


@shadow_app.command("report")
def shadow_report(since: str = typer.Option("30d", help="how far back, e.g. 7d, 30d"),
                  dsn: str | None = DsnOption, as_json: bool = JsonOption) -> None:
    """Per playbook in shadow mode: incidents, how many it would have acted on, and would have resolved."""
    from fleetmedic.playbooks.schema import parse_duration
    from fleetmedic.safety.shadow import shadow_report as report

    try:
        period = parse_duration(since)
    except ValueError as exc:
        fail(f"--since: {exc}", 2)
    rows = report(ops_dsn(dsn), since=period, playbooks=_playbooks())
    if as_json:
        print_json([r.as_dict() for r in rows])
        return
    table = Table("playbook", "mode now", "incidents", "would have acted", "would have resolved", "held/blocked",
                  "resolved since")
    for r in rows:
        mode = f"{r.mode} (by {r.shadow_by})" if r.shadow_by else (r.mode or "(gone)")
        table.add_row(r.type, mode, str(r.incidents), str(r.would_have_acted), str(r.would_have_resolved),
                      str(r.held_or_blocked), str(r.resolved_since))
    console.print(table)
    if not rows:
        console.print("no playbook is in shadow mode and none recorded shadow decisions in the period")


def _known_type(value: str) -> str:
    known = sorted(pb.type for pb in _playbooks())
    if value not in known:
        fail(f"no playbook {value!r} (playbooks: {', '.join(known) or 'none loaded'}); give a playbook's type", 2)
    return value


def _print_change(change: Any, as_json: bool) -> None:
    if as_json:
        print_json({"changed": change.changed, "message": change.message,
                    "override": change.override.as_dict() if change.override else None})
        return
    console.print(change.message, highlight=False)


@shadow_app.command("on")
def shadow_on(playbook: str = typer.Argument(..., help="the playbook's type, e.g. blocking_queries"),
              reason: str = ReasonOption, dsn: str | None = DsnOption, as_json: bool = JsonOption) -> None:
    """Put a playbook in shadow mode now: its runs record what they would do and escalate, and runs past
    their gate stop before their next action. No deploy; audited with your name."""
    from fleetmedic.safety.modes import set_shadow

    try:
        change = set_shadow(ops_dsn(dsn), _known_type(playbook), actor=_actor(), reason=reason)
    except ValueError as exc:
        fail(str(exc), 2)
    _print_change(change, as_json)


@shadow_app.command("off")
def shadow_off(playbook: str = typer.Argument(..., help="the playbook's type"), reason: str = ReasonOption,
               dsn: str | None = DsnOption, as_json: bool = JsonOption) -> None:
    """Remove a `shadow on` override: the playbook's YAML (limits.mode) decides its mode again. A playbook
    whose YAML says shadow stays in shadow: promote it there, reviewed like any change."""
    from fleetmedic.safety.modes import clear_shadow

    try:
        change = clear_shadow(ops_dsn(dsn), playbook, actor=_actor(), reason=reason)
    except ValueError as exc:
        fail(str(exc), 2)
    _print_change(change, as_json)
    yaml_shadow = [pb for pb in _playbooks() if pb.type == playbook and pb.limits.mode == "shadow"]
    if yaml_shadow and not as_json:
        console.print(f"note: playbook {playbook} stays in shadow: its YAML says limits.mode: shadow", highlight=False)
