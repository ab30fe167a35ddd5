"""The `aws` cloud: EC2 instance status, console output, reboot, start and stop, with boto3.

Core code may not import Airflow, and the probes that use this provider run in the triggerer and
the console as well as in tasks, so this talks to EC2 with boto3 directly (the same library the
amazon provider's EC2Hook wraps). An Airflow task that wants its credentials from an Airflow
connection passes `AwsProvider(session=AwsBaseHook(aws_conn_id=...).get_session())`; everywhere
else the standard boto3 chain applies (environment, profile, instance role).

A server's `address` is its EC2 instance id; `attrs.region` picks the region (default: the
session's, then AWS_DEFAULT_REGION); `attrs.endpoint_url` (or AWS_ENDPOINT_URL) points elsewhere
than AWS, e.g. at moto in tests.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from fleetmedic.cloud.base import InstanceStatus, ProviderError, ServerRef

__all__ = ["AwsProvider", "ec2_status"]

# EC2 instance state name -> what fleetmedic calls it.
_STOPPED = {"stopped", "stopping", "shutting-down", "terminated", "pending"}


def ec2_status(name: str, status: dict[str, Any]) -> InstanceStatus:
    """Map one DescribeInstanceStatus entry to running / stopped / impaired with a reason."""
    instance_id = status.get("InstanceId", "?")
    state = status.get("InstanceState", {}).get("Name", "unknown")
    system = status.get("SystemStatus", {}).get("Status", "not-applicable")
    instance = status.get("InstanceStatus", {}).get("Status", "not-applicable")
    data = {"instance_id": instance_id, "ec2_state": state, "system_status": system, "instance_status": instance}
    if state in _STOPPED:
        return InstanceStatus("stopped", f"EC2 instance {instance_id} of server {name} is {state}", data)
    if state != "running":
        return InstanceStatus("impaired", f"EC2 instance {instance_id} of server {name} is in state {state!r}", data)
    failing = [f"{kind} status check is {value}" for kind, value in (("system", system), ("instance", instance))
               if value == "impaired"]
    if failing:
        return InstanceStatus("impaired", f"EC2 instance {instance_id} of server {name} is running but its "
                                          f"{' and '.join(failing)}", data)
    return InstanceStatus("running", f"EC2 instance {instance_id} of server {name} is running "
                                     f"(system {system}, instance {instance})", data)


class AwsProvider:
    """The `aws` cloud provider over EC2."""

    name = "aws"

    def __init__(self, session: Any = None, *, region: str | None = None, endpoint_url: str | None = None):
        self._session = session
        self._region = region
        self._endpoint_url = endpoint_url
        self._clients: dict[tuple[str | None, str | None], Any] = {}
        self._lock = threading.Lock()

    def client(self, service: str, server: ServerRef | None = None, *, region: str | None = None) -> Any:
        """A boto3 client for `service` in the server's region (clients are cached and thread-safe)."""
        import boto3

        attrs = server.attrs if server is not None else {}
        region = region or attrs.get("region") or self._region or os.environ.get("AWS_DEFAULT_REGION")
        endpoint = attrs.get("endpoint_url") or self._endpoint_url
        key = (f"{service}:{region}", endpoint)
        with self._lock:
            if key not in self._clients:
                if self._session is None:
                    self._session = boto3.session.Session()
                if not (region or self._session.region_name):
                    raise ProviderError(
                        f"no AWS region for {service}" + (f" (server {server.name})" if server else "")
                        + ": set attrs.region on the server, AWS_DEFAULT_REGION, or the profile's region"
                    )
                self._clients[key] = self._session.client(service, region_name=region, endpoint_url=endpoint)
            return self._clients[key]

    @staticmethod
    def _instance_id(server: ServerRef) -> str:
        if not server.address or not str(server.address).startswith("i-"):
            raise ProviderError(
                f"server {server.name} has provider 'aws' but address {server.address!r} is not an EC2 instance id "
                "(i-...); set the server's address to its instance id"
            )
        return str(server.address)

    def _call(self, server: ServerRef, operation: str, **kwargs: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        ec2 = self.client("ec2", server)
        try:
            return dict(getattr(ec2, operation)(**kwargs))
        except ClientError as exc:
            err = exc.response.get("Error", {})
            raise ProviderError(f"EC2 {exc.operation_name} for server {server.name} failed: "
                                f"{err.get('Code')}: {err.get('Message')}") from exc
        except BotoCoreError as exc:
            raise ProviderError(f"EC2 {operation} for server {server.name} failed: {exc} "
                                "(check AWS credentials, region and network)") from exc

    def instance_status(self, server: ServerRef) -> InstanceStatus:
        instance_id = self._instance_id(server)
        out = self._call(server, "describe_instance_status", InstanceIds=[instance_id], IncludeAllInstances=True)
        statuses = out.get("InstanceStatuses") or []
        if not statuses:
            return InstanceStatus("stopped", f"EC2 has no status for instance {instance_id} of server "
                                             f"{server.name} (terminated long ago?)", {"instance_id": instance_id})
        return ec2_status(server.name, statuses[0])

    def console_output(self, server: ServerRef) -> str:
        instance_id = self._instance_id(server)
        out = self._call(server, "get_console_output", InstanceId=instance_id)
        # botocore base64-decodes Output; an instance that printed nothing yet has no Output at all.
        return str(out.get("Output") or "")

    def _state(self, server: ServerRef) -> str:
        return str(self.instance_status(server).data.get("ec2_state", "unknown"))

    def reboot(self, server: ServerRef, reason: str = "") -> str:
        instance_id = self._instance_id(server)
        state = self._state(server)
        if state in ("stopped", "stopping"):
            self._call(server, "start_instances", InstanceIds=[instance_id])
            return f"EC2 instance {instance_id} of server {server.name} was {state}; asked EC2 to start it"
        if state in ("terminated", "shutting-down"):
            raise ProviderError(f"EC2 instance {instance_id} of server {server.name} is {state}; it cannot be "
                                "rebooted: replace the server")
        self._call(server, "reboot_instances", InstanceIds=[instance_id])
        return f"asked EC2 to reboot instance {instance_id} of server {server.name} (it was {state})"

    def start(self, server: ServerRef, reason: str = "") -> str:
        instance_id = self._instance_id(server)
        self._call(server, "start_instances", InstanceIds=[instance_id])
        return f"asked EC2 to start instance {instance_id} of server {server.name}"

    def stop(self, server: ServerRef, reason: str = "") -> str:
        instance_id = self._instance_id(server)
        self._call(server, "stop_instances", InstanceIds=[instance_id])
        return f"asked EC2 to stop instance {instance_id} of server {server.name}"
