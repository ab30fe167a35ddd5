"""Shared fixtures: one real PostgreSQL and one real redis-server per test run (free ports, temp dirs)."""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetmedic.localfleet.services import PostgresCluster, RedisServer, free_port

_db_counter = itertools.count(1)

# DAG-parsing tests import Airflow: keep its home out of ~ and its examples out of the bag.
if "AIRFLOW_HOME" not in os.environ:
    _airflow_home = tempfile.mkdtemp(prefix="fleetmedic-airflow-home-")
    os.environ["AIRFLOW_HOME"] = _airflow_home
    atexit.register(shutil.rmtree, _airflow_home, ignore_errors=True)
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")


def pytest_collection_modifyitems(items):
    """Fast tests first, then the end-to-end ones (one shared stack), and last the e2e tests marked
    e2e_last, which leave part of the demo fleet broken for good."""
    items.sort(key=lambda item: (item.get_closest_marker("e2e") is not None,
                                 item.get_closest_marker("e2e_last") is not None))


@pytest.fixture(scope="session")
def services_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fleetmedic-test-"))
    os.chmod(path, 0o755)  # the postgres OS user must be able to reach its data dir below
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster(services_dir: Path) -> Iterator[PostgresCluster]:
    cluster = PostgresCluster(services_dir / "ops-pg", free_port())
    cluster.start()
    yield cluster
    cluster.stop(mode="immediate")


@pytest.fixture(scope="session")
def ops_template(pg_cluster: PostgresCluster) -> str:
    """A migrated database used as the template for each test's fresh ops database."""
    from fleetmedic.db.migrate import migrate

    pg_cluster.create_database("fleetmedic_template")
    migrate(pg_cluster.dsn("fleetmedic_template"))
    return "fleetmedic_template"


@pytest.fixture
def ops_dsn(pg_cluster: PostgresCluster, ops_template: str) -> Iterator[str]:
    """A fresh, fully migrated ops database for one test."""
    name = f"ops_test_{os.getpid()}_{next(_db_counter)}"
    pg_cluster.psql(f'CREATE DATABASE "{name}" TEMPLATE "{ops_template}"')
    yield pg_cluster.dsn(name)
    pg_cluster.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_db_dsn(pg_cluster: PostgresCluster) -> Iterator[str]:
    """A fresh database with no schema at all (for migration tests)."""
    name = f"empty_test_{os.getpid()}_{next(_db_counter)}"
    pg_cluster.create_database(name)
    yield pg_cluster.dsn(name)
    pg_cluster.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_server(services_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer(services_dir / "redis", free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    return redis_server.url
