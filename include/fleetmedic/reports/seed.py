"""A synthetic but self-consistent incident history (incidents, audit events, pages, breaker trips) for reports.

Used by the report tests and the benchmark, and handy for looking at reports on an empty demo.
Everything is generated inside PostgreSQL (`generate_series`), so millions of rows take seconds to
minutes, not hours. Each incident follows one of the scripts below through the real state machine
(every event is a legal transition), its row agrees with its last event, and only the newest
incident of a (resource, type) may still be active, as the `incidents_one_active` index requires.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fleetmedic.db.connect import connect

__all__ = ["OUTCOMES", "SCRIPTS", "SeedSummary", "TYPES", "seed_history"]

# Incident types and their weights in the generated history.
TYPES: dict[str, int] = {
    "resource_down": 5,
    "follower_behind": 4,
    "blocking_queries": 4,
    "old_base_backup": 2,
    "kernel_panic": 1,
    "server_down": 1,
    "redis_replication": 1,
}

# Outcome -> cumulative probability upper bound.
OUTCOMES: dict[str, float] = {
    "auto": 0.55,             # automation fixed it
    "transient": 0.65,        # healthy again at re-confirm
    "escalated_human": 0.77,  # automation gave up, a human fixed it
    "escalated_open": 0.80,   # paged and still open (only the newest of its resource/type)
    "held_resolved": 0.86,    # a breaker held it, a human released it, automation fixed it
    "ignored": 0.88,          # paged, then a human ignored it
    "shadow": 0.94,           # a shadow-mode playbook recorded what it would do, a human fixed it
    "active_open": 1.00,      # just detected (only the newest of its resource/type)
}

# One row per event: (outcome, seq, from_state, to_state, step, actor (T = type), base offset s,
# x duration, x human delay, reason, data as SQL). Offsets are seconds after opened_at.
SCRIPTS: list[tuple[str, int, str | None, str, str | None, str, int, int, int, str, str]] = []


def _script(outcome: str, *events: tuple[str | None, str, str | None, str, int, int, int, str, str]) -> None:
    for seq, (frm, to, step, actor, base, dur, human, reason, data) in enumerate(events, start=1):
        SCRIPTS.append((outcome, seq, frm, to, step, actor, base, dur, human, reason, data))


_OPEN = (None, "open", None, "detection:T.check", 0, 0, 0, "2 failures over 10s: connection refused", "{}")
_CLAIM = ("open", "remediating", None, "automation:playbook_T/claim", 10, 0, 0,
          "claimed by run incident-N", "{}")
_STEP = ("remediating", "remediating", "restart", "automation:playbook_T/step_restart", 15, 0, 0,
         "entering step restart", "{}")
_script("auto", _OPEN, _CLAIM, _STEP,
        ("remediating", "resolved", "restart", "automation:playbook_T/resolve", 20, 1, 0,
         "health is back after restart", "{}"))
_script("transient", _OPEN, _CLAIM,
        ("remediating", "resolved", None, "automation:playbook_T/reconfirm", 15, 0, 0,
         "healthy again at re-confirm: transient", "{}"))
_script("escalated_human", _OPEN, _CLAIM, _STEP,
        ("remediating", "escalated", "restart", "automation:playbook_T/escalate", 20, 1, 0,
         "restart failed: still refusing connections", "{}"),
        ("escalated", "resolved", "restart", "human:alice", 20, 1, 1, "fixed the config by hand", "{}"))
_script("escalated_open", _OPEN, _CLAIM, _STEP,
        ("remediating", "escalated", "restart", "automation:playbook_T/escalate", 20, 1, 0,
         "restart failed: still refusing connections", "{}"))
_script("held_resolved", _OPEN,
        ("open", "held", None, "automation:playbook_T/claim", 5, 0, 0,
         "breaker playbook:T is open: 21 actions in the last hour", "{}"),
        ("held", "open", None, "human:bob", 5, 0, 1, "breaker reset after checking monitoring", "{}"),
        ("open", "remediating", None, "automation:playbook_T/claim", 15, 0, 1, "claimed by run incident-N", "{}"),
        ("remediating", "resolved", None, "automation:playbook_T/resolve", 20, 1, 1,
         "health is back after restart", "{}"))
_script("ignored", _OPEN, _CLAIM,
        ("remediating", "escalated", None, "automation:playbook_T/escalate", 20, 1, 0,
         "step timed out", "{}"),
        ("escalated", "ignored", None, "human:carol", 20, 1, 1, "known issue, vendor ticket open", "{}"))
_script("shadow", _OPEN, _CLAIM,
        ("remediating", "remediating", "gate", "automation:playbook_T/gate", 15, 0, 0,
         "shadow mode: would act (terminate (postgres.terminate_blockers) -> resolve)",
         "jsonb_build_object('shadow', true, 'would', 'act', 'would_resolve', p.would_resolve)"),
        ("remediating", "escalated", "gate", "automation:playbook_T/escalate", 20, 0, 0,
         "shadow mode: escalating as if no automation existed", "jsonb_build_object('shadow', true)"),
        ("escalated", "resolved", "gate", "human:dave", 20, 0, 1, "terminated the blocker by hand", "{}"))
_script("active_open", _OPEN)

# Outcomes that page, and the seq of their escalation event.
_ESCALATION_SEQ = {"escalated_human": 4, "escalated_open": 4, "ignored": 3, "shadow": 4}
# Outcomes that end with a human's resolve/ignore after a page (a resolve page follows).
_PAGE_RESOLVED = {"escalated_human", "ignored", "shadow"}


@dataclass(frozen=True)
class SeedSummary:
    incidents: int
    events: int
    pages: int
    breaker_events: int
    resources: int
    start: datetime
    end: datetime
    seconds: float


def _scripts_values() -> tuple[str, list[Any]]:
    rows, params = [], []
    for outcome, seq, frm, to, step, actor, base, dur, human, reason, data in SCRIPTS:
        data_sql = f"'{data}'::jsonb" if data.startswith("{") else data
        # data expressions refer to the plan row `p`; they are code from this module, never input.
        rows.append(f"(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, $${data_sql}$$)")
        params += [outcome, seq, frm, to, step, actor, base, dur, human, reason]
    return ", ".join(rows), params


def seed_history(
    dsn: str,
    *,
    incidents: int = 10_000,
    days: int = 30,
    end: datetime | None = None,
    resources: int | None = None,
    seed: float = 0.42,
    breaker_trips_per_day: int = 2,
    progress: Callable[[str], None] | None = None,
) -> SeedSummary:
    """Add `incidents` incidents opened over the `days` before `end` (default now), with their history.

    Adds its own servers and resources (`seed-srv-N`, `seed-pg-N`; default one per 50 incidents,
    at least 20). Deterministic for a given `seed`, `end` and row counts.
    """
    say = progress or (lambda _m: None)
    end = (end or datetime.now(UTC)).astimezone(UTC)
    start = end - timedelta(days=days)
    nres = resources or max(20, min(40_000, incidents // 50))
    t0 = time.monotonic()
    script_rows, script_params = _scripts_values()
    types = [t for t, w in TYPES.items() for _ in range(w)]
    thresholds = list(OUTCOMES.items())
    outcome_case = " ".join(f"WHEN r < {bound} THEN '{name}'" for name, bound in thresholds[:-1])
    with connect(dsn, application_name="fleetmedic-seed") as conn:
        conn.execute("SET LOCAL work_mem = '256MB'")
        conn.execute("SELECT setseed(%s)", (seed,))
        conn.execute(
            "INSERT INTO servers (name, attrs) SELECT format('seed-srv-%%s', g), '{\"seed\": true}' "
            "FROM generate_series(1, %s) g ON CONFLICT (name) DO NOTHING", (nres,))
        conn.execute(
            """
            INSERT INTO resources (name, kind, role, server_id, host, port, attrs)
            SELECT format('seed-pg-%%s', g), 'postgres', 'primary', s.id, '127.0.0.1', 20000 + g,
                   '{"seed": true}'
            FROM generate_series(1, %s) g JOIN servers s ON s.name = format('seed-srv-%%s', g)
            ON CONFLICT (name) DO NOTHING
            """, (nres,))
        say(f"seed: {nres} resources; planning {incidents:,} incidents over {days} days")
        conn.execute(
            f"""
            CREATE TEMP TABLE seed_plan ON COMMIT DROP AS
            WITH res AS (
                SELECT array_agg(id ORDER BY id) AS ids FROM resources
                WHERE name LIKE 'seed-pg-%%' AND port BETWEEN 20001 AND 20000 + %(nres)s
            ), raw AS (
                SELECT g,
                       (%(types)s::text[])[1 + floor(random() * %(ntypes)s)::int] AS type,
                       res.ids[1 + floor(random() * %(nres)s)::int] AS resource_id,
                       %(end)s::timestamptz - random() * %(days)s * interval '1 day' AS opened_at,
                       random() AS r,
                       (20 + 1800 * power(random(), 2))::int AS dur,
                       (600 + 7200 * random())::int AS human,
                       random() < 0.7 AS would_resolve,
                       random() AS page_r
                FROM generate_series(1, %(n)s) g, res
            ), typed AS (
                SELECT raw.*, CASE {outcome_case} ELSE 'active_open' END AS wanted,
                       row_number() OVER (PARTITION BY resource_id, type ORDER BY opened_at DESC, g) AS newest
                FROM raw
            )
            SELECT nextval('incidents_id_seq') AS id, type, resource_id, opened_at, dur, human, would_resolve,
                   page_r,
                   CASE WHEN wanted IN ('escalated_open', 'active_open') AND newest > 1 THEN 'auto'
                        ELSE wanted END AS outcome
            FROM (SELECT * FROM typed ORDER BY opened_at) ordered
            """,
            {"nres": nres, "types": types, "ntypes": len(types), "end": end, "days": days, "n": incidents},
        )
        conn.execute(
            "CREATE TEMP TABLE seed_script (outcome text, seq int, from_state text, to_state text, step text, "
            "actor text, base int, dur int, human int, reason text, data_sql text) ON COMMIT DROP"
        )
        conn.execute(f"INSERT INTO seed_script VALUES {script_rows}", script_params)
        # The data column of a script row is an SQL expression over the plan row: inline them as a CASE.
        cur = conn.execute("SELECT DISTINCT data_sql FROM seed_script")
        data_exprs = [r["data_sql"] for r in cur.fetchall()]
        data_case = "CASE s.data_sql " + " ".join(
            f"WHEN $${e}$$ THEN {e}" for e in data_exprs) + " END"
        conn.execute(
            f"""
            CREATE TEMP TABLE seed_events ON COMMIT DROP AS
            SELECT p.id AS incident_id,
                   p.opened_at + make_interval(secs => s.base * s.seq + s.dur * p.dur + s.human * p.human) AS at,
                   s.seq, s.from_state, s.to_state, s.step,
                   replace(replace(s.actor, 'T.check', CASE WHEN p.type LIKE 'redis%%' THEN 'redis.ping'
                       ELSE 'postgres.connect' END), '_T/', '_' || p.type || '/') AS actor,
                   replace(replace(s.reason, 'playbook:T', 'playbook:' || p.type), 'incident-N',
                           'incident-' || p.id) AS reason,
                   {data_case} AS data,
                   s.seq = max(s.seq) OVER (PARTITION BY p.id) AS last,
                   min(p.opened_at + make_interval(secs => s.base * s.seq + s.dur * p.dur + s.human * p.human))
                       FILTER (WHERE s.to_state = 'escalated') OVER (PARTITION BY p.id) AS escalated_at
            FROM seed_plan p JOIN seed_script s ON s.outcome = p.outcome
            """
        )
        say("seed: inserting incidents")
        conn.execute(
            """
            INSERT INTO incidents (id, resource_id, type, state, version, step, owner_run_id, severity, reason,
                                   opened_at, last_seen_at, detections, escalated_at, resolved_at, ignored_until,
                                   data)
            SELECT p.id, p.resource_id, p.type, e.to_state, e.seq, e.step,
                   CASE WHEN e.seq > 1 THEN 'incident-' || p.id END,
                   CASE WHEN p.type IN ('old_base_backup') THEN 'warning' ELSE 'critical' END,
                   e.reason, p.opened_at, e.at, 2,
                   e.escalated_at,
                   CASE WHEN e.to_state = 'resolved' THEN e.at END,
                   CASE WHEN e.to_state = 'ignored' THEN e.at + interval '7 days' END,
                   '{"seed": true}'
            FROM seed_plan p JOIN seed_events e ON e.incident_id = p.id AND e.last
            ORDER BY p.id
            """
        )
        say("seed: inserting audit events")
        cur = conn.execute(
            """
            INSERT INTO incident_events (incident_id, at, from_state, to_state, version, step, actor, reason, data)
            SELECT incident_id, at, from_state, to_state, seq, step, actor, reason, data
            FROM seed_events ORDER BY at, incident_id, seq
            """
        )
        n_events = cur.rowcount
        say("seed: inserting pages and breaker trips")
        esc_case = " ".join(f"WHEN '{o}' THEN {s}" for o, s in _ESCALATION_SEQ.items())
        cur = conn.execute(
            f"""
            INSERT INTO pages (incident_id, dedup_key, action, severity, summary, details, status, backend,
                               attempts, created_at, next_attempt_at, delivered_at)
            SELECT p.id, 'fleetmedic-incident-' || p.id, a.action, 'critical',
                   '[fleetmedic] ' || p.type || ' on seed resource ' || p.resource_id, '{{"seed": true}}',
                   CASE WHEN p.page_r < 0.03 THEN 'pending' WHEN p.page_r < 0.04 THEN 'failed' ELSE 'delivered' END,
                   'log', 1, e.at, e.at, CASE WHEN p.page_r >= 0.04 THEN e.at + interval '2 seconds' END
            FROM seed_plan p
            JOIN seed_events e ON e.incident_id = p.id
            JOIN LATERAL (VALUES ('trigger', CASE p.outcome {esc_case} END),
                                 ('resolve', CASE WHEN p.outcome = ANY(%(resolved)s) THEN
                                                  (CASE p.outcome {esc_case} END) + 1 END)) a(action, seq)
              ON a.seq = e.seq
            """,
            {"resolved": sorted(_PAGE_RESOLVED)},
        )
        n_pages = cur.rowcount
        cur = conn.execute(
            """
            INSERT INTO breaker_events (breaker, state, at, actor, reason, data)
            SELECT 'playbook:' || t.type, x.state, t.at + x.after, x.actor, x.reason, '{"seed": true}'
            FROM (
                SELECT (%(types)s::text[])[1 + floor(random() * %(ntypes)s)::int] AS type,
                       %(end)s::timestamptz - random() * %(days)s * interval '1 day' AS at
                FROM generate_series(1, %(trips)s)
            ) t
            CROSS JOIN (VALUES
                ('open', interval '0', 'automation:breaker/gate', 'more than 20 actions in the last hour'),
                ('half_open', interval '10 minutes', 'automation:breaker/gate', 'cooldown over: letting one run through'),
                ('closed', interval '12 minutes', 'automation:breaker/gate', 'test run succeeded')
            ) x(state, after, actor, reason)
            WHERE t.at + x.after < %(end)s
            """,
            {"types": types, "ntypes": len(types), "end": end, "days": days,
             "trips": max(0, breaker_trips_per_day * days)},
        )
        n_breaker = cur.rowcount
        conn.commit()
    with connect(dsn, autocommit=True) as conn:
        conn.execute("ANALYZE incidents")
        conn.execute("ANALYZE incident_events")
        conn.execute("ANALYZE pages")
    took = time.monotonic() - t0
    say(f"seed: {incidents:,} incidents, {n_events:,} events, {n_pages:,} pages, {n_breaker} breaker events "
        f"in {took:.1f}s")
    return SeedSummary(incidents, n_events, n_pages, n_breaker, nres, start, end, took)
