"""Where fleetmedic finds its databases and local state: environment first, then `.local/demo.env`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["REPO_ROOT", "Settings", "load_settings", "local_home", "read_env_file"]

# include/fleetmedic/config.py -> repository root (the package is installed editable).
REPO_ROOT = Path(__file__).resolve().parents[2]


def local_home() -> Path:
    """Git-ignored directory holding local clusters, Airflow home, logs and pid files."""
    return Path(os.environ.get("FLEETMEDIC_HOME", REPO_ROOT / ".local")).absolute()


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if not path.exists():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip().strip("'\"")
    return values


@dataclass(frozen=True)
class Settings:
    ops_dsn: str
    redis_url: str
    airflow_url: str | None = None
    airflow_user: str | None = None
    airflow_password: str | None = None


class SettingsError(RuntimeError):
    pass


def load_settings(home: Path | None = None) -> Settings:
    """Environment variables win; otherwise the values `make demo` wrote to `.local/demo.env`."""
    file_values = read_env_file((home or local_home()) / "demo.env")

    def get(key: str) -> str | None:
        return os.environ.get(key) or file_values.get(key)

    ops = get("FLEETMEDIC_OPS_DSN")
    redis_url = get("FLEETMEDIC_REDIS_URL")
    if not ops or not redis_url:
        raise SettingsError(
            "fleetmedic does not know where its ops database is: set FLEETMEDIC_OPS_DSN and FLEETMEDIC_REDIS_URL, "
            f"or run `make demo`, which writes them to {(home or local_home()) / 'demo.env'}"
        )
    return Settings(
        ops_dsn=ops,
        redis_url=redis_url,
        airflow_url=get("AIRFLOW_URL"),
        airflow_user=get("AIRFLOW_USER"),
        airflow_password=get("AIRFLOW_PASSWORD"),
    )
