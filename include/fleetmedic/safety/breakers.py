"""Circuit breakers (closed -> open -> half_open -> closed): state in the ops DB, action windows in Redis.

The ops DB row in `breakers` is the truth for "is it open"; every change appends to `breaker_events`
in the same transaction, and a trip enqueues exactly one page (dedup key per trip). Redis holds the
fast sliding window of runs admitted per playbook; when Redis lost it, it is rebuilt from the gate's
recorded decisions, so correctness never depends on Redis alone.

Incidents held by a breaker carry `held_by` on their `held` event; closing the breaker (a human
reset, or a half-open probe that resolved) releases them (held -> open) and the sweep starts their
playbook runs again.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any

import psycopg
import redis
from psycopg.rows import DictRow
from redis.backoff import NoBackoff
from redis.retry import Retry

from fleetmedic.db.connect import connection, dict_cursor, jsonb
from fleetmedic.incidents.store import IncidentStore
from fleetmedic.pager.outbox import Page, enqueue_page

__all__ = [
    "GLOBAL",
    "Breaker",
    "BreakerChange",
    "RedisUnavailable",
    "WindowResult",
    "admit_probe",
    "breaker_page_key",
    "clear_window",
    "get_breaker",
    "held_incidents",
    "list_breakers",
    "parse_breaker_name",
    "playbook_breaker",
    "redis_client",
    "refresh",
    "release_held",
    "reserve_action",
    "reset",
    "trip",
    "window_count",
]

GLOBAL = "global"
_PLAYBOOK = re.compile(r"^playbook:[a-z][a-z0-9_]*$")
_TYPE = re.compile(r"^[a-z][a-z0-9_]*$")
SYSTEM_ACTOR = "automation:fleetmedic/breakers"


class RedisUnavailable(RuntimeError):
    """Redis did not answer: automation fails closed (no action, the global breaker trips)."""


def playbook_breaker(incident_type: str) -> str:
    """The breaker of one playbook: `playbook:<type>`."""
    return f"playbook:{incident_type}"


def parse_breaker_name(value: str) -> str:
    """`global`, `playbook:<type>`, or a bare `<type>` (taken as its playbook's breaker)."""
    value = value.strip()
    if value == GLOBAL or _PLAYBOOK.match(value):
        return value
    if _TYPE.match(value):
        return playbook_breaker(value)
    raise ValueError(f"{value!r} is not a breaker name: use 'global' or 'playbook:<type>' (e.g. playbook:resource_down)")


def breaker_page_key(name: str, trip_event_id: int) -> str:
    """The pager dedup key of one trip: every trip pages once, a later trip pages again."""
    return f"fleetmedic-breaker-{name.replace(':', '-')}-trip-{trip_event_id}"


def redis_client(url: str, timeout: float = 2.0) -> redis.Redis:
    """A Redis client that fails fast (no retries): an unreachable Redis must not stall a gate."""
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                retry=Retry(NoBackoff(), 0), decode_responses=True)


@dataclass(frozen=True)
class Breaker:
    """One row of `breakers` (a breaker never changed is closed and has no row yet)."""

    name: str
    state: str = "closed"
    version: int = 0
    reason: str = ""
    changed_at: datetime | None = None
    changed_by: str = SYSTEM_ACTOR
    trip_event_id: int | None = None
    half_open_after: datetime | None = None
    cooldown: timedelta | None = None
    probe_incident_id: int | None = None
    window_since: datetime | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Breaker:
        return cls(**{f.name: row[f.name] for f in fields(cls)})

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BreakerChange:
    """What one breaker operation did: the breaker after it, its event, its page, incidents released."""

    breaker: Breaker
    changed: bool
    message: str
    event_id: int | None = None
    page: Page | None = None
    released: list[int] = field(default_factory=list)


# -- reading ------------------------------------------------------------------------------------

def get_breaker(target: str | psycopg.Connection[Any], name: str) -> Breaker:
    with connection(target) as conn, dict_cursor(conn) as cur:
        cur.execute("SELECT * FROM breakers WHERE name = %s", (name,))
        row = cur.fetchone()
    return Breaker.from_row(row) if row else Breaker(name)


