"""The aws cloud provider against moto's in-process EC2: status, console output, reboot, the probes and the action."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from fleetmedic import cloud
from fleetmedic.actions.base import ActionContext
from fleetmedic.actions.registry import ACTIONS
from fleetmedic.cloud import ProviderError, ServerRef, get_provider, panic_since_boot
from fleetmedic.cloud.aws import AwsProvider, ec2_status
from fleetmedic.detection.checks import Target, run_one
from fleetmedic.inventory import Resource, Server

REGION = "eu-west-1"


@pytest.fixture
def ec2(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(key, value)
    with mock_aws():
        # A fresh provider per test, made while moto is active (the registry caches providers).
        cloud.register_provider("aws", AwsProvider)
        try:
            yield boto3.client("ec2", region_name=REGION)
        finally:
            cloud.register_provider("aws", cloud._aws)


def launch(ec2: Any, name: str = "db-01") -> ServerRef:
    out = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="t3.micro",
                            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": name}]}])
    return ServerRef(name, "aws", out["Instances"][0]["InstanceId"], {"region": REGION})


def server_target(server: ServerRef) -> Target:
    return Target(7, server.name, "server", server.address or "", 0,
                  {"server": {"name": server.name, "provider": server.provider, "address": server.address,
                              "attrs": dict(server.attrs)}})


def test_running_instance_with_passing_status_checks_is_running(ec2):
    server = launch(ec2)

    status = get_provider("aws").instance_status(server)

    assert status.state == "running" and status.healthy
    assert status.reason == f"EC2 instance {server.address} of server db-01 is running (system ok, instance ok)"


def test_stopped_instance_is_stopped_and_the_status_probe_fails_with_the_reason(ec2):
    server = launch(ec2)
    ec2.stop_instances(InstanceIds=[server.address])

    status = get_provider("aws").instance_status(server)
    result = asyncio.run(run_one(server_target(server), "instance.status", 5))

    assert status.state == "stopped"
    assert not result.healthy
    assert result.reason == f"EC2 instance {server.address} of server db-01 is stopped"


def test_status_probe_passes_for_a_running_instance(ec2):
    server = launch(ec2)

    result = asyncio.run(run_one(server_target(server), "instance.status", 5))

    assert result.healthy, result.reason


def test_reboot_of_a_running_instance_asks_ec2_to_reboot_it(ec2):
    server = launch(ec2)

    reason = get_provider("aws").reboot(server, reason="incident 1")

    assert reason == f"asked EC2 to reboot instance {server.address} of server db-01 (it was running)"
    assert get_provider("aws").instance_status(server).state == "running"


def test_reboot_of_a_stopped_instance_starts_it(ec2):
    server = launch(ec2)
    ec2.stop_instances(InstanceIds=[server.address])

    reason = get_provider("aws").reboot(server)

    assert reason == f"EC2 instance {server.address} of server db-01 was stopped; asked EC2 to start it"
    state = ec2.describe_instances(InstanceIds=[server.address])["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] in ("pending", "running")


def test_a_terminated_instance_cannot_be_rebooted(ec2):
    server = launch(ec2)
    ec2.terminate_instances(InstanceIds=[server.address])

    with pytest.raises(ProviderError, match="is terminated; it cannot be rebooted: replace the server"):
        get_provider("aws").reboot(server)


def test_an_unknown_instance_id_is_a_provider_error_naming_the_server(ec2):
    server = ServerRef("ghost", "aws", "i-0123456789abcdef0", {"region": REGION})

    with pytest.raises(ProviderError, match=r"EC2 DescribeInstanceStatus for server ghost failed: "
                                            r"InvalidInstanceID.NotFound"):
        get_provider("aws").instance_status(server)


def test_an_address_that_is_not_an_instance_id_is_refused_before_calling_ec2(ec2):
    with pytest.raises(ProviderError, match=r"address '10.0.0.5' is not an EC2 instance id \(i-...\)"):
        get_provider("aws").instance_status(ServerRef("db-02", "aws", "10.0.0.5", {"region": REGION}))


def test_console_output_is_the_decoded_boot_log_and_shows_no_panic(ec2):
    server = launch(ec2)

    text = get_provider("aws").console_output(server)
    result = asyncio.run(run_one(server_target(server), "instance.console", 5))

    assert text.startswith("Linux version ")
    assert panic_since_boot(text) is None
    assert result.healthy and result.reason == "no kernel panic on the console of db-01 since its last boot"


def test_reboot_action_reboots_the_incidents_server_through_ec2(ec2):
    server = launch(ec2)
    row = Server(1, server.name, "aws", server.address, "running", dict(server.attrs))
    resource = Resource(1, server.name, "server", "standalone", server.address or "", 0, 1, None, True, {}, row)

    result = ACTIONS["instance.reboot"].fn(ActionContext(5, "server_down", resource, "postgresql://unused"))

    assert result.ok
    assert result.reason == f"asked EC2 to reboot instance {server.address} of server db-01 (it was running)"
    assert result.data == {"server": "db-01", "provider": "aws", "state_before": "running"}


@pytest.mark.parametrize(
    ("entry", "state", "reason"),
    [
        ({"InstanceState": {"Name": "running"}, "SystemStatus": {"Status": "impaired"},
          "InstanceStatus": {"Status": "ok"}},
         "impaired", "EC2 instance i-1 of server s is running but its system status check is impaired"),
        ({"InstanceState": {"Name": "running"}, "SystemStatus": {"Status": "impaired"},
          "InstanceStatus": {"Status": "impaired"}},
         "impaired", "EC2 instance i-1 of server s is running but its system status check is impaired and "
                     "instance status check is impaired"),
        ({"InstanceState": {"Name": "running"}, "SystemStatus": {"Status": "initializing"},
          "InstanceStatus": {"Status": "initializing"}},
         "running", "EC2 instance i-1 of server s is running (system initializing, instance initializing)"),
        ({"InstanceState": {"Name": "pending"}}, "stopped", "EC2 instance i-1 of server s is pending"),
        ({"InstanceState": {"Name": "shutting-down"}}, "stopped", "EC2 instance i-1 of server s is shutting-down"),
    ],
)
def test_ec2_status_entries_as_ec2_documents_them_map_to_a_state_and_reason(entry, state, reason):
    # moto always reports passing status checks, so the impaired cases are EC2's documented shapes.
    status = ec2_status("s", {"InstanceId": "i-1", **entry})

    assert (status.state, status.reason) == (state, reason)


def test_an_unknown_provider_name_is_an_error_listing_the_known_ones():
    with pytest.raises(ProviderError, match=r"no cloud provider named 'gcp' \(known: aws, local\)"):
        get_provider("gcp")
