"""Silences and maintenance windows: keep automation (and new incidents) off chosen resources until a time.

The sweep opens no incident for a silenced (resource, type); the gate holds a run whose incident is
silenced (`held_by: silence:<id>`), and lifting or outliving the silence releases it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta
from typing import Any

import psycopg

from fleetmedic.db.connect import connection, dict_cursor
from fleetmedic.safety.breakers import release_held

__all__ = [
    "Silence",
    "SilenceError",
    "active_silence_for",
    "add_silence",
    "get_silence",
    "list_silences",
    "release_lapsed",
    "remove_silence",
]

_TYPE = re.compile(r"^[a-z][a-z0-9_]*$")
_ACTIVE = "s.removed_at IS NULL AND s.starts_at <= now() AND s.ends_at > now()"
_SELECT = """
SELECT s.*, r.name AS resource_name, (s.removed_at IS NULL AND s.starts_at <= now() AND s.ends_at > now()) AS active
FROM silences s LEFT JOIN resources r ON r.id = s.resource_id
"""


class SilenceError(ValueError):
    """A silence cannot be added or removed; the message says why and what to do."""


@dataclass(frozen=True)
class Silence:
    """One row of `silences`, with its resource's name; resource/type None mean every one."""

    id: int
    resource_id: int | None
    resource_name: str | None
    type: str | None
    starts_at: datetime
    ends_at: datetime
    reason: str
    created_by: str
    created_at: datetime
    removed_at: datetime | None
    removed_by: str | None
    removed_reason: str | None
    active: bool

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Silence:
        return cls(**{f.name: row[f.name] for f in fields(cls)})

    @property
    def held_by(self) -> str:
        return f"silence:{self.id}"

    def describe(self) -> str:
        what = f"{self.type or 'every incident type'} on {self.resource_name or 'every resource'}"
        return f"silence {self.id} ({what}) until {self.ends_at:%Y-%m-%d %H:%M:%S %Z} by {self.created_by}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _resource_id(conn: psycopg.Connection[Any], resource: str | int | None) -> int | None:
    if resource is None or resource == "*":
        return None
    by_id = isinstance(resource, int) or str(resource).isdigit()
    with dict_cursor(conn) as cur:
        cur.execute(f"SELECT id FROM resources WHERE {'id' if by_id else 'name'} = %s".encode(),
                    (int(resource) if by_id else str(resource),))
        row = cur.fetchone()
        if row is not None:
            return int(row["id"])
        cur.execute("SELECT name FROM resources ORDER BY name LIMIT 20")
        known = ", ".join(r["name"] for r in cur.fetchall()) or "none"
    raise SilenceError(f"no resource {resource!r} in the inventory (known: {known}); see `fleetmedic fleet ls`")


def add_silence(
    dsn: str,
    *,
    resource: str | int | None,
    incident_type: str | None,
    duration: timedelta,
    reason: str,
    created_by: str,
    starts_at: datetime | None = None,
) -> Silence:
    """Silence `incident_type` (None: every type) on `resource` (name or id; None or '*': every resource)."""
    if duration <= timedelta(0):
        raise SilenceError(f"a silence must last some time (got {duration}); e.g. --for 2h")
    if not reason.strip():
        raise SilenceError("a silence needs a reason (e.g. 'planned maintenance, ticket OPS-123')")
    if incident_type is not None and not _TYPE.match(incident_type):
        raise SilenceError(f"{incident_type!r} is not an incident type (lowercase, e.g. resource_down)")
    if resource in (None, "*") and incident_type is None:
        raise SilenceError("silencing every type on every resource stops all automation: trip the global "
                           "breaker instead (`fleetmedic breakers trip global --reason ...`)")
    with connection(dsn) as conn, dict_cursor(conn) as cur:
        resource_id = _resource_id(conn, resource)
        cur.execute(
            """
            INSERT INTO silences (resource_id, type, starts_at, ends_at, reason, created_by)
            VALUES (%(rid)s, %(type)s, COALESCE(%(starts)s, now()), COALESCE(%(starts)s, now()) + %(duration)s,
                    %(reason)s, %(by)s)
            RETURNING id
            """,
            {"rid": resource_id, "type": incident_type, "starts": starts_at, "duration": duration,
             "reason": reason, "by": created_by},
        )
        row = cur.fetchone()
        assert row is not None
        silence_id = int(row["id"])
    return get_silence(dsn, silence_id)