def list_breakers(target: str | psycopg.Connection[Any], also: Iterable[str] = ()) -> list[Breaker]:
    """Every breaker with a row, plus `global` and the names in `also` (closed when never changed)."""
    with connection(target) as conn, dict_cursor(conn) as cur:
        cur.execute("SELECT * FROM breakers ORDER BY name")
        found = {r["name"]: Breaker.from_row(r) for r in cur.fetchall()}
    for name in (GLOBAL, *also):
        found.setdefault(name, Breaker(name))
    return sorted(found.values(), key=lambda b: (b.name != GLOBAL, b.name))


def held_incidents(
    target: str | psycopg.Connection[Any], held_by: str, *, limit: int | None = None
) -> list[int]:
    """Ids of the incidents held by `held_by` (a breaker name or `silence:<id>`), oldest first.

    Who holds an incident is on its latest `held` event (`data.held_by`); incidents the mass-failure
    guard opened as held carry none and count as held by the global breaker.
    """
    with connection(target) as conn, dict_cursor(conn) as cur:
        cur.execute(
            """
            SELECT i.id FROM incidents i
            CROSS JOIN LATERAL (
                SELECT e.data FROM incident_events e
                WHERE e.incident_id = i.id AND e.to_state = 'held'
                ORDER BY e.id DESC LIMIT 1
            ) h
            WHERE i.state = 'held' AND COALESCE(h.data->>'held_by', %s) = %s
            ORDER BY i.id
            LIMIT %s
            """,
            (GLOBAL, held_by, limit),
        )
        return [int(r["id"]) for r in cur.fetchall()]


# -- changing (each in one ops-DB transaction) ----------------------------------------------------

def _lock(cur: psycopg.Cursor[DictRow], name: str) -> Breaker:
    cur.execute("INSERT INTO breakers (name) VALUES (%s) ON CONFLICT (name) DO NOTHING", (name,))
    cur.execute("SELECT * FROM breakers WHERE name = %s FOR UPDATE", (name,))
    row = cur.fetchone()
    assert row is not None
    return Breaker.from_row(row)


def _change(
    cur: psycopg.Cursor[DictRow], name: str, state: str, *, actor: str, reason: str,
    data: dict[str, Any] | None = None, **columns: Any,
) -> tuple[Breaker, int]:
    """Append the event and update the row (plus `columns`); returns the breaker after and the event id."""
    cur.execute(
        "INSERT INTO breaker_events (breaker, state, actor, reason, data) VALUES (%s, %s, %s, %s, %s) RETURNING id",
        (name, state, actor, reason, jsonb(data or {})),
    )
    row = cur.fetchone()
    assert row is not None
    event_id = int(row["id"])
    sets = ["state = %(state)s", "version = version + 1", "reason = %(reason)s", "changed_at = now()",
            "changed_by = %(actor)s"]
    params: dict[str, Any] = {"state": state, "reason": reason, "actor": actor, "name": name}
    for column, value in columns.items():
        if column == "trip_event_id" and value == "event":
            value = event_id
        if column == "half_open_after" and isinstance(value, timedelta):
            sets.append(f"{column} = now() + %({column})s")
        elif column == "window_since" and value == "now":
            sets.append(f"{column} = now()")
            continue
        else:
            sets.append(f"{column} = %({column})s")
        params[column] = value
    cur.execute(f"UPDATE breakers SET {', '.join(sets)} WHERE name = %(name)s RETURNING *".encode(), params)
    updated = cur.fetchone()
    assert updated is not None
    return Breaker.from_row(updated), event_id


def _page_trip(cur: psycopg.Cursor[DictRow], breaker: Breaker, event_id: int, data: dict[str, Any]) -> Page | None:
    what = "all automation stopped" if breaker.name == GLOBAL else f"automation of {breaker.name} stopped"
    return enqueue_page(
        cur.connection,
        incident_id=None,
        dedup_key=breaker_page_key(breaker.name, event_id),
        summary=f"[fleetmedic] breaker {breaker.name} open ({what}): {' '.join(breaker.reason.split())}",
        details={
            **data,
            "breaker": breaker.name,
            "reason": breaker.reason,
            "tripped_by": breaker.changed_by,
            "trip_event_id": event_id,
            "half_open_after": breaker.half_open_after,
            "what_to_do": f"check what tripped it; then `fleetmedic breakers reset {breaker.name} --reason ...` "
                          "releases the incidents it holds",
        },
        severity="critical",
        action="trigger",
    )


