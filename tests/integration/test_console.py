"""The operator's console against a seeded ops DB: `status`, `report`, and `console` (the REPL, driven for
real in a terminal). Listings are checked through their --json output against the database."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import add_resource, query
from typer.testing import CliRunner

from fleetmedic.console.cli import app
from fleetmedic.console.report_cli import NAMES
from fleetmedic.reports.seed import seed_history

FLEETMEDIC = str(Path(sys.executable).with_name("fleetmedic"))


@pytest.fixture
def seeded(ops_dsn: str) -> str:
    """Two weeks of history, one resource failing its check right now, a tripped breaker, pending pages."""
    seed_history(ops_dsn, incidents=2_000, days=14)
    rid = add_resource(ops_dsn, "pg-failing", port=6543)
    query(ops_dsn, "INSERT INTO health (resource_id, check_name, healthy, reason, checked_at, consecutive_failures, "
                   "first_failure_at) VALUES (%s, 'postgres.connect', false, 'connection refused', now(), 3, "
                   "now() - interval '40 seconds')", (rid,))
    from fleetmedic.safety.breakers import trip

    trip(ops_dsn, "playbook:resource_down", actor="human:tester", reason="monitoring under suspicion")
    return ops_dsn


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env=env or {"FLEETMEDIC_USER": "tester", "COLUMNS": "200"})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def cli_json(*args: str) -> object:
    code, out = cli(*args, "--json")
    assert code == 0, out
    return json.loads(out)


def test_status_json_agrees_with_the_database(seeded: str) -> None:
    s = cli_json("status", "--dsn", seeded, "--limit", "5")
    assert isinstance(s, dict)
    assert s["fleet"]["resources"] == query(seeded, "SELECT count(*) AS n FROM resources")[0]["n"]
    assert s["fleet"]["unhealthy"] == 1
    assert [f["resource"] for f in s["fleet"]["failing_checks"]] == ["pg-failing"]
    by_state = {r["state"]: r["n"] for r in query(seeded, "SELECT state, count(*) AS n FROM incidents GROUP BY 1")}
    for row in s["incidents"]["by_state"]:
        assert row["incidents"] == by_state.get(row["state"], 0)
    assert s["incidents"]["active"] > 0 and len(s["incidents"]["most_urgent"]) == 5
    assert s["incidents"]["most_urgent"][0]["state"] == "escalated"
    assert s["breakers_open"] == ["playbook:resource_down"]
    undelivered = query(seeded, "SELECT count(*) AS n FROM pages WHERE status <> 'delivered'")[0]["n"]
    assert s["pages"]["undelivered"] == undelivered > 0


def test_status_prints_the_fleet_at_a_glance(seeded: str) -> None:
    code, out = cli("status", "--dsn", seeded)
    assert code == 0, out
    assert "1 unhealthy" in out and "pg-failing" in out and "connection refused" in out
    assert "Incidents" in out and "escalated" in out
    assert "1 not closed: playbook:resource_down" in out
    assert "undelivered" in out
    assert "is in shadow" not in out


def test_status_names_a_playbook_a_human_put_in_shadow(seeded: str) -> None:
    from fleetmedic.safety.modes import set_shadow

    assert cli_json("status", "--dsn", seeded)["shadow_overrides"] == []  # type: ignore[index]
    set_shadow(seeded, "blocking_queries", actor="human:dana", reason="cancelled a batch job by mistake")
    [override] = cli_json("status", "--dsn", seeded)["shadow_overrides"]  # type: ignore[index]
    assert (override["type"], override["actor"]) == ("blocking_queries", "human:dana")
    code, out = cli("status", "--dsn", seeded)
    assert code == 0, out
    assert "playbook blocking_queries is in shadow (acts on nothing): put there by human:dana" in out
    assert "cancelled a batch job by mistake" in out


@pytest.mark.parametrize("name", list(NAMES))
def test_each_report_table_as_json(seeded: str, name: str) -> None:
    body = cli_json("report", name, "--period", "14d", "--dsn", seeded)
    assert isinstance(body, dict)
    assert list(body["tables"]) == [NAMES[name]]
    assert body["period"] == "14d" and body["run_id"] is None  # computed, not stored
    rows = body["tables"][NAMES[name]]
    if name == "total":
        expected = {r["type"]: r["n"] for r in query(
            seeded, "SELECT type, count(*) AS n FROM incidents WHERE opened_at >= %s AND opened_at < %s GROUP BY 1",
            (body["period_start"], body["period_end"]))}
        assert {r["type"]: r["incidents"] for r in rows} == expected
    elif name == "breakers":
        assert rows == [] or all(r["trips"] >= 1 for r in rows)
    else:
        assert rows, f"{name}: no rows for a seeded fortnight"


def test_report_prints_the_talks_tables(seeded: str) -> None:
    code, out = cli("report", "--period", "7d", "--dsn", seeded, "--limit", "3")
    assert code == 0, out
    for title in ("Kernel panics in last week", "Stale incidents (over 2 days old)", "Total incidents",
                  "Automation outcome per type", "Pages per type"):
        assert title in out
    assert "more (--limit 0 for all)" in out


def test_report_save_then_stored_shows_the_same_run(seeded: str, tmp_path: Path) -> None:
    code, out = cli("report", "--stored", "--period", "7d", "--dsn", seeded)
    assert code == 1 and "no stored report for period 7d" in out
    env = {"FLEETMEDIC_USER": "tester", "FLEETMEDIC_REPORTS_DIR": str(tmp_path), "COLUMNS": "200"}
    code, out = cli("report", "total", "--save", "--period", "7d", "--dsn", seeded, env=env)
    assert code == 0, out
    run = query(seeded, "SELECT * FROM report_runs")[0]
    assert run["generated_by"] == "human:tester" and Path(run["html_path"]).is_file()
    stored = cli_json("report", "total", "--stored", "--period", "7d", "--dsn", seeded)
    assert isinstance(stored, dict) and stored["run_id"] == run["id"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "nonsense"], "no report table 'nonsense'"),
        (["report", "--period", "fortnight"], "is not understood"),
        (["report", "--stored", "--save"], "give one of them"),
    ],
)
def test_usage_mistakes_exit_2_and_say_why(seeded: str, args: list[str], message: str) -> None:
    code, out = cli(*args, "--dsn", seeded)
    assert code == 2 and message in out


def test_help_everywhere(seeded: str) -> None:
    for command, words in (("status", "--limit"), ("report", "kernel-panics"), ("console", "--as")):
        code, out = cli(command, "--help")
        assert code == 0 and words in out and "--dsn" in out, out


def test_console_command_mode_acts_as_the_named_human(seeded: str) -> None:
    incident = query(seeded, "SELECT id FROM incidents WHERE state = 'escalated' ORDER BY id LIMIT 1")[0]["id"]
    code, out = cli("console", "--dsn", seeded, "--as", "alice", "-c", f"ack({incident}, 'taking it')")
    assert code == 0, out
    assert f"incident {incident}: acknowledged by human:alice" in out
    event = query(seeded, "SELECT * FROM incident_events WHERE incident_id = %s ORDER BY id DESC LIMIT 1",
                  (incident,))[0]
    assert event["actor"] == "human:alice" and "taking it" in event["reason"] and event["data"]["ack"] is True

    code, out = cli("console", "--dsn", seeded, "-c", "breakers.list()")
    assert code == 0 and "playbook:resource_down" in out and "open" in out


class Tmux:
    """A real terminal (tmux on its own server socket) running one command."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        if shutil.which("tmux") is None:
            pytest.fail("this test drives the REPL in a real terminal: install tmux (apt-get install -y tmux)")
        self.socket = f"fleetmedic-test-{os.getpid()}-{time.monotonic_ns()}"
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        self._tmux("new-session", "-d", "-s", "repl", "-x", "200", "-y", "60",
                   f"env {exports} {' '.join(command)}; echo EXITED=$?; sleep 30")

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True,
                              text=True, timeout=20).stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", "repl")

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", "repl", "-l", text)
        self._tmux("send-keys", "-t", "repl", "Enter")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "repl", *keys)

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if text in screen:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} did not appear within {timeout:.0f}s; the terminal shows:\n{screen}")
            time.sleep(0.3)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=20)


