"""Correlate findings with their servers: when a server is down, its databases' failures wait for it.

A stopped or panicked server takes every database on it down, so their `postgres.connect` and
`redis.ping` failures are symptoms. Acting on them (restarting a database on a server that is being
rebooted) races with the server's playbook. `correlate` defers such findings with a reason:

1. a database finding whose server has a server-level finding in the same sweep, an active
   server-level incident, or a failing `instance.*` check;
2. a database finding whose evidence (the probe that failed) is not newer than the resolution of
   its server's latest server-level incident: it was gathered while the server was down, and the
   next probe after the fix decides;
3. the same two rules for a follower whose *primary's* server is down (a follower falls behind
   when its primary's server stops);
4. a `server_down` finding on a server whose kernel panicked (a `kernel_panic` finding, incident or
   failing `instance.console`): the panic is the more specific diagnosis, and its playbook reboots.

A deferred finding opens no incident; the check keeps failing and its finding comes back in later
sweeps, so nothing is lost if the server's playbook does not fix the database.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

__all__ = [
    "Deferred",
    "ServerFacts",
    "aload_server_facts",
    "correlate",
    "defer_findings_explained_by_servers",
    "load_server_facts",
]

log = logging.getLogger(__name__)

ACTIVE_STATES = ("open", "remediating", "await_resolution", "held", "escalated")
# A more specific server-level diagnosis explains a less specific one on the same server.
_EXPLAINS = {"server_down": ("kernel_panic", "instance.console")}

F = TypeVar("F")


def _field(finding: Any, name: str) -> Any:
    return finding[name] if isinstance(finding, Mapping) else getattr(finding, name)


@dataclass(frozen=True)
class ServerIncident:
    id: int
    type: str
    state: str
    resolved_at: datetime | None = None


@dataclass
class ServerFacts:
    """What correlation needs to know about the findings' resources and their servers.

    Servers are keyed by the id of their `kind = 'server'` row in `resources`.
    """

    kinds: dict[int, str] = field(default_factory=dict)  # resource id -> kind
    resource_names: dict[int, str] = field(default_factory=dict)  # resource id -> name
    server_of: dict[int, int] = field(default_factory=dict)  # resource id -> its server's row id
    primary_server_of: dict[int, int] = field(default_factory=dict)  # follower id -> its primary's server row id
    names: dict[int, str] = field(default_factory=dict)  # server row id -> server name
    failing_checks: dict[int, dict[str, str]] = field(default_factory=dict)  # server row id -> {check: reason}
    active: dict[int, list[ServerIncident]] = field(default_factory=dict)  # server row id -> active incidents
    last_resolved: dict[int, ServerIncident] = field(default_factory=dict)  # server row id -> latest resolved
    evidence_at: dict[tuple[int, str], datetime] = field(default_factory=dict)  # (resource, check) -> checked_at


@dataclass(frozen=True)
class Deferred:
    finding: Any
    reason: str


def _server_busy(facts: ServerFacts, sid: int, batch_types: Mapping[int, set[str]]) -> str | None:
    """Why server row `sid` is being handled (a finding, an active incident, a failing check), or None."""
    name = facts.names.get(sid, f"#{sid}")
    if batch_types.get(sid):
        return f"its server {name} has a {', '.join(sorted(batch_types[sid]))} finding in this sweep"
    if facts.active.get(sid):
        inc = facts.active[sid][0]
        return f"{inc.type} incident {inc.id} on its server {name} is {inc.state}"
    failing = facts.failing_checks.get(sid)
    if failing:
        check, why = sorted(failing.items())[0]
        return f"its server {name} fails {check} ({why})"
    return None


def _evidence_predates_fix(facts: ServerFacts, sid: int, finding: Any) -> str | None:
    resolved = facts.last_resolved.get(sid)
    if resolved is None or resolved.resolved_at is None:
        return None
    at = facts.evidence_at.get((int(_field(finding, "resource_id")), str(_field(finding, "check"))))
    if at is None or at > resolved.resolved_at:
        return None
    return (f"its evidence ({_field(finding, 'check')} at {at:%H:%M:%S}) predates the fix of its server "
            f"{facts.names.get(sid, f'#{sid}')} ({resolved.type} incident {resolved.id} resolved at "
            f"{resolved.resolved_at:%H:%M:%S}); the next probe decides")


def correlate(findings: Sequence[F], facts: ServerFacts) -> tuple[list[F], list[Deferred]]:
    """Split findings into those to act on and those deferred (with a reason each); order is kept.

    Findings are sweep `Finding`s or their dicts (resource_id, type, check, reason, severity).
    """
    batch_types: dict[int, set[str]] = {}
    for f in findings:
        rid = int(_field(f, "resource_id"))
        if facts.kinds.get(rid) == "server":
            batch_types.setdefault(rid, set()).add(str(_field(f, "type")))
    kept: list[F] = []
    deferred: list[Deferred] = []
    for f in findings:
        rid = int(_field(f, "resource_id"))
        typ = str(_field(f, "type"))
        if facts.kinds.get(rid) == "server":
            why = _more_specific(facts, rid, typ, batch_types)
        else:
            why = _database_waits_for_server(facts, rid, f, batch_types)
        if why:
            deferred.append(Deferred(f, f"deferred {typ} on {facts.resource_names.get(rid, rid)}: {why}"))
        else:
            kept.append(f)
    return kept, deferred


def _database_waits_for_server(facts: ServerFacts, rid: int, finding: Any,
                               batch_types: Mapping[int, set[str]]) -> str | None:
    """Rules 1-3: the database's own server, then (for a follower) its primary's server."""
    own = facts.server_of.get(rid)
    if own is not None:
        why = _server_busy(facts, own, batch_types) or _evidence_predates_fix(facts, own, finding)
        if why:
            return why
    primary_server = facts.primary_server_of.get(rid)
    if primary_server is not None and primary_server != own:
        why = _server_busy(facts, primary_server, batch_types) or _evidence_predates_fix(facts, primary_server,
                                                                                        finding)
        if why:
            return "(a follower) " + why.replace("its server", "its primary's server", 1)
    return None


def _more_specific(facts: ServerFacts, sid: int, typ: str, batch_types: Mapping[int, set[str]]) -> str | None:
    if typ not in _EXPLAINS:
        return None
    better, check = _EXPLAINS[typ]
    name = facts.names.get(sid, f"#{sid}")
    if better in batch_types.get(sid, set()):
        return f"{name} also has a {better} finding in this sweep, the more specific diagnosis"
    for inc in facts.active.get(sid, []):
        if inc.type == better:
            return f"{better} incident {inc.id} on {name} is {inc.state}, the more specific diagnosis"
    if check in facts.failing_checks.get(sid, {}):
        return f"{name} fails {check} ({facts.failing_checks[sid][check]}): {better} is the more specific diagnosis"
    return None


# -- loading the facts --------------------------------------------------------------------------

_RESOURCES_SQL = """
SELECT r.id, r.name, r.kind, sr.id, sr.name, psr.id, psr.name
FROM resources r
LEFT JOIN resources sr ON sr.server_id = r.server_id AND sr.kind = 'server'
LEFT JOIN resources p ON p.id = r.primary_id AND r.role = 'follower'
LEFT JOIN resources psr ON psr.server_id = p.server_id AND psr.kind = 'server'
WHERE r.id = ANY(%s)
"""
_FAILING_SQL = """
SELECT resource_id, check_name, reason FROM health
WHERE resource_id = ANY(%s) AND NOT healthy AND check_name LIKE 'instance.%%'
"""
# Every incident on a server's row is server-level; the latest resolved one bounds stale evidence.
_INCIDENTS_SQL = """
SELECT resource_id, id, type, state, resolved_at FROM incidents
WHERE resource_id = ANY(%s) AND state = ANY(%s)
UNION ALL
SELECT * FROM (
    SELECT DISTINCT ON (resource_id) resource_id, id, type, state, resolved_at FROM incidents
    WHERE resource_id = ANY(%s) AND state = 'resolved'
    ORDER BY resource_id, resolved_at DESC) latest