def _resolve_trip_page(cur: psycopg.Cursor[DictRow], before: Breaker, actor: str, reason: str) -> None:
    if before.trip_event_id is None:
        return
    enqueue_page(
        cur.connection, incident_id=None, dedup_key=breaker_page_key(before.name, before.trip_event_id),
        summary=f"[fleetmedic] breaker {before.name} closed: {' '.join(reason.split())}",
        details={"breaker": before.name, "by": actor, "reason": reason}, severity="critical", action="resolve",
    )


def release_held(
    conn: psycopg.Connection[Any], held_by: str, *, actor: str, reason: str, limit: int | None = None
) -> list[int]:
    """Move the incidents `held_by` holds back to open (in the caller's transaction); their ids."""
    store = IncidentStore("")  # every call below runs on `conn`
    released = []
    for incident_id in held_incidents(conn, held_by, limit=limit):
        store.transition(incident_id, "open", actor=actor, reason=reason, expected_state="held", conn=conn,
                         data={"released_from": held_by})
        released.append(incident_id)
    return released


def trip(
    dsn: str | psycopg.Connection[Any], name: str, *, actor: str, reason: str,
    data: dict[str, Any] | None = None, cooldown: timedelta | None = None,
) -> BreakerChange:
    """Open the breaker and page once for this trip; a breaker already open is left as it is (no page).

    `cooldown` set: after it the breaker goes half-open by itself (automatic trips); None: it stays
    open until a human resets it (the global breaker, human trips).
    """
    if not reason.strip():
        raise ValueError("a breaker trip needs a reason saying what tripped it")
    with connection(dsn) as conn, conn.transaction(), dict_cursor(conn) as cur:
        before = _lock(cur, name)
        if before.state == "open":
            return BreakerChange(before, False, f"breaker {name} is already open since {before.changed_at:%H:%M:%S}: "
                                                f"{before.reason}")
        after, event_id = _change(
            cur, name, "open", actor=actor, reason=reason, data={**(data or {}), "from": before.state},
            trip_event_id="event", half_open_after=cooldown, cooldown=cooldown, probe_incident_id=None,
        )
        page = _page_trip(cur, after, event_id, data or {})
    return BreakerChange(after, True, f"breaker {name} tripped: {reason}", event_id, page)


def reset(
    dsn: str, name: str, *, actor: str, reason: str, redis_url: str | None = None,
) -> BreakerChange:
    """Close the breaker (a human override), restart its action window, and release what it holds.

    Idempotent: a closed breaker stays closed, and any incident still held by it is released anyway.
    """
    if not reason.strip():
        raise ValueError("resetting a breaker needs a reason (what was checked)")
    with connection(dsn) as conn, conn.transaction(), dict_cursor(conn) as cur:
        before = _lock(cur, name)
        change = _close(cur, before, actor=actor, reason=f"reset: {reason}")
        release_reason = f"released: breaker {name} reset by {actor}: {reason}"
        change.released = release_held(conn, name, actor=actor, reason=release_reason)
    if redis_url and name != GLOBAL:
        try:
            clear_window(redis_client(redis_url), name)
        except RedisUnavailable:
            pass  # stale window entries are older than window_since, which the next reservation drops
    return change


def _close(cur: psycopg.Cursor[DictRow], before: Breaker, *, actor: str, reason: str) -> BreakerChange:
    if before.closed:
        return BreakerChange(before, False, f"breaker {before.name} is already closed")
    after, event_id = _change(cur, before.name, "closed", actor=actor, reason=reason, data={"from": before.state},
                              half_open_after=None, probe_incident_id=None, window_since="now")
    _resolve_trip_page(cur, before, actor, reason)
    return BreakerChange(after, True, f"breaker {before.name} closed: {reason}", event_id)


def admit_probe(dsn: str, name: str, incident_id: int, *, actor: str) -> tuple[bool, Breaker]:
    """Half-open: let exactly one incident through as the probe, whatever the concurrency.

    The row lock serialises concurrent callers; the first one becomes the probe, later ones (other
    incidents) are refused until the probe's outcome closes or re-opens the breaker. The probe
    incident asking again (a retried task, a new run of it) is admitted again.
    """
    with connection(dsn) as conn, conn.transaction(), dict_cursor(conn) as cur:
        before = _lock(cur, name)
        if before.state != "half_open":
            return False, before
        if before.probe_incident_id == incident_id:
            return True, before
        if before.probe_incident_id is not None:
            return False, before
        after, _ = _change(cur, name, "half_open", actor=actor,
                           reason=f"half-open: letting incident {incident_id} through as the one probe run",
                           data={"probe_incident_id": incident_id}, probe_incident_id=incident_id)
        return True, after