def test_repl_in_a_terminal_acks_an_incident_audited_with_your_name(seeded: str, tmp_path: Path) -> None:
    incident = query(seeded, "SELECT id FROM incidents WHERE state = 'escalated' ORDER BY id LIMIT 1")[0]["id"]
    term = Tmux([FLEETMEDIC, "console", "--dsn", seeded, "--as", "repl-tester"],
                {"FLEETMEDIC_CONSOLE_HISTORY": str(tmp_path / "history"), "TERM": "xterm-256color"})
    try:
        banner = term.wait_for(">>>")
        assert "you act as human:repl-tester" in banner
        for name in ("status()", "incidents(", "store", "fleet", "breakers", "pager", "reports"):
            assert name in banner
        term.type(f"ack({incident}, 'looking into it from the REPL')")
        term.wait_for(f"incident {incident}: acknowledged by human:repl-tester")
        term.type("status()")
        screen = term.wait_for(" pending, ")
        assert "pg-failing" in screen and "playbook:resource_down" in screen
        term.type("reports.show('total', '7d')")
        term.wait_for("Total incidents")
        term.keys("C-d")
        term.wait_for("EXITED=0")
    finally:
        term.close()
    event = query(seeded, "SELECT * FROM incident_events WHERE incident_id = %s ORDER BY id DESC LIMIT 1",
                  (incident,))[0]
    assert event["actor"] == "human:repl-tester"
    assert event["reason"] == "acknowledged by human:repl-tester: looking into it from the REPL"
    assert event["at"] > datetime.now(UTC) - timedelta(minutes=5)
