"""The pager outbox: pages are written to `pages` in the caller's transaction, then delivered by `deliver_pending`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any

import psycopg

from fleetmedic.db.connect import connection, dict_cursor, jsonb
from fleetmedic.pager.backends import (
    Backend,
    LogBackend,
    PermanentDeliveryError,
    RetryableDeliveryError,
)

__all__ = [
    "ACTIONS",
    "SEVERITIES",
    "DeliveryReport",
    "Page",
    "backoff",
    "dedup_key_for_incident",
    "deliver_pending",
    "enqueue_page",
    "list_pages",
    "page_summary",
]

log = logging.getLogger("fleetmedic.pager")

# PagerDuty Events v2 severities; the other backends map from these.
SEVERITIES = ("critical", "error", "warning", "info")
ACTIONS = ("trigger", "resolve")
SUMMARY_MAX = 1024  # PagerDuty truncates summaries at 1024 characters

BACKOFF_BASE = timedelta(seconds=10)
BACKOFF_CAP = timedelta(minutes=10)


@dataclass(frozen=True)
class Page:
    """One row of the `pages` outbox."""

    id: int
    incident_id: int | None
    dedup_key: str
    action: str
    severity: str
    summary: str
    details: dict[str, Any]
    status: str
    backend: str | None
    attempts: int
    last_error: str | None
    next_attempt_at: datetime
    created_at: datetime
    delivered_at: datetime | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Page:
        return cls(**{f.name: row[f.name] for f in fields(cls)})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DeliveryReport:
    """What one `deliver_pending` pass did, by page id."""

    delivered: list[int] = field(default_factory=list)
    retried: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)

    @property
    def attempted(self) -> int:
        return len(self.delivered) + len(self.retried) + len(self.failed)

    def __str__(self) -> str:
        return f"{len(self.delivered)} delivered, {len(self.retried)} to retry, {len(self.failed)} failed"


def dedup_key_for_incident(incident_id: int, escalation: int = 1) -> str:
    """The pager dedup key of an incident; a re-escalation after a human retry (2, 3, ...) gets its own."""
    if escalation <= 1:
        return f"fleetmedic-incident-{incident_id}"
    return f"fleetmedic-incident-{incident_id}-escalation-{escalation}"


def page_summary(incident_type: str, resource_name: str, reason: str) -> str:
    """`[fleetmedic] <type> on <resource>: <reason>`, on one line and within the pager's length limit."""
    text = f"[fleetmedic] {incident_type} on {resource_name}: {' '.join(reason.split())}"
    return text if len(text) <= SUMMARY_MAX else text[: SUMMARY_MAX - 1] + "…"


def _check_page_fields(dedup_key: str, summary: str, severity: str, action: str) -> None:
    if not dedup_key:
        raise ValueError("a page needs a dedup_key (use dedup_key_for_incident(incident_id) for incidents)")
    if not summary.strip():
        raise ValueError("a page needs a summary saying what is wrong (see page_summary)")
    if severity not in SEVERITIES:
        raise ValueError(f"page severity {severity!r} is not one of: {', '.join(SEVERITIES)}")
    if action not in ACTIONS:
        raise ValueError(f"page action {action!r} is not one of: {', '.join(ACTIONS)}")


def enqueue_page(
    conn: psycopg.Connection[Any],
    *,
    incident_id: int | None,
    dedup_key: str,
    summary: str,
    details: Mapping[str, Any],
    severity: str = "critical",
    action: str = "trigger",
) -> Page | None:
    """Put a page in the outbox inside the caller's transaction; None when (dedup_key, action) is already there.

    The unique index `pages_once` makes this the guarantee of "never two pages for the same key and
    action", whatever retries or races happen above it.
    """
    _check_page_fields(dedup_key, summary, severity, action)
    with dict_cursor(conn) as cur:
        cur.execute(
            """
            INSERT INTO pages (incident_id, dedup_key, action, severity, summary, details)
            VALUES (%s, %s, %s, %s, %s, %s)
            ON CONFLICT (dedup_key, action) DO NOTHING
            RETURNING *
            """,
            (incident_id, dedup_key, action, severity, summary[:SUMMARY_MAX], jsonb(dict(details))),
        )
        row = cur.fetchone()
    return Page.from_row(row) if row else None