def refresh(
    dsn: str, *, actor: str = SYSTEM_ACTOR, names: Sequence[str] | None = None, now: datetime | None = None,
) -> list[BreakerChange]:
    """Apply the breakers' own clock and probes: open -> half_open after the cooldown (releasing one
    held incident to be the probe), half_open -> closed when the probe incident resolved (releasing
    all it held), half_open -> open again when the probe escalated. Returns what changed."""
    changes: list[BreakerChange] = []
    with connection(dsn) as conn:
        with dict_cursor(conn) as cur:
            cur.execute("SELECT name FROM breakers WHERE state <> 'closed' AND (%s::text[] IS NULL OR name = ANY(%s))",
                        (list(names) if names is not None else None, list(names) if names is not None else None))
            candidates = [r["name"] for r in cur.fetchall()]
        conn.commit()
        for name in candidates:
            with conn.transaction(), dict_cursor(conn) as cur:
                change = _refresh_one(conn, cur, _lock(cur, name), actor=actor, now=now)
            if change is not None:
                changes.append(change)
    return changes


def _refresh_one(
    conn: psycopg.Connection[Any], cur: psycopg.Cursor[DictRow], b: Breaker, *, actor: str, now: datetime | None,
) -> BreakerChange | None:
    if b.state == "open" and b.half_open_after is not None:
        cur.execute("SELECT COALESCE(%s, now()) >= %s AS due", (now, b.half_open_after))
        row = cur.fetchone()
        if not (row and row["due"]):
            return None
        after, event_id = _change(cur, b.name, "half_open", actor=actor,
                                  reason=f"cooldown of {b.cooldown} over: half-open, one run may test the water",
                                  data={"trip_event_id": b.trip_event_id}, probe_incident_id=None)
        change = BreakerChange(after, True, f"breaker {b.name} half-open", event_id)
        change.released = release_held(
            conn, b.name, actor=actor, limit=1,
            reason=f"released as the probe: breaker {b.name} is half-open and lets one run test the water",
        )
        return change
    if b.state == "half_open" and b.probe_incident_id is not None:
        cur.execute("SELECT state, reason FROM incidents WHERE id = %s", (b.probe_incident_id,))
        probe = cur.fetchone()
        state = probe["state"] if probe else "resolved"
        if state == "resolved":
            change = _close(cur, b, actor=actor,
                            reason=f"half-open probe incident {b.probe_incident_id} resolved: closing")
            change.released = release_held(
                conn, b.name, actor=actor,
                reason=f"released: breaker {b.name} closed after its probe incident {b.probe_incident_id} resolved",
            )
            return change
        if state in ("escalated", "ignored"):
            reason = (f"half-open probe incident {b.probe_incident_id} ended {state} "
                      f"({probe['reason'] if probe else ''}): open again")
            after, event_id = _change(cur, b.name, "open", actor=actor, reason=reason,
                                      data={"from": "half_open", "probe_incident_id": b.probe_incident_id},
                                      trip_event_id="event", half_open_after=b.cooldown, probe_incident_id=None)
            page = _page_trip(cur, after, event_id, {"probe_incident_id": b.probe_incident_id})
            return BreakerChange(after, True, f"breaker {b.name} re-opened: {reason}", event_id, page)
        if state == "held":
            # The probe never got to act (held by something else): let another run be the probe.
            after, event_id = _change(cur, b.name, "half_open", actor=actor,
                                      reason=f"probe incident {b.probe_incident_id} was held before acting; "
                                             "the next run may be the probe",
                                      data={"probe_incident_id": b.probe_incident_id}, probe_incident_id=None)
            return BreakerChange(after, True, f"breaker {b.name} waits for a new probe", event_id)
    return None


# -- the sliding window of admitted runs (Redis) --------------------------------------------------

