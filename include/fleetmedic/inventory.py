"""The fleet inventory in the ops DB: servers and the database resources that live on them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import psycopg

__all__ = ["Resource", "Server", "UnknownResource", "get_resource", "list_resources", "upsert_resource",
           "upsert_server", "upsert_server_resource"]


class UnknownResource(LookupError):
    pass


@dataclass(frozen=True)
class Server:
    id: int
    name: str
    provider: str
    address: str | None
    state: str
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Resource:
    id: int
    name: str
    kind: str
    role: str
    host: str
    port: int
    server_id: int | None
    primary_id: int | None
    enabled: bool
    attrs: dict[str, Any] = field(default_factory=dict)
    server: Server | None = None


_RESOURCE_COLS = "r.id, r.name, r.kind, r.role, r.host, r.port, r.server_id, r.primary_id, r.enabled, r.attrs"
_SERVER_COLS = "s.id, s.name, s.provider, s.address, s.state, s.attrs"


def _row_to_resource(row: tuple) -> Resource:
    server = Server(*row[10:16]) if row[10] is not None else None
    return Resource(*row[:9], attrs=dict(row[9] or {}), server=server)


def get_resource(conn: psycopg.Connection, key: int | str) -> Resource:
    """A resource by id or by name, with its server."""
    where = "r.id = %s" if isinstance(key, int) else "r.name = %s"
    row = conn.execute(
        f"SELECT {_RESOURCE_COLS}, {_SERVER_COLS} FROM resources r LEFT JOIN servers s ON s.id = r.server_id "
        f"WHERE {where}",
        (key,),
    ).fetchone()
    if row is None:
        names = [r[0] for r in conn.execute("SELECT name FROM resources ORDER BY name LIMIT 20").fetchall()]
        raise UnknownResource(f"no resource {key!r} in the inventory (known: {', '.join(names) or 'none'})")
    return _row_to_resource(tuple(row))


def list_resources(conn: psycopg.Connection) -> list[Resource]:
    rows = conn.execute(
        f"SELECT {_RESOURCE_COLS}, {_SERVER_COLS} FROM resources r LEFT JOIN servers s ON s.id = r.server_id "
        "ORDER BY r.name"
    ).fetchall()
    return [_row_to_resource(tuple(r)) for r in rows]


def upsert_server(conn: psycopg.Connection, *, name: str, provider: str, address: str | None = None,
                  attrs: dict[str, Any] | None = None, state: str = "running") -> int:
    row = conn.execute(
        "INSERT INTO servers (name, provider, address, attrs, state) VALUES (%s, %s, %s, %s, %s) "
        "ON CONFLICT (name) DO UPDATE SET provider = excluded.provider, address = excluded.address, "
        "attrs = excluded.attrs, updated_at = now() RETURNING id",
        (name, provider, address, json.dumps(attrs or {}), state),
    ).fetchone()
    assert row is not None
    return int(row[0])


def upsert_resource(conn: psycopg.Connection, *, name: str, kind: str, role: str, host: str, port: int,
                    server_id: int | None, primary_id: int | None = None,
                    attrs: dict[str, Any] | None = None) -> int:
    row = conn.execute(
        "INSERT INTO resources (name, kind, role, host, port, server_id, primary_id, attrs) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, host = excluded.host, port = excluded.port, "
        "server_id = excluded.server_id, attrs = excluded.attrs, updated_at = now() RETURNING id",
        (name, kind, role, host, port, server_id, primary_id, json.dumps(attrs or {})),
    ).fetchone()
    assert row is not None
    return int(row[0])


def upsert_server_resource(conn: psycopg.Connection, *, server_id: int, name: str, host: str) -> int:
    """The server's own row in `resources` (kind 'server', no port): server-level incidents attach to it."""
    clash = conn.execute("SELECT kind FROM resources WHERE name = %s AND kind <> 'server'", (name,)).fetchone()
    if clash is not None:
        raise ValueError(f"server {name!r} cannot be registered: a {clash[0]} resource is already named {name!r} "
                         "(servers and databases share one namespace in `resources`); rename one of them")
    row = conn.execute(
        "INSERT INTO resources (name, kind, role, host, port, server_id) VALUES (%s, 'server', 'standalone', %s, "
        "NULL, %s) ON CONFLICT (name) DO UPDATE SET host = excluded.host, server_id = excluded.server_id, "
        "updated_at = now() RETURNING id",
        (name, host, server_id),
    ).fetchone()
    assert row is not None
    return int(row[0])