def list_pages(
    target: str | psycopg.Connection[Any],
    *,
    incident_id: int | None = None,
    status: str | None = None,
    limit: int = 100,
) -> list[Page]:
    """Pages, oldest first, optionally of one incident and/or one status (pending, delivered, failed)."""
    where: list[str] = []
    params: list[Any] = []
    if incident_id is not None:
        where.append("incident_id = %s")
        params.append(incident_id)
    if status is not None:
        where.append("status = %s")
        params.append(status)
    query = "SELECT * FROM pages" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id LIMIT %s"
    params.append(limit)
    with connection(target) as conn, dict_cursor(conn) as cur:
        cur.execute(query.encode(), params)  # composed only from the literal fragments above
        return [Page.from_row(r) for r in cur.fetchall()]


def backoff(attempts: int, *, retry_after: float | None = None) -> timedelta:
    """Wait before the next try after `attempts` failed ones: 10 s, 20 s, 40 s, ... capped at 10 minutes."""
    delay = BACKOFF_BASE * (2 ** max(attempts - 1, 0)) if attempts < 32 else BACKOFF_CAP
    if retry_after is not None:
        delay = max(delay, timedelta(seconds=retry_after))
    return min(delay, BACKOFF_CAP)


# A resolve waits while its trigger is still pending, so the pager never sees them out of order.
_CLAIM_NEXT = """
SELECT * FROM pages p
WHERE p.status = 'pending'
  AND p.next_attempt_at <= COALESCE(%(now)s, now())
  AND NOT (p.action = 'resolve' AND EXISTS (
        SELECT 1 FROM pages t
        WHERE t.dedup_key = p.dedup_key AND t.action = 'trigger' AND t.status = 'pending'))
ORDER BY p.next_attempt_at, p.id
LIMIT 1
FOR UPDATE SKIP LOCKED
"""


def deliver_pending(
    dsn: str,
    backend: Backend | None = None,
    *,
    limit: int = 100,
    now: datetime | None = None,
) -> DeliveryReport:
    """Send up to `limit` due pages through `backend` (LogBackend by default), oldest first.

    Each page is claimed with `FOR UPDATE SKIP LOCKED` in its own transaction, so concurrent deliverers
    never send the same page and one slow or failing page does not hold the others. A delivered page
    is never sent again; a crash between send and commit leaves it pending, to be sent again with the
    same dedup_key (at-least-once, which the pager's dedup absorbs). Retryable errors back off
    exponentially; permanent ones mark the page failed. `now` overrides the database clock (tests).
    """
    backend = backend or LogBackend()
    report = DeliveryReport()
    seen: set[int] = set()
    with connection(dsn) as conn:
        while report.attempted < limit:
            with conn.transaction(), dict_cursor(conn) as cur:
                cur.execute(_CLAIM_NEXT, {"now": now})
                row = cur.fetchone()
                if row is None or row["id"] in seen:
                    break
                page = Page.from_row(row)
                seen.add(page.id)
                _deliver_one(cur, backend, page, now, report)
    return report


def _deliver_one(
    cur: psycopg.Cursor[Any], backend: Backend, page: Page, now: datetime | None, report: DeliveryReport
) -> None:
    attempts = page.attempts + 1
    try:
        backend.send(page)
    except PermanentDeliveryError as exc:
        log.error("page %s failed permanently through %s: %s", page.id, backend.name, exc)
        cur.execute(
            "UPDATE pages SET status = 'failed', backend = %s, attempts = %s, last_error = %s WHERE id = %s",
            (backend.name, attempts, f"{type(exc).__name__}: {exc}", page.id),
        )
        report.failed.append(page.id)
        return
    except Exception as exc:  # anything unexpected is retried too: a page must never be lost
        retry_after = exc.retry_after if isinstance(exc, RetryableDeliveryError) else None
        if not isinstance(exc, RetryableDeliveryError):
            log.exception("page %s: backend %s raised unexpectedly; will retry", page.id, backend.name)
        delay = backoff(attempts, retry_after=retry_after)
        log.warning("page %s not delivered through %s (attempt %s), retrying in %s: %s",
                    page.id, backend.name, attempts, delay, exc)
        cur.execute(
            """
            UPDATE pages SET attempts = %s, last_error = %s, backend = %s,
                             next_attempt_at = COALESCE(%s, now()) + %s
            WHERE id = %s
            """,
            (attempts, f"{type(exc).__name__}: {exc}", backend.name, now, delay, page.id),
        )
        report.retried.append(page.id)
        return
    cur.execute(
        """
        UPDATE pages SET status = 'delivered', backend = %s, attempts = %s,
                         delivered_at = COALESCE(%s, now())
        WHERE id = %s
        """,
        (backend.name, attempts, now, page.id),
    )
    report.delivered.append(page.id)
