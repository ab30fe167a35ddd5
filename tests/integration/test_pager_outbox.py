"""The pager outbox against real PostgreSQL: enqueue once, deliver once, back off, give up only on permanent errors."""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import add_resource, errors, query, run_concurrently

from fleetmedic.db.connect import connect
from fleetmedic.incidents.store import IncidentStore
from fleetmedic.pager import (
    Backend,
    LogBackend,
    Page,
    PermanentDeliveryError,
    RetryableDeliveryError,
    backoff,
    dedup_key_for_incident,
    deliver_pending,
    enqueue_page,
    list_pages,
    page_summary,
)


class FlakyBackend:
    """A pager that answers 503 for the first `failures` sends, then accepts; remembers what it accepted."""

    name = "flaky"

    def __init__(self, failures: int = 0, *, retry_after: float | None = None, delay: float = 0.0) -> None:
        self.failures_left = failures
        self.retry_after = retry_after
        self.delay = delay
        self.calls = 0
        self.accepted: list[Page] = []
        self._lock = threading.Lock()

    def send(self, page: Page) -> None:
        time.sleep(self.delay)
        with self._lock:
            self.calls += 1
            if self.failures_left > 0:
                self.failures_left -= 1
                raise RetryableDeliveryError("HTTP 503 Service Unavailable", retry_after=self.retry_after)
            self.accepted.append(page)


class RejectingBackend:
    """A pager that answers 400: the page itself is wrong, retrying cannot help."""

    name = "rejecting"

    def __init__(self) -> None:
        self.calls = 0

    def send(self, page: Page) -> None:
        self.calls += 1
        raise PermanentDeliveryError("HTTP 400: 'routing_key' is invalid")


class BuggyBackend:
    name = "buggy"

    def send(self, page: Page) -> None:
        raise KeyError("routing_key")


def enqueue(dsn: str, key: str = "fleetmedic-incident-test", action: str = "trigger", **kw: object) -> Page | None:
    with connect(dsn) as conn:
        return enqueue_page(
            conn, incident_id=None, dedup_key=key, summary=f"[fleetmedic] test page {key}",
            details={"why": "test"}, action=action, **kw,  # type: ignore[arg-type]
        )


def db_now(dsn: str) -> datetime:
    return query(dsn, "SELECT now() AS now")[0]["now"]


def test_a_page_is_enqueued_once_per_dedup_key_and_action(ops_dsn: str) -> None:
    first = enqueue(ops_dsn, "k1")
    duplicate = enqueue(ops_dsn, "k1")
    resolve = enqueue(ops_dsn, "k1", action="resolve")

    assert first is not None and (first.status, first.attempts, first.action) == ("pending", 0, "trigger")
    assert first.details == {"why": "test"} and first.severity == "critical"
    assert duplicate is None
    assert resolve is not None and resolve.action == "resolve"
    assert [(p.dedup_key, p.action) for p in list_pages(ops_dsn)] == [("k1", "trigger"), ("k1", "resolve")]


def test_enqueue_is_part_of_the_callers_transaction(ops_dsn: str) -> None:
    with connect(ops_dsn) as conn:
        enqueue_page(conn, incident_id=None, dedup_key="k", summary="s", details={})
        conn.rollback()
    assert list_pages(ops_dsn) == []


def test_a_page_with_a_bad_field_is_refused_naming_it(ops_dsn: str) -> None:
    with pytest.raises(ValueError, match="severity 'sev1' is not one of: critical, error, warning, info"):
        enqueue(ops_dsn, severity="sev1")
    with pytest.raises(ValueError, match="action 'ack' is not one of: trigger, resolve"):
        enqueue(ops_dsn, action="ack")


def test_page_texts_follow_the_pager_conventions() -> None:
    assert dedup_key_for_incident(12) == "fleetmedic-incident-12"
    assert dedup_key_for_incident(12, 2) == "fleetmedic-incident-12-escalation-2"
    assert page_summary("resource_down", "db-7", "restart\nfailed") == "[fleetmedic] resource_down on db-7: restart failed"
    long = page_summary("resource_down", "db-7", "x" * 5000)
    assert len(long) == 1024 and long.endswith("…")


