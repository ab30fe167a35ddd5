"""`fleetmedic fleet discover aws` against moto's EC2, RDS and ElastiCache, registering into a real ops DB."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import boto3
import psycopg
import pytest
from helpers import query
from moto import mock_aws
from typer.testing import CliRunner

from fleetmedic import cloud
from fleetmedic.cloud.aws import AwsProvider
from fleetmedic.console.cli import app
from fleetmedic.detection.checks import run_checks
from fleetmedic.detection.sweep import load_targets
from fleetmedic.inventory import get_resource
from fleetmedic.inventory_io import apply_plan, discover_aws

REGION = "eu-west-1"
TAG = [{"Key": "fleetmedic", "Value": "managed"}]


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A small account: tagged and untagged EC2 instances, RDS instances and ElastiCache groups."""
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(key, value)
    with mock_aws():
        cloud.register_provider("aws", AwsProvider)
        ec2 = boto3.client("ec2", region_name=REGION)

        def launch(tags: list[dict[str, str]]) -> str:
            spec = [{"ResourceType": "instance", "Tags": tags}] if tags else []
            out = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, TagSpecifications=spec)
            return out["Instances"][0]["InstanceId"]

        ids = {
            "db-01": launch([*TAG, {"Key": "Name", "Value": "db-01"}]),
            "unnamed": launch(TAG),
            "untagged": launch([{"Key": "Name", "Value": "web-01"}]),
            "gone": launch([*TAG, {"Key": "Name", "Value": "db-old"}]),
        }
        ec2.terminate_instances(InstanceIds=[ids["gone"]])
        rds = boto3.client("rds", region_name=REGION)
        common = {"DBInstanceClass": "db.t3.micro", "MasterUsername": "app", "MasterUserPassword": "secret-pw-1",
                  "AllocatedStorage": 20}
        rds.create_db_instance(DBInstanceIdentifier="orders", Engine="postgres", Tags=TAG, **common)
        rds.create_db_instance_read_replica(DBInstanceIdentifier="orders-r", SourceDBInstanceIdentifier="orders",
                                            Tags=TAG)
        rds.create_db_instance(DBInstanceIdentifier="legacy", Engine="mysql", Tags=TAG, **common)
        rds.create_db_instance(DBInstanceIdentifier="other", Engine="postgres", **common)
        rds.create_db_instance_read_replica(DBInstanceIdentifier="other-r", SourceDBInstanceIdentifier="other",
                                            Tags=TAG)
        ec = boto3.client("elasticache", region_name=REGION)
        ec.create_replication_group(ReplicationGroupId="carts", ReplicationGroupDescription="carts",
                                    Engine="redis", CacheNodeType="cache.t3.micro", NumCacheClusters=1, Tags=TAG)
        ec.create_replication_group(ReplicationGroupId="scratch", ReplicationGroupDescription="untagged",
                                    Engine="redis", CacheNodeType="cache.t3.micro", NumCacheClusters=1)
        ec.create_cache_cluster(CacheClusterId="memo", Engine="memcached", CacheNodeType="cache.t3.micro",
                                NumCacheNodes=1, Tags=TAG)
        try:
            yield ids
        finally:
            cloud.register_provider("aws", cloud._aws)


def test_discovery_finds_what_carries_the_tag_and_says_what_it_skipped(aws):
    found = discover_aws(region=REGION)

    assert found.plan.source == f"aws:{REGION}"
    assert sorted((s.name, s.address) for s in found.plan.servers) == sorted(
        [("db-01", aws["db-01"]), (aws["unnamed"], aws["unnamed"])])
    assert sorted((r.name, r.kind, r.role, r.primary) for r in found.plan.resources) == [
        ("carts", "redis", "primary", None),
        ("orders", "postgres", "primary", None),
        ("orders-r", "postgres", "follower", "orders"),
    ]
    assert sorted(found.skipped) == sorted([
        f"ec2 instance {aws['gone']}: terminated",
        "rds instance legacy: engine mysql is not managed by fleetmedic (postgres and redis only)",
        "rds instance other-r: a read replica of other, which does not carry the tag fleetmedic=managed; tag its "
        "primary too",
        "elasticache cluster memo: engine memcached is not managed by fleetmedic",
    ])


