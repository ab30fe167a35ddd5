"""A human puts a playbook in shadow mode at run time, and takes it out again: audited, no deploy.

`limits.mode` in the playbook's YAML is how a playbook is promoted (reviewed like any change). At
3 a.m. an operator who distrusts a playbook needs the opposite, at once: `fleetmedic shadow on
<type> --reason ...` makes its runs record what they would do and escalate (the gate), and makes
runs already past the gate stop before their next action (`action_permit`). `fleetmedic shadow off`
removes the override; the YAML's mode applies again. An override can only make a playbook more
careful: nothing here makes a shadow playbook act.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg

from fleetmedic.db.connect import connection, dict_cursor

__all__ = ["ModeChange", "ModeOverride", "clear_shadow", "get_override", "list_overrides", "set_shadow"]


@dataclass(frozen=True)
class ModeOverride:
    """A playbook a human put in shadow mode: who, why, since when."""

    type: str
    mode: str
    actor: str
    reason: str
    set_at: datetime

    def describe(self) -> str:
        return f"put in shadow by {self.actor} at {self.set_at:%Y-%m-%d %H:%M:%S}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModeChange:
    changed: bool
    message: str
    override: ModeOverride | None
    event_id: int | None = None


def _need(actor: str, reason: str) -> None:
    if not actor.startswith("human:"):
        raise ValueError(f"a playbook's mode is overridden by a human (actor human:<name>), not {actor!r}")
    if not reason.strip():
        raise ValueError("changing a playbook's mode needs a reason (--reason '...'): every override is audited")


def get_override(target: str | psycopg.Connection[Any], playbook_type: str) -> ModeOverride | None:
    with connection(target) as conn, dict_cursor(conn) as cur:
        cur.execute("SELECT type, mode, actor, reason, set_at FROM playbook_modes WHERE type = %s", (playbook_type,))
        row = cur.fetchone()
    return ModeOverride(**row) if row else None


def list_overrides(target: str | psycopg.Connection[Any]) -> list[ModeOverride]:
    with connection(target) as conn, dict_cursor(conn) as cur:
        cur.execute("SELECT type, mode, actor, reason, set_at FROM playbook_modes ORDER BY type")
        return [ModeOverride(**r) for r in cur.fetchall()]


def _event(cur: psycopg.Cursor[Any], playbook_type: str, mode: str, actor: str, reason: str) -> int:
    cur.execute("INSERT INTO playbook_mode_events (type, mode, actor, reason) VALUES (%s, %s, %s, %s) RETURNING id",
                (playbook_type, mode, actor, reason))
    row = cur.fetchone()
    assert row is not None  # INSERT ... RETURNING returns its row
    return int(row["id"])


def set_shadow(dsn: str, playbook_type: str, *, actor: str, reason: str) -> ModeChange:
    """Put the playbook in shadow mode now (idempotent: already in shadow by override changes nothing)."""
    _need(actor, reason)
    with connection(dsn) as conn, conn.transaction(), dict_cursor(conn) as cur:
        cur.execute("INSERT INTO playbook_modes (type, mode, actor, reason) VALUES (%s, 'shadow', %s, %s) "
                    "ON CONFLICT (type) DO NOTHING RETURNING type, mode, actor, reason, set_at",
                    (playbook_type, actor, reason.strip()))
        row = cur.fetchone()
        if row is None:
            current = get_override(conn, playbook_type)
            return ModeChange(False, f"playbook {playbook_type} is already in shadow mode: "
                                     f"{current.describe() if current else ''}", current)
        event_id = _event(cur, playbook_type, "shadow", actor, reason.strip())
    override = ModeOverride(**row)
    return ModeChange(True, f"playbook {playbook_type} is in shadow mode now: its runs record what they would do "
                            "and escalate; runs past their gate stop before their next action", override, event_id)


def clear_shadow(dsn: str, playbook_type: str, *, actor: str, reason: str) -> ModeChange:
    """Remove the override: the playbook's YAML decides its mode again (idempotent)."""
    _need(actor, reason)
    with connection(dsn) as conn, conn.transaction(), dict_cursor(conn) as cur:
        cur.execute("DELETE FROM playbook_modes WHERE type = %s RETURNING type, mode, actor, reason, set_at",
                    (playbook_type,))
        row = cur.fetchone()
        if row is None:
            return ModeChange(False, f"playbook {playbook_type} has no shadow override; its YAML decides its mode", None)
        event_id = _event(cur, playbook_type, "playbook", actor, reason.strip())
    return ModeChange(True, f"playbook {playbook_type}: shadow override removed; its YAML (limits.mode) decides "
                            "its mode again", ModeOverride(**row), event_id)