# KEYS[1] the window; ARGV: now_ms, window_ms, since_ms, limit, member, ttl_ms, then seed members and
# scores (used only when the window does not exist: Redis lost it, so it is rebuilt from the ops DB).
_RESERVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  for i = 7, #ARGV, 2 do redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i]) end
end
local floor = math.max(tonumber(ARGV[1]) - tonumber(ARGV[2]), tonumber(ARGV[3]))
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. floor)
if redis.call('ZSCORE', KEYS[1], ARGV[5]) then
  return {1, redis.call('ZCARD', KEYS[1])}
end
local n = redis.call('ZCARD', KEYS[1])
if tonumber(ARGV[4]) >= 0 and n >= tonumber(ARGV[4]) then
  return {0, n}
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return {1, n + 1}
"""


@dataclass(frozen=True)
class WindowResult:
    """A reservation in a playbook's action window: admitted or not, and how many it holds now."""

    admitted: bool
    count: int
    limit: int


def _window_key(name: str) -> str:
    return f"fleetmedic:breaker:{name}:window"


def window_member(incident_id: int, run_id: str) -> str:
    return f"incident:{incident_id}:run:{run_id}"


def _seed(dsn: str, name: str, since: datetime | None, window: timedelta) -> list[tuple[str, int]]:
    """The gate's 'proceed' decisions of this playbook inside the window, from the ops DB."""
    incident_type = name.removeprefix("playbook:")
    with connection(dsn) as conn, dict_cursor(conn) as cur:
        cur.execute(
            """
            SELECT e.incident_id, e.data->>'run_id' AS run_id, (extract(epoch FROM e.at) * 1000)::bigint AS ms
            FROM incident_events e JOIN incidents i ON i.id = e.incident_id
            WHERE e.step = 'gate' AND e.data->>'gate' = 'proceed' AND i.type = %s
              AND e.at > greatest(now() - %s, COALESCE(%s, '-infinity'::timestamptz))
              AND NOT COALESCE((e.data->>'dry_run')::boolean, false)
            """,
            (incident_type, window, since),
        )
        return [(window_member(r["incident_id"], r["run_id"] or ""), int(r["ms"])) for r in cur.fetchall()]


def _since_ms(since: datetime | None) -> int:
    return int(since.timestamp() * 1000) if since is not None else 0


def reserve_action(
    client: redis.Redis, dsn: str, name: str, member: str, *, limit: int, since: datetime | None = None,
    window: timedelta = timedelta(hours=1),
) -> WindowResult:
    """Atomically add `member` to the breaker's window unless it already holds `limit` entries.

    Idempotent per member (a retried gate does not count twice). `since` (the breaker's last reset)
    drops older entries. `limit` < 0 always admits (accounting only). Raises `RedisUnavailable`.
    """
    try:
        key = _window_key(name)
        seeds: list[tuple[str, int]] = []
        if not client.exists(key):
            seeds = _seed(dsn, name, since, window)
        now_ms = int(time.time() * 1000)
        window_ms = int(window.total_seconds() * 1000)
        args: list[Any] = [now_ms, window_ms, _since_ms(since), limit, member, window_ms + 60_000]
        for seed_member, score in seeds:
            args += [seed_member, score]
        admitted, count = client.eval(_RESERVE, 1, key, *args)  # type: ignore[misc]
    except redis.RedisError as exc:
        raise RedisUnavailable(f"Redis did not answer ({type(exc).__name__}: {exc})") from exc
    return WindowResult(bool(admitted), int(count), limit)


def window_count(
    client: redis.Redis, name: str, *, since: datetime | None = None, window: timedelta = timedelta(hours=1),
) -> int:
    """How many runs the window holds now (read-only). Raises `RedisUnavailable`."""
    floor = max(int(time.time() * 1000) - int(window.total_seconds() * 1000), _since_ms(since))
    try:
        return int(client.zcount(_window_key(name), floor, "+inf"))
    except redis.RedisError as exc:
        raise RedisUnavailable(f"Redis did not answer ({type(exc).__name__}: {exc})") from exc


def clear_window(client: redis.Redis, name: str) -> int:
    """Forget the breaker's window (on reset); returns how many entries it held."""
    try:
        key = _window_key(name)
        count = int(client.zcard(key))
        client.delete(key)
        return count
    except redis.RedisError as exc:
        raise RedisUnavailable(f"Redis did not answer ({type(exc).__name__}: {exc})") from exc