"""
_EVIDENCE_SQL = """
SELECT h.resource_id, h.check_name, h.checked_at FROM health h
JOIN unnest(%s::bigint[], %s::text[]) AS f(resource_id, check_name) USING (resource_id, check_name)
"""


def _keys(findings: Iterable[Any]) -> tuple[list[int], list[str]]:
    pairs = [(int(_field(f, "resource_id")), str(_field(f, "check"))) for f in findings]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _facts_from(resource_rows: Iterable[Sequence[Any]]) -> tuple[ServerFacts, list[int]]:
    facts = ServerFacts()
    for rid, name, kind, sid, sname, psid, psname in resource_rows:
        facts.kinds[rid] = kind
        facts.resource_names[rid] = name
        if sid is not None:
            facts.server_of[rid] = sid
            facts.names[sid] = sname
        if psid is not None:
            facts.primary_server_of[rid] = psid
            facts.names[psid] = psname
    return facts, sorted(facts.names)


def _add_rows(facts: ServerFacts, failing: Iterable[Sequence[Any]], incidents: Iterable[Sequence[Any]],
              evidence: Iterable[Sequence[Any]]) -> ServerFacts:
    for sid, check, reason in failing:
        facts.failing_checks.setdefault(sid, {})[check] = reason
    for sid, iid, typ, state, resolved_at in incidents:
        inc = ServerIncident(iid, typ, state, resolved_at)
        if state == "resolved":
            facts.last_resolved[sid] = inc
        else:
            facts.active.setdefault(sid, []).append(inc)
    for rid, check, at in evidence:
        facts.evidence_at[(rid, check)] = at
    return facts


def _incident_params(server_ids: list[int]) -> tuple[Any, ...]:
    return (server_ids, list(ACTIVE_STATES), server_ids)


def load_server_facts(conn: Any, findings: Sequence[Any]) -> ServerFacts:
    """The facts `correlate` needs for these findings, from the ops DB (a psycopg connection)."""
    if not findings:
        return ServerFacts()
    rids, checks = _keys(findings)
    facts, server_ids = _facts_from(conn.execute(_RESOURCES_SQL, (rids,)).fetchall())
    if not server_ids:
        return facts
    return _add_rows(
        facts,
        conn.execute(_FAILING_SQL, (server_ids,)).fetchall(),
        conn.execute(_INCIDENTS_SQL, _incident_params(server_ids)).fetchall(),
        conn.execute(_EVIDENCE_SQL, (rids, checks)).fetchall(),
    )


async def aload_server_facts(aconn: Any, findings: Sequence[Any]) -> ServerFacts:
    """`load_server_facts` on an async psycopg connection (for the sweep's probe rounds)."""
    if not findings:
        return ServerFacts()
    rids, checks = _keys(findings)
    async with aconn.cursor() as cur:
        await cur.execute(_RESOURCES_SQL, (rids,))
        facts, server_ids = _facts_from(await cur.fetchall())
        if server_ids:
            await cur.execute(_FAILING_SQL, (server_ids,))
            failing = await cur.fetchall()
            await cur.execute(_INCIDENTS_SQL, _incident_params(server_ids))
            incidents = await cur.fetchall()
            await cur.execute(_EVIDENCE_SQL, (rids, checks))
            facts = _add_rows(facts, failing, incidents, await cur.fetchall())
    return facts


def defer_findings_explained_by_servers(conn: Any, findings: Sequence[F]) -> tuple[list[F], list[Deferred]]:
    """Load the facts and correlate; logs one line per deferred finding. The sweep calls this before
    opening incidents (detection/incidents.py)."""
    if not findings:
        return [], []
    kept, deferred = correlate(findings, load_server_facts(conn, findings))
    for d in deferred:
        log.info("%s", d.reason)
    return kept, deferred
