"""Turn the Airflow connections `fleetmedic_ops` and `fleetmedic_redis` into DSNs for the core."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

__all__ = ["OPS_CONN_ID", "REDIS_CONN_ID", "aops_dsn", "ops_dsn", "redis_url"]

OPS_CONN_ID = "fleetmedic_ops"
REDIS_CONN_ID = "fleetmedic_redis"


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
