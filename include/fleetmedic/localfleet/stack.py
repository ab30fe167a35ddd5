"""The whole local system in one place: ops PostgreSQL, Redis, the demo fleet and a real Airflow.

`make demo` and the end-to-end test fixture both use `LocalStack`, so what the tests exercise is
what an operator runs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fleetmedic.config import REPO_ROOT
from fleetmedic.localfleet.fleet import DemoFleet
from fleetmedic.localfleet.services import PostgresCluster, RedisServer, ServiceError

__all__ = ["LocalStack", "StackConfig", "fleetmedic_dag_ids"]

def fleetmedic_dag_ids() -> list[str]:
    """Every DAG of the project: by convention dags/<dag_id>.py (the integrity test enforces it)."""
    return sorted(p.stem for p in (REPO_ROOT / "dags").glob("*.py") if not p.name.startswith("_"))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ServiceError(f"{name}={value!r} is not a port number") from exc


@dataclass
class StackConfig:
    home: str
    ops_port: int = 15432
    redis_port: int = 16379
    airflow_port: int = 8080
    fleet_base_port: int = 15500
    pairs: int = 2
    redis_pairs: int = 1
    airflow: bool = True
    # More DAG folders for Airflow beside dags/ (each becomes a local DAG bundle); tests use it.
    extra_dag_folders: list[str] = field(default_factory=list)

    @classmethod
    def from_env(cls, home: Path) -> StackConfig:
        saved = Path(home) / "stack.json"
        if saved.exists():
            return cls(**json.loads(saved.read_text()))
        return cls(
            home=str(home),
            ops_port=_env_int("FLEETMEDIC_OPS_PORT", 15432),
            redis_port=_env_int("FLEETMEDIC_REDIS_PORT", 16379),
            airflow_port=_env_int("FLEETMEDIC_AIRFLOW_PORT", 8080),
            fleet_base_port=_env_int("FLEETMEDIC_FLEET_PORT", 15500),
            pairs=_env_int("FLEETMEDIC_PG_PAIRS", 2),
            redis_pairs=_env_int("FLEETMEDIC_REDIS_PAIRS", 1),
        )


class LocalStack:
    def __init__(self, config: StackConfig):
        self.config = config
        self.home = Path(config.home).absolute()
        self.ops = PostgresCluster(self.home / "ops-pg", config.ops_port)
        self.redis = RedisServer(self.home / "redis", config.redis_port)
        self.fleet = DemoFleet(self.home / "fleet", pairs=config.pairs, redis_pairs=config.redis_pairs,
                               base_port=config.fleet_base_port)
        self._airflow = None

    @property
    def ops_dsn(self) -> str:
        return self.ops.dsn("fleetmedic_ops")

    @property
    def airflow(self):  # -> AirflowStack
        if self._airflow is None:
            from fleetmedic.localfleet.airflow_runner import AirflowStack

            self._airflow = AirflowStack(
                home=self.home / "airflow",
                port=self.config.airflow_port,
                metadata_dsn=self.ops.dsn("airflow"),
                dags_folder=REPO_ROOT / "dags",
                plugins_folder=REPO_ROOT / "plugins",
                extra_env=self.airflow_connections(),
                config=self._bundle_config(),
            )
        return self._airflow

    def _bundle_config(self) -> dict[str, str]:
        if not self.config.extra_dag_folders:
            return {}
        local = "airflow.dag_processing.bundles.local.LocalDagBundle"
        bundles = [{"name": "dags-folder", "classpath": local, "kwargs": {}}]
        bundles += [{"name": f"extra-{i}", "classpath": local, "kwargs": {"path": str(Path(p).absolute())}}
                    for i, p in enumerate(self.config.extra_dag_folders, 1)]
        return {"AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(bundles)}

    def airflow_connections(self) -> dict[str, str]:
        return {
            "AIRFLOW_CONN_FLEETMEDIC_OPS": f"postgresql://postgres@127.0.0.1:{self.config.ops_port}/fleetmedic_ops",
            "AIRFLOW_CONN_FLEETMEDIC_REDIS": f"redis://127.0.0.1:{self.config.redis_port}/0",
            # Reports and other local files of tasks go under this stack's home, not the repo's.
            "FLEETMEDIC_HOME": str(self.home),
        }

    def env_values(self) -> dict[str, str]:
        values = {
            "FLEETMEDIC_OPS_DSN": self.ops_dsn,
            "FLEETMEDIC_REDIS_URL": self.redis.url,
            "FLEETMEDIC_HOME": str(self.home),
        }
        if self.config.airflow:
            values.update({
                "AIRFLOW_URL": self.airflow.url,
                "AIRFLOW_USER": self.airflow.user,
                "AIRFLOW_PASSWORD": self.airflow.password,
            })
        return values

    def write_env_file(self) -> Path:
        path = self.home / "demo.env"
        lines = ["# written by `fleetmedic demo up`; scripts can `source` it"]
        lines += [f"{k}={v}" for k, v in self.env_values().items()]
        path.write_text("\n".join(lines) + "\n")
        os.chmod(path, 0o600)
        return path

    def up(self, progress=print) -> None:
        from fleetmedic.db.migrate import migrate

        t0 = time.monotonic()
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "stack.json").write_text(json.dumps(asdict(self.config), indent=2))
        progress(f"ops database: PostgreSQL on 127.0.0.1:{self.config.ops_port} ({self.ops.datadir})")
        self.ops.start()
        self.ops.create_database("fleetmedic_ops")
        applied = migrate(self.ops_dsn)
        progress(f"ops database: {len(applied)} migration(s) applied" if applied else "ops database: schema up to date")
        progress(f"redis: 127.0.0.1:{self.config.redis_port}")
        self.redis.start()
        progress(f"demo fleet: {self.config.pairs} PostgreSQL pair(s), {self.config.redis_pairs} Redis pair(s)")
        self.fleet.up(self.ops_dsn, progress=progress)
        if self.config.airflow:
            self.ops.create_database("airflow")
            progress("airflow: migrating its metadata database and starting api-server, scheduler, "
                     "dag-processor, triggerer")
            af = self.airflow
            af.start()
            af.wait_ready(timeout=240)
            with af.client() as client:
                from fleetmedic.playbooks.loader import load_all
                from fleetmedic.safety.pools import sync_pools

                # One pool per playbook, sized from limits.concurrency, before any playbook task is queued.
                pools = sync_pools(client, load_all().playbooks.values(), prune=False)
                progress(f"airflow: pools {', '.join(f'{c.pool}={c.slots}' for c in pools)}")
                dag_ids = fleetmedic_dag_ids()
                client.wait_for_dags(dag_ids, timeout=240)
                for dag_id in dag_ids:
                    client.unpause(dag_id)
        env_file = self.write_env_file()
        progress(f"up in {time.monotonic() - t0:.0f}s; settings written to {env_file}")

    def down(self, progress=print) -> None:
        if self.config.airflow:
            if self.airflow.stop():
                progress("airflow: stopped")
        self.fleet.down(progress=progress)
        if self.redis.stop():
            progress("redis: stopped")
        if self.ops.stop():
            progress("ops database: stopped")
