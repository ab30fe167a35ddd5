"""One real stack for every end-to-end test: ops PostgreSQL, Redis, demo fleet and a real Airflow."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetmedic.localfleet.services import free_port, free_port_block

# Who may break what in the shared demo fleet (tests run one after another in one session; each
# test leaves its resources healthy unless it is marked `e2e_last`):
#   pg1a            resource_down (stop), blocking queries; the window drill's table (25 inventory
#                   entries drill-NN point at pg1a, disabled, so the sweep does not probe them)
#   pg1b            kill-postgres; safety scenarios; manual-run drills (dry run, start_at)
#   pg2a/pg2b       step-timeout and approval drills on pg2b; then resource_down with both data
#                   directories removed (destructive, runs last)
#   pg3a/pg3b       follower_behind (pause-replay on pg3b), old_base_backup (pg3a), blocking queries
#                   in shadow mode (pg3a)
#   pg4a/pg4b       failover and changeover (destructive to the topology)
#   pg5a/pg5b       server_down and kernel_panic (srv-pg5a, srv-pg5b)
#   redis1a/redis1b resource_down for Redis, broken Redis replication (redis1b: also the safety
#                   scenarios, with the stack's own Redis stopped and started)


@pytest.fixture(scope="session")
def stack() -> Iterator[Any]:
    from fleetmedic.localfleet.stack import LocalStack, StackConfig

    home = Path(tempfile.mkdtemp(prefix="fleetmedic-e2e-"))
    os.chmod(home, 0o755)
    config = StackConfig(
        home=str(home), ops_port=free_port(), redis_port=free_port(), airflow_port=free_port(),
        fleet_base_port=free_port_block(110), pairs=5, redis_pairs=1,
        extra_dag_folders=[str(Path(__file__).resolve().parents[1] / "fixtures" / "e2e_dags")],
    )
    local = LocalStack(config)
    try:
        local.up()
    except BaseException:
        local.down()
        raise
    yield local
    local.down()
    leftovers = local.airflow.leftover_processes()
    shutil.rmtree(home, ignore_errors=True)
    assert leftovers == [], f"Airflow processes left after stop: {leftovers}"


@pytest.fixture(scope="session")
def airflow(stack) -> Iterator[Any]:
    with stack.airflow.client() as client:
        yield client


@pytest.fixture
def wait_until() -> Callable[..., Any]:
    def wait(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 2.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(interval)

    return wait


@pytest.fixture
def cli(stack, monkeypatch) -> Callable[..., Any]:
    """Run a `fleetmedic` console command against the stack as the human `e2e-oncall`; it must succeed."""
    from typer.testing import CliRunner

    from fleetmedic.console.cli import app

    for key, value in stack.env_values().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FLEETMEDIC_USER", "e2e-oncall")

    def run(*args: str) -> Any:
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == 0, result.output
        return result

    return run
