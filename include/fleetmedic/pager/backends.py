"""Pager delivery backends: the `Backend` protocol, its error types, and `LogBackend` (the default)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from fleetmedic.db.connect import json_dumps

if TYPE_CHECKING:
    from fleetmedic.pager.outbox import Page

__all__ = [
    "Backend",
    "DeliveryError",
    "LogBackend",
    "PermanentDeliveryError",
    "RetryableDeliveryError",
]

log = logging.getLogger("fleetmedic.pager")


class DeliveryError(Exception):
    """A backend could not deliver a page."""


class RetryableDeliveryError(DeliveryError):
    """Worth trying again later (HTTP 429 or 5xx, a timeout, a network error).

    `retry_after` (seconds), when the service said how long to wait, stretches the backoff.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentDeliveryError(DeliveryError):
    """Trying again cannot help (e.g. HTTP 400: the service rejected the page); the page is marked failed."""


@runtime_checkable
class Backend(Protocol):
    """Where pages go. `send` returns when the page was accepted, or raises a DeliveryError."""

    name: str

    def send(self, page: Page) -> None: ...


class LogBackend:
    """Logs one line per page through `logging`, and appends it as a JSON line to `path` when given."""

    name = "log"

    def __init__(self, path: Path | str | None = None, *, logger: logging.Logger | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.logger = logger or log
        self._lock = threading.Lock()

    def send(self, page: Page) -> None:
        level = logging.WARNING if page.action == "trigger" else logging.INFO
        self.logger.log(
            level,
            "page %s %s dedup_key=%s severity=%s incident=%s: %s",
            page.id,
            page.action,
            page.dedup_key,
            page.severity,
            page.incident_id,
            page.summary,
        )
        if self.path is None:
            return
        line = json_dumps(page.as_dict()) + "\n"
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as fh:
                    fh.write(line)
        except OSError as exc:
            raise RetryableDeliveryError(f"cannot append page {page.id} to {self.path}: {exc}") from exc
