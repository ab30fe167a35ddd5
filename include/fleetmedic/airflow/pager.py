"""Choose the pager backend from the Airflow connection `fleetmedic_pager` (log when it is not set).

The connection's `extra` names the backend:
- `{"backend": "pagerduty"}`: password = the Events API v2 routing key; host = the events URL
  (optional, defaults to PagerDuty's).
- `{"backend": "slack"}`: host = the incoming-webhook URL.
- `{"backend": "sns", "topic_arn": "...", "aws_conn_id": "aws_default"}`: published through the
  amazon provider's SnsHook (its boto3 client, region and credentials come from that AWS connection).
- `{"backend": "log", "path": "..."}` or no connection at all: the log backend.
"""

from __future__ import annotations

from typing import Any

from fleetmedic.pager.backends import Backend, LogBackend

__all__ = ["PAGER_CONN_ID", "backend_from_connection"]

PAGER_CONN_ID = "fleetmedic_pager"


def _url(conn: Any) -> str | None:
    host = conn.host or ""
    if not host:
        return None
    if "://" in host:
        return host
    scheme = conn.schema or "https"
    port = f":{conn.port}" if conn.port else ""
    return f"{scheme}://{host}{port}"


def backend_from_connection(conn_id: str = PAGER_CONN_ID) -> Backend:
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception:  # not defined: the log backend is the documented default
        return LogBackend()
    extra = conn.extra_dejson or {}
    kind = str(extra.get("backend", "log")).lower()
    if kind == "pagerduty":
        from fleetmedic.pager.http_backends import PAGERDUTY_EVENTS_URL, PagerDutyBackend

        return PagerDutyBackend(conn.password or extra.get("routing_key", ""), url=_url(conn) or PAGERDUTY_EVENTS_URL)
    if kind == "slack":
        from fleetmedic.pager.http_backends import SlackWebhookBackend

        url = _url(conn) or extra.get("webhook_url", "")
        return SlackWebhookBackend(url)
    if kind == "sns":
        from airflow.providers.amazon.aws.hooks.sns import SnsHook

        from fleetmedic.pager.http_backends import SnsBackend

        hook = SnsHook(aws_conn_id=extra.get("aws_conn_id", "aws_default"))
        return SnsBackend(extra.get("topic_arn", ""), client=hook.get_conn())
    if kind == "log":
        return LogBackend(extra.get("path"))
    raise ValueError(
        f"connection {conn_id}: extra.backend is {kind!r}; use one of pagerduty, slack, sns, log"
    )