def get_silence(target: str | psycopg.Connection[Any], silence_id: int) -> Silence:
    with connection(target) as conn, dict_cursor(conn) as cur:
        cur.execute(_SELECT + " WHERE s.id = %s", (silence_id,))
        row = cur.fetchone()
    if row is None:
        raise SilenceError(f"silence {silence_id} does not exist; see `fleetmedic silences list --all`")
    return Silence.from_row(row)


def list_silences(target: str | psycopg.Connection[Any], *, include_inactive: bool = False,
                  limit: int = 200) -> list[Silence]:
    """Silences in force (or, with `include_inactive`, every one), newest first."""
    where = "" if include_inactive else f" WHERE {_ACTIVE}"
    with connection(target) as conn, dict_cursor(conn) as cur:
        cur.execute((_SELECT + where + " ORDER BY s.id DESC LIMIT %s").encode(), (limit,))
        return [Silence.from_row(r) for r in cur.fetchall()]


def active_silence_for(target: str | psycopg.Connection[Any], resource_id: int, incident_type: str) -> Silence | None:
    """The silence covering (resource, type) now, the one lasting longest, or None."""
    with connection(target) as conn, dict_cursor(conn) as cur:
        cur.execute(
            (_SELECT + f" WHERE {_ACTIVE} AND (s.resource_id IS NULL OR s.resource_id = %s)"
             " AND (s.type IS NULL OR s.type = %s) ORDER BY s.ends_at DESC LIMIT 1").encode(),
            (resource_id, incident_type),
        )
        row = cur.fetchone()
    return Silence.from_row(row) if row else None


def remove_silence(dsn: str, silence_id: int, *, actor: str, reason: str) -> tuple[Silence, list[int]]:
    """Lift a silence now (audited: who and why) and release the incidents it held; (silence, released ids)."""
    if not reason.strip():
        raise SilenceError("removing a silence needs a reason")
    with connection(dsn) as conn, conn.transaction(), dict_cursor(conn) as cur:
        cur.execute(
            "UPDATE silences SET removed_at = now(), removed_by = %s, removed_reason = %s "
            "WHERE id = %s AND removed_at IS NULL RETURNING id",
            (actor, reason, silence_id),
        )
        if cur.fetchone() is None:
            silence = get_silence(conn, silence_id)  # raises when it does not exist
            raise SilenceError(f"silence {silence_id} was already removed at {silence.removed_at:%Y-%m-%d %H:%M:%S} "
                               f"by {silence.removed_by}")
        released = release_held(conn, f"silence:{silence_id}", actor=actor,
                                reason=f"released: silence {silence_id} removed by {actor}: {reason}")
        silence = get_silence(conn, silence_id)
    return silence, released


def release_lapsed(dsn: str, *, actor: str) -> list[int]:
    """Release incidents held by silences that expired (held -> open); their ids."""
    with connection(dsn) as conn, conn.transaction(), dict_cursor(conn) as cur:
        cur.execute(
            """
            SELECT DISTINCT e.data->>'held_by' AS held_by FROM incidents i
            JOIN incident_events e ON e.incident_id = i.id AND e.to_state = 'held'
            WHERE i.state = 'held' AND e.data->>'held_by' LIKE 'silence:%%'
            """
        )
        holders = [r["held_by"] for r in cur.fetchall()]
        released: list[int] = []
        for held_by in holders:
            silence_id = int(held_by.split(":", 1)[1])
            cur.execute(f"SELECT 1 FROM silences s WHERE s.id = %s AND {_ACTIVE}".encode(), (silence_id,))
            if cur.fetchone() is None:
                released += release_held(conn, held_by, actor=actor,
                                         reason=f"released: silence {silence_id} is over")
    return released
