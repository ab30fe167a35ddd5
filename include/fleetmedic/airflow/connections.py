"""Turn the Airflow connections `fleetmedic_ops`, `fleetmedic_redis` and `fleetmedic_airflow` into what the core takes."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

__all__ = ["AIRFLOW_API_CONN_ID", "OPS_CONN_ID", "REDIS_CONN_ID", "airflow_api_client", "aops_dsn", "ops_dsn",
           "redis_url"]

OPS_CONN_ID = "fleetmedic_ops"
REDIS_CONN_ID = "fleetmedic_redis"
AIRFLOW_API_CONN_ID = "fleetmedic_airflow"  # this Airflow's REST API: an http connection with login and password


def _pg_dsn(conn: Any) -> str:
    from psycopg.conninfo import make_conninfo

    params: dict[str, Any] = {
        "host": conn.host or "127.0.0.1",
        "port": conn.port or 5432,
        "user": conn.login or "postgres",
        "dbname": conn.schema or "fleetmedic_ops",
    }
    if conn.password:
        params["password"] = conn.password
    return make_conninfo(**params)


def ops_dsn(conn_id: str = OPS_CONN_ID) -> str:
    return _pg_dsn(BaseHook.get_connection(conn_id))


async def aops_dsn(conn_id: str = OPS_CONN_ID) -> str:
    return _pg_dsn(await BaseHook.aget_connection(conn_id))


def redis_url(conn_id: str = REDIS_CONN_ID) -> str:
    conn = BaseHook.get_connection(conn_id)
    auth = f":{conn.password}@" if conn.password else ""
    db = (conn.extra_dejson or {}).get("db", 0) if hasattr(conn, "extra_dejson") else 0
    return f"redis://{auth}{conn.host or '127.0.0.1'}:{conn.port or 6379}/{db}"


def airflow_api_client(conn_id: str = AIRFLOW_API_CONN_ID) -> Any:
    """An AirflowClient for this Airflow's REST API, from an http connection (host, port, login, password)."""
    from fleetmedic.airflow_api import AirflowClient

    conn = BaseHook.get_connection(conn_id)
    if not (conn.host and conn.login and conn.password):
        raise ValueError(f"connection {conn_id!r} needs host, login and password of an Airflow user allowed to "
                         f"manage pools, e.g. AIRFLOW_CONN_{conn_id.upper()}='http://admin:secret@127.0.0.1:8080'")
    scheme = conn.schema or "http"
    return AirflowClient(f"{scheme}://{conn.host}:{conn.port or 8080}", conn.login, conn.password)