def test_backoff_doubles_from_ten_seconds_up_to_ten_minutes() -> None:
    assert [backoff(n).total_seconds() for n in range(1, 9)] == [10, 20, 40, 80, 160, 320, 600, 600]
    assert backoff(1000) == timedelta(minutes=10)
    assert backoff(1, retry_after=90) == timedelta(seconds=90)
    assert backoff(1, retry_after=3600) == timedelta(minutes=10)


def test_a_flaky_pager_gets_the_page_exactly_once_after_backing_off(ops_dsn: str) -> None:
    page = enqueue(ops_dsn)
    assert page is not None
    backend = FlakyBackend(failures=3)
    t0 = db_now(ops_dsn) + timedelta(seconds=1)

    first = deliver_pending(ops_dsn, backend, now=t0)
    assert (first.delivered, first.retried, first.failed) == ([], [page.id], [])
    (row,) = list_pages(ops_dsn)
    assert (row.status, row.attempts, row.backend) == ("pending", 1, "flaky")
    assert row.next_attempt_at == t0 + timedelta(seconds=10)
    assert row.last_error == "RetryableDeliveryError: HTTP 503 Service Unavailable"

    # Not due yet: nothing is sent.
    assert deliver_pending(ops_dsn, backend, now=t0 + timedelta(seconds=9)).attempted == 0
    assert backend.calls == 1

    second = deliver_pending(ops_dsn, backend, now=t0 + timedelta(seconds=10))
    assert second.retried == [page.id]
    assert list_pages(ops_dsn)[0].next_attempt_at == t0 + timedelta(seconds=30)

    third = deliver_pending(ops_dsn, backend, now=t0 + timedelta(seconds=30))
    assert third.retried == [page.id]
    assert list_pages(ops_dsn)[0].next_attempt_at == t0 + timedelta(seconds=70)

    fourth = deliver_pending(ops_dsn, backend, now=t0 + timedelta(seconds=70))
    assert fourth.delivered == [page.id]
    (done,) = list_pages(ops_dsn)
    assert (done.status, done.attempts, done.delivered_at) == ("delivered", 4, t0 + timedelta(seconds=70))

    # Delivered pages are never sent again.
    assert deliver_pending(ops_dsn, backend, now=t0 + timedelta(days=1)).attempted == 0
    assert [p.id for p in backend.accepted] == [page.id] and backend.calls == 4


def test_retry_after_from_the_pager_stretches_the_backoff(ops_dsn: str) -> None:
    enqueue(ops_dsn)
    t0 = db_now(ops_dsn) + timedelta(seconds=1)

    deliver_pending(ops_dsn, FlakyBackend(failures=1, retry_after=120), now=t0)

    assert list_pages(ops_dsn)[0].next_attempt_at == t0 + timedelta(seconds=120)


def test_a_permanent_error_marks_the_page_failed_and_it_is_not_retried(ops_dsn: str) -> None:
    page = enqueue(ops_dsn)
    assert page is not None
    backend = RejectingBackend()
    t0 = db_now(ops_dsn) + timedelta(seconds=1)

    report = deliver_pending(ops_dsn, backend, now=t0)

    assert report.failed == [page.id] and str(report) == "0 delivered, 0 to retry, 1 failed"
    (row,) = list_pages(ops_dsn)
    assert (row.status, row.attempts, row.backend) == ("failed", 1, "rejecting")
    assert row.last_error == "PermanentDeliveryError: HTTP 400: 'routing_key' is invalid"
    assert deliver_pending(ops_dsn, backend, now=t0 + timedelta(days=1)).attempted == 0
    assert backend.calls == 1


def test_an_unexpected_backend_error_is_retried_rather_than_losing_the_page(ops_dsn: str) -> None:
    enqueue(ops_dsn)

    report = deliver_pending(ops_dsn, BuggyBackend(), now=db_now(ops_dsn) + timedelta(seconds=1))

    (row,) = list_pages(ops_dsn)
    assert report.retried == [row.id] and row.status == "pending"
    assert row.last_error == "KeyError: 'routing_key'"


