"""Pager delivery through real HTTP to a server answering as PagerDuty and Slack document, and SNS via moto."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest
from fakes.pager_server import FakePagerServer

from fleetmedic.localfleet.services import free_port
from fleetmedic.pager.http_backends import PagerDutyBackend, SlackWebhookBackend, SnsBackend
from fleetmedic.pager.outbox import deliver_pending, enqueue_page

ROUTING_KEY = "R0UT1NGKEY0123456789abcdefABCDEF"  # 32 characters, as PagerDuty requires


def page_row(dsn: str, key: str = "fleetmedic-incident-1", action: str = "trigger", **details) -> int:
    with psycopg.connect(dsn) as conn:
        page = enqueue_page(conn, incident_id=None, dedup_key=key, action=action,
                            summary="[fleetmedic] resource_down on pg1a: restart failed",
                            details={"resource": "pg1a", "type": "resource_down",
                                     "run_url": "http://airflow/dags/x/runs/y", **details})
    assert page is not None
    return page.id


def status(dsn: str, page_id: int) -> tuple[str, int, str | None]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT status, attempts, last_error FROM pages WHERE id = %s", (page_id,)).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


@pytest.fixture
def pd_server():
    with FakePagerServer() as server:
        yield server


def pd(server: FakePagerServer) -> PagerDutyBackend:
    return PagerDutyBackend(ROUTING_KEY, url=f"{server.url}/v2/enqueue", client=httpx.Client(timeout=5))


def test_pagerduty_accepts_a_trigger_with_the_incident_as_dedup_key(ops_dsn, pd_server):
    page_id = page_row(ops_dsn)
    report = deliver_pending(ops_dsn, pd(pd_server))
    assert report.delivered == [page_id]
    assert status(ops_dsn, page_id)[0] == "delivered"
    [event] = pd_server.events
    assert event["event_action"] == "trigger" and event["dedup_key"] == "fleetmedic-incident-1"
    assert event["payload"]["severity"] == "critical" and event["payload"]["source"] == "pg1a"
    assert event["links"][0]["href"] == "http://airflow/dags/x/runs/y"


def test_resolve_event_goes_to_the_same_dedup_key(ops_dsn, pd_server):
    page_row(ops_dsn)
    page_row(ops_dsn, action="resolve")
    deliver_pending(ops_dsn, pd(pd_server))
    assert [(e["event_action"], e["dedup_key"]) for e in pd_server.events] == [
        ("trigger", "fleetmedic-incident-1"), ("resolve", "fleetmedic-incident-1")]


def test_400_is_not_retried(ops_dsn, pd_server):
    page_id = page_row(ops_dsn)
    bad = PagerDutyBackend("too-short-key", url=f"{pd_server.url}/v2/enqueue")
    report = deliver_pending(ops_dsn, bad)
    assert report.failed == [page_id]
    state, attempts, error = status(ops_dsn, page_id)
    assert state == "failed" and attempts == 1 and "400" in (error or "") and "routing_key" in (error or "")
    later = datetime.now(UTC) + timedelta(days=1)
    assert deliver_pending(ops_dsn, bad, now=later).attempted == 0
    assert pd_server.requests == 1


def test_429_backs_off_by_retry_after(ops_dsn, pd_server):
    page_id = page_row(ops_dsn)
    pd_server.fail_next(1, 429, {"Retry-After": "120"})
    report = deliver_pending(ops_dsn, pd(pd_server))
    assert report.retried == [page_id]
    with psycopg.connect(ops_dsn) as conn:
        wait = conn.execute("SELECT next_attempt_at - now() FROM pages WHERE id = %s", (page_id,)).fetchone()
    assert wait is not None and wait[0] >= timedelta(seconds=110)


def test_five_server_errors_then_recovery_delivers_exactly_once_and_loses_nothing(ops_dsn, pd_server):
    page_id = page_row(ops_dsn)
    pd_server.fail_next(5, 500)
    backend = pd(pd_server)
    now = datetime.now(UTC)
    for _ in range(10):  # each pass is "later": past any backoff
        now += timedelta(hours=1)
        deliver_pending(ops_dsn, backend, now=now)
    assert status(ops_dsn, page_id) == ("delivered", 6, "RetryableDeliveryError: PagerDuty answered 500: "
                                        '{"status": "error", "message": "forced 500"}')
    assert len(pd_server.events) == 1
    assert pd_server.requests == 6


def test_network_error_is_retried():
    backend = PagerDutyBackend(ROUTING_KEY, url=f"http://127.0.0.1:{free_port()}/v2/enqueue",
                               client=httpx.Client(timeout=2))
    from fleetmedic.pager.backends import RetryableDeliveryError
    from fleetmedic.pager.outbox import Page

    page = Page(id=1, incident_id=None, dedup_key="k", action="trigger", severity="critical", summary="s",
                details={}, status="pending", backend=None, attempts=0, last_error=None,
                next_attempt_at=datetime.now(UTC), created_at=datetime.now(UTC), delivered_at=None)
    with pytest.raises(RetryableDeliveryError, match="unreachable"):
        backend.send(page)


def test_slack_webhook_gets_one_message_per_page(ops_dsn, pd_server):
    page_row(ops_dsn, tried=["12:00:01 restart: restart of pg1a failed"])
    backend = SlackWebhookBackend(f"{pd_server.url}/services/T000/B000/XXXX")
    report = deliver_pending(ops_dsn, backend)
    assert len(report.delivered) == 1
    [msg] = pd_server.slack_messages
    assert "PAGE" in msg["text"] and "restart of pg1a failed" in msg["text"]


def test_slack_404_is_permanent(ops_dsn, pd_server):
    page_id = page_row(ops_dsn)
    report = deliver_pending(ops_dsn, SlackWebhookBackend(f"{pd_server.url}/nowhere"))
    assert report.failed == [page_id]


def test_sns_publishes_to_the_topic(ops_dsn):
    import boto3
    from moto import mock_aws

    with mock_aws():
        sns = boto3.client("sns", region_name="us-east-1")
        sqs = boto3.client("sqs", region_name="us-east-1")
        topic = sns.create_topic(Name="fleetmedic-pages")["TopicArn"]
        queue_url = sqs.create_queue(QueueName="pages")["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)
        page_id = page_row(ops_dsn)
        report = deliver_pending(ops_dsn, SnsBackend(topic, client=sns))
        assert report.delivered == [page_id]
        messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)["Messages"]
        assert len(messages) == 1 and "fleetmedic-incident-1" in messages[0]["Body"]


def test_sns_unknown_topic_is_permanent(ops_dsn):
    import boto3
    from moto import mock_aws

    with mock_aws():
        sns = boto3.client("sns", region_name="us-east-1")
        page_id = page_row(ops_dsn)
        report = deliver_pending(ops_dsn, SnsBackend("arn:aws:sns:us-east-1:123456789012:missing", client=sns))
        assert report.failed == [page_id]