def test_discovered_inventory_is_registered_and_its_servers_are_probed_through_ec2(aws, ops_dsn):
    found = discover_aws(region=REGION)
    with psycopg.connect(ops_dsn) as conn:
        summary = apply_plan(conn, found.plan)
        orders_r = get_resource(conn, "orders-r")
        orders = get_resource(conn, "orders")
        carts = get_resource(conn, "carts")
        server_row = get_resource(conn, "db-01")

    assert (summary.servers_created, summary.resources_created) == (2, 3)
    assert orders_r.primary_id == orders.id and orders_r.server is None
    assert orders.host == "orders.aaaaaaaaaa.eu-west-1.rds.amazonaws.com" and orders.port == 5432
    assert orders.attrs["provider"] == "aws-rds" and orders.attrs["user"] == "app"
    assert carts.host.startswith("master.carts.") and carts.port == 6379
    assert server_row.kind == "server" and server_row.server is not None
    assert (server_row.server.provider, server_row.server.address) == ("aws", aws["db-01"])
    assert server_row.server.attrs["region"] == REGION

    async def probe() -> list[Any]:
        async with await psycopg.AsyncConnection.connect(ops_dsn) as aconn:
            targets = [t for t in await load_targets(aconn, 0, 1) if t.kind == "server"]
        return await run_checks([(t, "instance.status") for t in targets], timeout=10)

    results = asyncio.run(probe())
    assert len(results) == 2 and all(r.healthy for r in results), [r.reason for r in results]
    boto3.client("ec2", region_name=REGION).stop_instances(InstanceIds=[aws["db-01"]])
    stopped = {r.resource_id: r for r in asyncio.run(probe())}[server_row.id]
    assert not stopped.healthy and stopped.reason == f"EC2 instance {aws['db-01']} of server db-01 is stopped"


def test_discovering_again_updates_what_is_there(aws, ops_dsn):
    with psycopg.connect(ops_dsn) as conn:
        apply_plan(conn, discover_aws(region=REGION).plan)
        again = apply_plan(conn, discover_aws(region=REGION).plan)

    assert (again.servers_created, again.servers_updated, again.resources_created, again.resources_updated) == (
        0, 2, 0, 3)


def test_cli_discover_registers_and_a_dry_run_writes_nothing(aws, ops_dsn):
    runner = CliRunner()

    dry = runner.invoke(app, ["fleet", "discover", "aws", "--region", REGION, "--dry-run", "--json", "--dsn", ops_dsn])
    written_after_dry_run = query(ops_dsn, "SELECT count(*) AS n FROM resources")[0]["n"]
    real = runner.invoke(app, ["fleet", "discover", "aws", "--region", REGION, "--json", "--dsn", ops_dsn])
    other_cloud = runner.invoke(app, ["fleet", "discover", "gcp", "--dsn", ops_dsn])
    bad_tag = runner.invoke(app, ["fleet", "discover", "aws", "--tag", "managed", "--dsn", ops_dsn])

    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output)["summary"] is None and written_after_dry_run == 0
    assert real.exit_code == 0, real.output
    out = json.loads(real.output)
    assert out["summary"]["resources_created"] == 3 and out["summary"]["servers_created"] == 2
    assert len(out["skipped"]) == 4
    assert query(ops_dsn, "SELECT count(*) AS n FROM resources")[0]["n"] == 5
    assert other_cloud.exit_code == 2 and "discovery knows aws only" in other_cloud.output
    assert bad_tag.exit_code == 2 and "is not KEY=VALUE" in bad_tag.output
