"""A real Airflow 3 (api-server, scheduler, dag-processor, triggerer) driven through its REST API.

Slow (about a minute on 2 cores): marked e2e. Metadata DB is a database in the session's PostgreSQL.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetmedic.airflow_api import AirflowApiError, AirflowClient
from fleetmedic.localfleet.airflow_runner import AirflowStack, airflow_processes
from fleetmedic.localfleet.services import PostgresCluster, free_port

pytestmark = pytest.mark.e2e

FIXTURE_DAGS = Path(__file__).resolve().parents[1] / "fixtures" / "airflow_dags"


@pytest.fixture(scope="module")
def airflow_stack(pg_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowStack]:
    base = tmp_path_factory.mktemp("airflow")
    dags = base / "dags"
    shutil.copytree(FIXTURE_DAGS, dags, ignore=shutil.ignore_patterns("__pycache__"))
    pg_cluster.create_database("airflow_test")
    stack = AirflowStack(
        home=base / "home", port=free_port(), metadata_dsn=pg_cluster.dsn("airflow_test"),
        dags_folder=dags, plugins_folder=base / "plugins", parallelism=4,
    )
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        timings["db_migrate"] = stack.migrate_db()
        t1 = time.monotonic()
        stack.start(migrate=False)
        stack.wait_ready(timeout=240)
        timings["start_to_ready"] = time.monotonic() - t1
        stack.timings = timings  # type: ignore[attr-defined]
        yield stack
    finally:
        t2 = time.monotonic()
        stack.stop()
        timings["stop"] = time.monotonic() - t2
        timings["total"] = time.monotonic() - t0
        print("\nairflow stack timings: " + ", ".join(f"{k}={v:.1f}s" for k, v in timings.items()))


@pytest.fixture(scope="module")
def client(airflow_stack: AirflowStack) -> Iterator[AirflowClient]:
    with AirflowClient(airflow_stack.url, airflow_stack.user, airflow_stack.password) as c:
        yield c


def test_password_is_known_and_wrong_one_rejected(airflow_stack: AirflowStack, client: AirflowClient) -> None:
    assert client.login()
    with AirflowClient(airflow_stack.url, airflow_stack.user, "not-the-password") as bad:
        with pytest.raises(AirflowApiError) as err:
            bad.list_dags()
    assert err.value.status_code == 401
    assert "/auth/token" in str(err.value)


def test_health(client: AirflowClient) -> None:
    health = client.health()
    for component in ("metadatabase", "scheduler", "dag_processor", "triggerer"):
        assert health[component]["status"] == "healthy", health


def test_dag_parsed_and_triggered_run_writes_file(
    airflow_stack: AirflowStack, client: AirflowClient, tmp_path: Path,
) -> None:
    t0 = time.monotonic()
    dags = client.wait_for_dags(["fleetmedic_smoke"], timeout=120)
    parse_s = time.monotonic() - t0
    assert dags["fleetmedic_smoke"]["is_paused"] is False  # dags_are_paused_at_creation = False
    assert client.import_errors() == []
    assert "fleetmedic_smoke" in {d["dag_id"] for d in client.list_dags()}

    target = tmp_path / "written-by-airflow.txt"
    t1 = time.monotonic()
    run = client.trigger("fleetmedic_smoke", run_id="smoke_1", conf={"path": str(target), "text": "hello"})
    assert run["dag_run_id"] == "smoke_1"
    assert run["logical_date"] is None
    final = client.wait_for_run("fleetmedic_smoke", "smoke_1", timeout=180)
    run_s = time.monotonic() - t1
    tis = client.task_instances("fleetmedic_smoke", "smoke_1")
    if final["state"] != "success":
        logs = "\n".join(client.task_log("fleetmedic_smoke", "smoke_1", ti["task_id"]) for ti in tis)
        pytest.fail(f"run ended {final['state']}; task logs:\n{logs}")
    assert [(ti["task_id"], ti["state"]) for ti in tis] == [("write_file", "success")]
    assert target.read_text().startswith("hello\n")
    assert [r["dag_run_id"] for r in client.list_runs("fleetmedic_smoke", state="success")] == ["smoke_1"]
    timings = getattr(airflow_stack, "timings", {})
    timings["dag_parse"] = parse_s
    timings["trigger_to_success"] = run_s


def test_unknown_dag_error_names_url_and_status(client: AirflowClient) -> None:
    with pytest.raises(AirflowApiError) as err:
        client.trigger("no_such_dag", conf={})
    assert err.value.status_code == 404
    assert "/api/v2/dags/no_such_dag/dagRuns" in str(err.value)


def test_expired_or_foreign_token_is_replaced(airflow_stack: AirflowStack) -> None:
    import jwt  # PyJWT, an Airflow dependency: forge an expired token signed with the stack's secret

    now = int(time.time())
    secret = airflow_stack._secrets()["jwt_secret"]
    expired = jwt.encode(
        {"sub": airflow_stack.user, "role": "ADMIN", "iat": now - 600, "nbf": now - 600, "exp": now - 300},
        secret, algorithm="HS512",
    )
    with AirflowClient(airflow_stack.url, airflow_stack.user, airflow_stack.password) as c:
        for stale in (expired, "signed-by-someone-else"):  # 401 Token Expired / 403 Invalid JWT token
            c._token = stale
            assert c.get_dag("fleetmedic_smoke") is not None
            assert c._token != stale


def test_env_file_written(airflow_stack: AirflowStack) -> None:
    text = airflow_stack.env_file.read_text()
    assert f"AIRFLOW__CORE__EXECUTION_API_SERVER_URL={airflow_stack.url}/execution/" in text
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgresql+psycopg2://" in text
    assert airflow_stack.env_file.stat().st_mode & 0o077 == 0  # holds secrets


def test_stop_with_running_task_leaves_no_process(
    airflow_stack: AirflowStack, client: AirflowClient, tmp_path: Path,
) -> None:
    marker = tmp_path / "long-task-started.txt"
    client.trigger("fleetmedic_smoke", run_id="long_1", conf={"path": str(marker), "sleep": 600, "child": True})
    client.wait_for_run("fleetmedic_smoke", "long_1", timeout=120, states=("running",))
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert marker.exists(), "the long task never started"
    pid_of_task = int(marker.read_text().split("pid=")[1])
    assert Path(f"/proc/{pid_of_task}").exists()

    components = {p for p in airflow_stack.status().values() if p}
    assert len(components) == 4
    before = airflow_stack.leftover_processes()
    assert pid_of_task in before

    t0 = time.monotonic()
    assert airflow_stack.stop() is True
    getattr(airflow_stack, "timings", {})["stop_with_running_task"] = time.monotonic() - t0

    assert not airflow_stack.running()
    assert airflow_processes(airflow_stack.home, sessions=components) == []
    for pid in before:  # gone, or a zombie waiting for a reaper that is not us
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", pid
    assert airflow_stack.stop() is False  # idempotent
