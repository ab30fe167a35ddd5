"""Correlation rules: a database on a server that is down waits for the server's playbook."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fleetmedic.cloud.base import panic_since_boot
from fleetmedic.detection.correlation import ServerFacts, ServerIncident, correlate
from fleetmedic.detection.sweep import Finding

T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)

# Resources: 1 = pg5a (primary, on server row 10 srv-pg5a), 2 = pg5b (follower of pg5a, on server row 20
# srv-pg5b), 10 and 20 the servers' own rows, 3 = pg1a on server row 30 srv-pg1a.


def facts(**overrides) -> ServerFacts:
    f = ServerFacts(
        kinds={1: "postgres", 2: "postgres", 3: "postgres", 10: "server", 20: "server", 30: "server"},
        resource_names={1: "pg5a", 2: "pg5b", 3: "pg1a", 10: "srv-pg5a", 20: "srv-pg5b", 30: "srv-pg1a"},
        server_of={1: 10, 2: 20, 3: 30, 10: 10, 20: 20, 30: 30},
        primary_server_of={2: 10},
        names={10: "srv-pg5a", 20: "srv-pg5b", 30: "srv-pg1a"},
    )
    for key, value in overrides.items():
        setattr(f, key, value)
    return f


def down(rid: int, typ: str = "resource_down", check: str = "postgres.connect") -> dict:
    return {"resource_id": rid, "type": typ, "check": check, "reason": "failed", "severity": "critical"}


def test_database_on_a_server_with_a_server_down_finding_in_the_same_sweep_is_deferred():
    findings = [down(2), down(20, "server_down", "instance.status")]

    kept, deferred = correlate(findings, facts())

    assert kept == [findings[1]]
    assert [d.reason for d in deferred] == [
        "deferred resource_down on pg5b: its server srv-pg5b has a server_down finding in this sweep"]


def test_database_on_a_server_with_an_active_server_incident_is_deferred():
    kept, deferred = correlate([down(2)], facts(active={20: [ServerIncident(12, "server_down", "remediating")]}))

    assert kept == []
    assert deferred[0].reason == ("deferred resource_down on pg5b: server_down incident 12 on its server srv-pg5b "
                                  "is remediating")


def test_database_on_a_server_failing_its_instance_check_is_deferred_before_any_incident_opens():
    kept, deferred = correlate([down(2)], facts(failing_checks={20: {"instance.status": "server srv-pg5b is "
                                                                                          "stopped"}}))

    assert kept == []
    assert deferred[0].reason == ("deferred resource_down on pg5b: its server srv-pg5b fails instance.status "
                                  "(server srv-pg5b is stopped)")


def test_evidence_gathered_before_the_server_was_fixed_is_deferred_and_newer_evidence_is_kept():
    resolved = {20: ServerIncident(12, "server_down", "resolved", T0)}
    stale = facts(last_resolved=resolved, evidence_at={(2, "postgres.connect"): T0 - timedelta(seconds=3)})
    fresh = facts(last_resolved=resolved, evidence_at={(2, "postgres.connect"): T0 + timedelta(seconds=3)})

    kept_stale, deferred = correlate([down(2)], stale)
    kept_fresh, none_deferred = correlate([down(2)], fresh)

    assert kept_stale == [] and deferred[0].reason == (
        "deferred resource_down on pg5b: its evidence (postgres.connect at 11:59:57) predates the fix of its "
        "server srv-pg5b (server_down incident 12 resolved at 12:00:00); the next probe decides")
    assert kept_fresh == [down(2)] and none_deferred == []


def test_database_on_a_healthy_server_is_kept_while_another_server_is_down():
    findings = [down(3), down(20, "server_down", "instance.status")]

    kept, deferred = correlate(findings, facts(failing_checks={20: {"instance.status": "stopped"}}))

    assert kept == findings and deferred == []


def test_follower_whose_primarys_server_is_down_waits_for_it():
    lag = down(2, "follower_behind", "postgres.replication_lag")

    kept, deferred = correlate([lag], facts(active={10: [ServerIncident(7, "kernel_panic", "remediating")]}))

    assert kept == []
    assert deferred[0].reason == ("deferred follower_behind on pg5b: (a follower) kernel_panic incident 7 on its "
                                  "primary's server srv-pg5a is remediating")


def test_primary_is_not_held_back_by_its_followers_server():
    kept, _ = correlate([down(1)], facts(failing_checks={20: {"instance.status": "stopped"}}))

    assert kept == [down(1)]


def test_server_down_waits_when_the_kernel_panicked_the_more_specific_diagnosis():
    status = down(10, "server_down", "instance.status")
    panic = down(10, "kernel_panic", "instance.console")

    kept_batch, deferred_batch = correlate([status, panic], facts())
    kept_active, deferred_active = correlate(
        [status], facts(active={10: [ServerIncident(9, "kernel_panic", "remediating")]}))
    kept_failing, deferred_failing = correlate(
        [status], facts(failing_checks={10: {"instance.console": "Kernel panic - not syncing: x"}}))

    assert kept_batch == [panic] and deferred_batch[0].reason == (
        "deferred server_down on srv-pg5a: srv-pg5a also has a kernel_panic finding in this sweep, the more "
        "specific diagnosis")
    assert kept_active == [] and "kernel_panic incident 9 on srv-pg5a is remediating" in deferred_active[0].reason
    assert kept_failing == [] and "srv-pg5a fails instance.console" in deferred_failing[0].reason


def test_kernel_panic_finding_is_kept_while_its_server_down_incident_is_active():
    panic = down(10, "kernel_panic", "instance.console")

    kept, deferred = correlate([panic], facts(active={10: [ServerIncident(8, "server_down", "remediating")]}))

    assert kept == [panic] and deferred == []


def test_resource_without_a_registered_server_row_is_kept():
    kept, deferred = correlate([down(99)], facts())

    assert kept == [down(99)] and deferred == []


def test_sweep_findings_work_as_well_as_their_dicts_and_order_is_kept():
    findings = [Finding(3, "resource_down", "postgres.connect", "x", "critical"),
                Finding(2, "resource_down", "postgres.connect", "x", "critical"),
                Finding(1, "resource_down", "postgres.connect", "x", "critical")]

    kept, deferred = correlate(findings, facts(failing_checks={20: {"instance.status": "stopped"}}))

    assert kept == [findings[0], findings[2]]
    assert [d.finding for d in deferred] == [findings[1]]


PANIC = "[ 8123.456789] Kernel panic - not syncing: Fatal exception in interrupt"


def test_a_panic_after_the_newest_boot_is_reported_with_its_line():
    console = (f"[    0.000000] fleetmedic local server srv-a booted\n[   10.000000] started postgres\n{PANIC}\n"
               "[ 8123.456800] ---[ end Kernel panic - not syncing: Fatal exception in interrupt ]---\n")

    assert panic_since_boot(console) == PANIC


def test_a_panic_before_a_reboot_is_history():
    console = (f"[    0.000000] Linux version 6.1.0 (builder@host)\n{PANIC}\n"
               "[    0.000000] Linux version 6.1.0 (builder@host)\n[    1.000000] systemd[1]: started\n")

    assert panic_since_boot(console) is None


def test_a_console_without_boot_lines_still_shows_a_panic():
    assert panic_since_boot(f"garbage\n{PANIC}") == PANIC
    assert panic_since_boot("") is None
