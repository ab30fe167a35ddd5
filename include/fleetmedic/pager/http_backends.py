"""Pager backends that deliver over the network: PagerDuty Events API v2, Slack webhooks, AWS SNS.

Each maps the service's documented answers onto the outbox's two error kinds: 429, 5xx and network
errors are retryable (honouring Retry-After), anything else the service rejects (e.g. 400) is
permanent and never retried.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

from fleetmedic.pager.backends import PermanentDeliveryError, RetryableDeliveryError

if TYPE_CHECKING:
    from fleetmedic.pager.outbox import Page

__all__ = ["PAGERDUTY_EVENTS_URL", "PagerDutyBackend", "SlackWebhookBackend", "SnsBackend", "pagerduty_event"]

PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"

# PagerDuty's payload.severity is one of these; fleetmedic uses the same four words.
_PD_SEVERITIES = ("critical", "error", "warning", "info")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _raise_for_answer(service: str, response: httpx.Response, ok: tuple[int, ...]) -> None:
    if response.status_code in ok:
        return
    body = response.text[:300]
    what = f"{service} answered {response.status_code}: {body}"
    if response.status_code == 429 or response.status_code >= 500:
        raise RetryableDeliveryError(what, retry_after=_retry_after(response))
    raise PermanentDeliveryError(what)


def _post(service: str, client: httpx.Client, url: str, payload: dict[str, Any]) -> httpx.Response:
    try:
        return client.post(url, json=payload)
    except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
        raise RetryableDeliveryError(f"{service} at {url} unreachable: {type(exc).__name__}: {exc}") from exc


def pagerduty_event(page: Page, routing_key: str, *, source: str = "fleetmedic") -> dict[str, Any]:
    """The Events API v2 body for a page: trigger with payload, or resolve by dedup_key."""
    event: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": page.action,
        "dedup_key": page.dedup_key,
    }
    if page.action == "trigger":
        details = dict(page.details or {})
        event["payload"] = {
            "summary": page.summary[:1024],
            "source": str(details.get("resource") or source),
            "severity": page.severity if page.severity in _PD_SEVERITIES else "critical",
            "component": details.get("type"),
            "group": details.get("dag_id"),
            "class": details.get("type"),
            "custom_details": details,
        }
        if details.get("run_url"):
            event["links"] = [{"href": details["run_url"], "text": "Airflow run"}]
    return event


class PagerDutyBackend:
    """PagerDuty Events API v2: trigger on escalation, resolve when the incident resolves.

    `dedup_key` is the incident's, so PagerDuty groups every event of one incident into one alert.
    """

    name = "pagerduty"

    def __init__(self, routing_key: str, *, url: str = PAGERDUTY_EVENTS_URL, timeout: float = 10.0,
                 client: httpx.Client | None = None) -> None:
        if not routing_key:
            raise ValueError("PagerDuty needs a routing (integration) key: set it as the connection's password")
        self.routing_key = routing_key
        self.url = url
        self.client = client or httpx.Client(timeout=timeout)

    def send(self, page: Page) -> None:
        response = _post("PagerDuty", self.client, self.url, pagerduty_event(page, self.routing_key))
        _raise_for_answer("PagerDuty", response, ok=(202,))


class SlackWebhookBackend:
    """A Slack incoming webhook: one message per trigger and per resolve."""

    name = "slack"

    def __init__(self, webhook_url: str, *, timeout: float = 10.0, client: httpx.Client | None = None) -> None:
        if not webhook_url:
            raise ValueError("Slack needs an incoming-webhook URL: set it as the connection's host")
        self.url = webhook_url
        self.client = client or httpx.Client(timeout=timeout)

    @staticmethod
    def message(page: Page) -> dict[str, Any]:
        details = page.details or {}
        icon = ":rotating_light:" if page.action == "trigger" else ":white_check_mark:"
        verb = "PAGE" if page.action == "trigger" else "RESOLVED"
        lines = [f"{icon} *{verb}* {page.summary}"]
        if details.get("run_url"):
            lines.append(f"<{details['run_url']}|Airflow run>")
        for tried in (details.get("tried") or [])[-5:]:
            lines.append(f"• {tried}")
        return {"text": "\n".join(lines)}

    def send(self, page: Page) -> None:
        response = _post("Slack", self.client, self.url, self.message(page))
        _raise_for_answer("Slack", response, ok=(200,))


class SnsBackend:
    """AWS SNS: publish each page to a topic (a boto3 SNS client, e.g. from the amazon provider's hook)."""

    name = "sns"

    _RETRYABLE = {"Throttling", "ThrottlingException", "ThrottledException", "InternalError",
                  "InternalFailure", "ServiceUnavailable", "KMSThrottling"}

    def __init__(self, topic_arn: str, *, client: Any = None, region_name: str | None = None,
                 endpoint_url: str | None = None) -> None:
        if not topic_arn:
            raise ValueError("SNS needs a topic ARN: set extra.topic_arn on the connection")
        self.topic_arn = topic_arn
        if client is None:
            import boto3

            client = boto3.client("sns", region_name=region_name, endpoint_url=endpoint_url)
        self.client = client

    def send(self, page: Page) -> None:
        import json

        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

        subject = f"[fleetmedic] {'PAGE' if page.action == 'trigger' else 'RESOLVED'} {page.dedup_key}"[:100]
        body = json.dumps({"action": page.action, "dedup_key": page.dedup_key, "severity": page.severity,
                           "summary": page.summary, "details": page.details}, default=str)
        try:
            self.client.publish(
                TopicArn=self.topic_arn, Subject=subject, Message=body,
                MessageAttributes={
                    "dedup_key": {"DataType": "String", "StringValue": page.dedup_key},
                    "action": {"DataType": "String", "StringValue": page.action},
                },
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in self._RETRYABLE:
                raise RetryableDeliveryError(f"SNS throttled or failed ({code}): {exc}") from exc
            raise PermanentDeliveryError(f"SNS rejected the page ({code}): {exc}") from exc
        except (EndpointConnectionError, BotoCoreError) as exc:
            raise RetryableDeliveryError(f"SNS unreachable: {exc}") from exc
