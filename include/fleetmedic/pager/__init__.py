"""The pager: an outbox of pages in the ops database, and backends that deliver them."""

from __future__ import annotations

from fleetmedic.pager.backends import (
    Backend,
    DeliveryError,
    LogBackend,
    PermanentDeliveryError,
    RetryableDeliveryError,
)
from fleetmedic.pager.outbox import (
    SEVERITIES,
    DeliveryReport,
    Page,
    backoff,
    dedup_key_for_incident,
    deliver_pending,
    enqueue_page,
    list_pages,
    page_summary,
)

__all__ = [
    "SEVERITIES",
    "Backend",
    "DeliveryError",
    "DeliveryReport",
    "LogBackend",
    "Page",
    "PermanentDeliveryError",
    "RetryableDeliveryError",
    "backoff",
    "dedup_key_for_incident",
    "deliver_pending",
    "enqueue_page",
    "list_pages",
    "page_summary",
]