def test_a_resolve_waits_for_its_trigger_so_the_pager_sees_them_in_order(ops_dsn: str) -> None:
    trigger = enqueue(ops_dsn, "k")
    resolve = enqueue(ops_dsn, "k", action="resolve")
    other = enqueue(ops_dsn, "other")
    assert trigger and resolve and other
    backend = FlakyBackend(failures=1)
    t0 = db_now(ops_dsn) + timedelta(seconds=1)

    first = deliver_pending(ops_dsn, backend, now=t0)
    assert first.retried == [trigger.id] and first.delivered == [other.id]  # the resolve was held back

    deliver_pending(ops_dsn, backend, now=t0 + timedelta(seconds=10))

    assert [(p.dedup_key, p.action) for p in backend.accepted] == [
        ("other", "trigger"), ("k", "trigger"), ("k", "resolve"),
    ]


def test_concurrent_deliverers_send_each_page_once(ops_dsn: str) -> None:
    for i in range(12):
        enqueue(ops_dsn, f"k{i}")
    backend = FlakyBackend(delay=0.05)
    now = db_now(ops_dsn) + timedelta(seconds=1)

    results = run_concurrently(4, lambda _i: deliver_pending(ops_dsn, backend, now=now))

    assert errors(results) == []
    assert sorted(p.dedup_key for p in backend.accepted) == sorted(f"k{i}" for i in range(12))
    assert {p.status for p in list_pages(ops_dsn)} == {"delivered"}


def test_limit_caps_the_pages_sent_in_one_pass(ops_dsn: str) -> None:
    for i in range(5):
        enqueue(ops_dsn, f"k{i}")
    backend = FlakyBackend()
    now = db_now(ops_dsn) + timedelta(seconds=1)

    assert len(deliver_pending(ops_dsn, backend, limit=2, now=now).delivered) == 2
    assert len(deliver_pending(ops_dsn, backend, now=now).delivered) == 3


def test_the_log_backend_logs_one_line_and_appends_json(
    ops_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    page = enqueue(ops_dsn, "fleetmedic-incident-5")
    assert page is not None
    out = tmp_path / "pages" / "pages.jsonl"
    backend = LogBackend(out)
    assert isinstance(backend, Backend)

    with caplog.at_level(logging.INFO, logger="fleetmedic.pager"):
        report = deliver_pending(ops_dsn, backend)

    assert report.delivered == [page.id]
    lines = [r.getMessage() for r in caplog.records if r.name == "fleetmedic.pager"]
    assert lines == [f"page {page.id} trigger dedup_key=fleetmedic-incident-5 severity=critical incident=None: "
                     "[fleetmedic] test page fleetmedic-incident-5"]
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (record["id"], record["dedup_key"], record["details"]) == (page.id, "fleetmedic-incident-5", {"why": "test"})
    assert list_pages(ops_dsn)[0].backend == "log"


def test_deliver_pending_uses_the_log_backend_by_default(ops_dsn: str) -> None:
    enqueue(ops_dsn)
    assert len(deliver_pending(ops_dsn).delivered) == 1
    assert list_pages(ops_dsn)[0].backend == "log"


def test_an_escalated_then_resolved_incident_reaches_the_pager_as_trigger_then_resolve(ops_dsn: str) -> None:
    store = IncidentStore(ops_dsn)
    resource = add_resource(ops_dsn, "redis-cache-1", kind="redis", role="standalone", port=6379)
    incident, _ = store.open_or_refresh_incident(resource, "resource_down", actor="detection:redis.ping", reason="PING timed out")
    store.escalate(incident.id, actor="automation:playbook_resource_down/claim", reason="breaker open: 30 actions/h",
                   details={"run_url": "http://localhost:8080/dags/playbook_resource_down/runs/incident-1"})
    store.resolve(incident.id, actor="human:bob", reason="restarted after the network fix")
    backend = FlakyBackend()

    deliver_pending(ops_dsn, backend, now=datetime.now(UTC) + timedelta(seconds=1))

    trigger, resolve = backend.accepted
    assert (trigger.action, resolve.action) == ("trigger", "resolve")
    assert trigger.dedup_key == resolve.dedup_key == f"fleetmedic-incident-{incident.id}"
    assert trigger.summary == "[fleetmedic] resource_down on redis-cache-1: breaker open: 30 actions/h"
    assert trigger.details["run_url"].endswith("/runs/incident-1")
