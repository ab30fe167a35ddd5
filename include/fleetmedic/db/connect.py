"""Connections to the ops database: one `connect` with fleetmedic defaults, and small helpers around it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime, timedelta
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb

__all__ = [
    "OpsDatabaseUnavailable",
    "connect",
    "connection",
    "dict_cursor",
    "jsonb",
    "json_dumps",
    "redact_dsn",
]

# Connections are short-lived and many (one per store call, one per sweep shard): fail fast.
DEFAULT_CONNECT_TIMEOUT = 10


class OpsDatabaseUnavailable(psycopg.OperationalError):
    """The ops database could not be reached; the message names it (without password) and what to check."""


def redact_dsn(dsn: str) -> str:
    """The DSN as a `key=value` string without its password, safe to put in logs and error messages."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparseable DSN>"
    params.pop("password", None)
    return make_conninfo("", **{k: v for k, v in params.items() if v is not None})


def connect(
    dsn: str,
    *,
    autocommit: bool = False,
    row_factory: Any = dict_row,
    application_name: str = "fleetmedic",
    connect_timeout: int = DEFAULT_CONNECT_TIMEOUT,
    **kwargs: Any,
) -> psycopg.Connection[Any]:
    """Open a connection to `dsn` with dict rows by default.

    `application_name` and `connect_timeout` apply only when the DSN does not set them itself.
    Raises `OpsDatabaseUnavailable` naming the database when it cannot connect.
    """
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ValueError(
            f"not a valid PostgreSQL DSN ({exc}); expected e.g. postgresql://user@host:5432/dbname"
        ) from exc
    params.setdefault("application_name", application_name)
    params.setdefault("connect_timeout", str(connect_timeout))
    params.update(kwargs)
    try:
        return psycopg.connect(make_conninfo("", **params), autocommit=autocommit, row_factory=row_factory)
    except psycopg.OperationalError as exc:
        raise OpsDatabaseUnavailable(
            f"cannot connect to the ops database ({redact_dsn(dsn)}): {str(exc).strip()}; "
            "check that PostgreSQL is running there and FLEETMEDIC_OPS_DSN (or the fleetmedic_ops connection) is right"
        ) from exc


@contextmanager
def connection(target: str | psycopg.Connection[Any], **kwargs: Any) -> Iterator[psycopg.Connection[Any]]:
    """Use the caller's connection as is, or open one for `target` (a DSN) for the block.

    A connection opened here commits when the block succeeds, rolls back when it raises, and is closed.
    A connection passed in is left open and its transaction is left to its owner.
    """
    if isinstance(target, psycopg.Connection):
        yield target
        return
    with connect(target, **kwargs) as conn:
        yield conn


def dict_cursor(conn: psycopg.Connection[Any]) -> psycopg.Cursor[DictRow]:
    """A cursor returning dict rows whatever the connection's own row factory is."""
    return conn.cursor(row_factory=dict_row)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)


def json_dumps(value: Any) -> str:
    """JSON for jsonb columns: timestamps as ISO strings, enums as values, anything else as its repr."""
    return json.dumps(value, default=_json_default, sort_keys=True)


def jsonb(value: Any) -> Jsonb:
    """Wrap a value for a jsonb parameter, tolerating datetimes and other non-JSON types."""
    return Jsonb(value if value is not None else {}, dumps=json_dumps)
