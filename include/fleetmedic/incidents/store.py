"""The incident store: reads incidents, and changes them only through one compare-and-set transition."""

from __future__ import annotations

import builtins
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from enum import Enum
from typing import Any, Final, NamedTuple, TypeVar

import psycopg
from psycopg import pq, sql
from psycopg.rows import DictRow

from fleetmedic.db.connect import connection, dict_cursor, jsonb
from fleetmedic.incidents.lifecycle import (
    ACTIVE_STATES,
    FINAL_STATES,
    IncidentNotFound,
    StaleIncident,
    State,
    check_transition,
    parse_state,
)
from fleetmedic.pager.outbox import (
    SEVERITIES,
    Page,
    dedup_key_for_incident,
    enqueue_page,
    page_summary,
)

__all__ = [
    "UNSET",
    "Finding",
    "Incident",
    "IncidentEvent",
    "IncidentStore",
    "check_actor",
]


T = TypeVar("T")


class _Unset(Enum):
    UNSET = "unset"

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset.UNSET
"""Leave a column as it is (as opposed to None, which clears it)."""

ACTOR_FORMATS = "automation:<dag>/<task>, human:<name> or detection:<check>"
_ACTOR = re.compile(r"^(automation:[^/\s]+/\S+|human:\S.*|detection:\S+)$")

# Events listed in an escalation page under "automation_tried" (the latest ones).
PAGE_EVENT_LIMIT = 50

# The ON CONFLICT target must repeat the partial index's predicate; built from the same state list.
_ACTIVE_ORDERED = [s for s in State if s in ACTIVE_STATES]
_ACTIVE_LIST = sql.SQL(", ").join(sql.Literal(s.value) for s in _ACTIVE_ORDERED)


def check_actor(actor: str) -> None:
    """ValueError unless `actor` is one of the audit formats."""
    if not actor or not _ACTOR.match(actor):
        raise ValueError(f"actor {actor!r} is not valid: use {ACTOR_FORMATS}")


def _check_actor_reason(actor: str, reason: str) -> None:
    check_actor(actor)
    if not reason or not reason.strip():
        raise ValueError("every incident change needs a reason saying why (e.g. 'restart succeeded, health is back')")


@dataclass(frozen=True)
class Incident:
    """One row of `incidents`."""

    id: int
    resource_id: int
    type: str
    state: State
    version: int
    step: str | None
    owner_run_id: str | None
    severity: str
    reason: str
    opened_at: datetime
    last_seen_at: datetime
    detections: int
    escalated_at: datetime | None
    resolved_at: datetime | None
    ignored_until: datetime | None
    previous_incident_id: int | None
    data: dict[str, Any]

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Incident:
        values = {f.name: row[f.name] for f in fields(cls)}
        values["state"] = State(values["state"])
        return cls(**values)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class IncidentEvent:
    """One row of `incident_events`: a transition (or the opening) of an incident."""

    id: int
    incident_id: int
    at: datetime
    from_state: State | None
    to_state: State
    version: int
    step: str | None
    actor: str
    reason: str
    data: dict[str, Any]

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> IncidentEvent:
        values = {f.name: row[f.name] for f in fields(cls)}
        values["from_state"] = State(values["from_state"]) if values["from_state"] is not None else None
        values["to_state"] = State(values["to_state"])
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Finding(NamedTuple):
    """Something detection confirmed: an incident of `type` on `resource_id` should be open."""

    resource_id: int
    type: str
    reason: str
    severity: str = "critical"
    data: Mapping[str, Any] | None = None


def _as_finding(value: Finding | Sequence[Any]) -> Finding:
    finding = value if isinstance(value, Finding) else Finding(*value)
    if not isinstance(finding.resource_id, int) or isinstance(finding.resource_id, bool):
        raise ValueError(f"finding {tuple(finding)!r}: resource_id must be an int (a resources.id)")
    if not finding.type:
        raise ValueError(f"finding {tuple(finding)!r}: type must name the incident type (e.g. resource_down)")
    if not finding.reason or not finding.reason.strip():
        raise ValueError(f"finding {tuple(finding)!r}: needs a reason saying what detection saw")
    if finding.severity not in SEVERITIES:
        raise ValueError(
            f"finding {tuple(finding)!r}: severity {finding.severity!r} is not one of: {', '.join(SEVERITIES)}"
        )
    return finding


class IncidentStore:
    """Incidents in the ops database at `dsn`.

    Every method opens (and commits) its own connection, unless given `conn=`: then it runs as a
    savepoint inside the caller's transaction and the caller commits (an autocommit connection
    commits each call), so a caller can compose several changes atomically with its own writes.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    # -- reading ---------------------------------------------------------------------------------

    def get(self, incident_id: int, *, conn: psycopg.Connection[Any] | None = None) -> Incident:
        with self._transaction(conn) as cur:
            cur.execute("SELECT * FROM incidents WHERE id = %s", (incident_id,))
            row = cur.fetchone()
        if row is None:
            raise IncidentNotFound(incident_id)
        return Incident.from_row(row)

    def events(self, incident_id: int, *, conn: psycopg.Connection[Any] | None = None) -> builtins.list[IncidentEvent]:
        """The incident's audit trail, oldest first."""
        with self._transaction(conn) as cur:
            cur.execute("SELECT * FROM incident_events WHERE incident_id = %s ORDER BY id", (incident_id,))
            rows = cur.fetchall()
            if not rows:
                cur.execute("SELECT 1 FROM incidents WHERE id = %s", (incident_id,))
                if cur.fetchone() is None:
                    raise IncidentNotFound(incident_id)
        return [IncidentEvent.from_row(r) for r in rows]

    def list(
        self,
        state: str | State | Iterable[str | State] | None = None,
        type: str | None = None,
        since: datetime | None = None,
        resource_id: int | None = None,
        limit: int = 100,
        *,
        conn: psycopg.Connection[Any] | None = None,
    ) -> builtins.list[Incident]:
        """Incidents, newest first; `state` may be one state or several, `since` filters on opened_at."""
        where: builtins.list[sql.Composable] = []
        params: builtins.list[Any] = []
        if state is not None:
            states = [state] if isinstance(state, str) else builtins.list(state)
            where.append(sql.SQL("state = ANY(%s)"))
            params.append([parse_state(s).value for s in states])
        if type is not None:
            where.append(sql.SQL("type = %s"))
            params.append(type)
        if since is not None:
            where.append(sql.SQL("opened_at >= %s"))
            params.append(since)
        if resource_id is not None:
            where.append(sql.SQL("resource_id = %s"))
            params.append(resource_id)
        parts: builtins.list[sql.Composable] = [sql.SQL("SELECT * FROM incidents")]
        if where:
            parts += [sql.SQL(" WHERE "), sql.SQL(" AND ").join(where)]
        parts.append(sql.SQL(" ORDER BY id DESC LIMIT %s"))
        query = sql.Composed(parts)
        params.append(limit)
        with self._transaction(conn) as cur:
            cur.execute(query, params)
            return [Incident.from_row(r) for r in cur.fetchall()]

    # -- the one way to change an incident -------------------------------------------------------

    def transition(
        self,
        incident_id: int,
        to_state: str | State,
        *,
        actor: str,
        reason: str,
        expected_version: int | None = None,
        expected_state: str | State | None = None,
        expected_run_id: str | None = None,
        step: str | None | _Unset = UNSET,
        owner_run_id: str | None | _Unset = UNSET,
        data: Mapping[str, Any] | None = None,
        ignored_until: datetime | None = None,
        conn: psycopg.Connection[Any] | None = None,
    ) -> Incident:
        """Move the incident to `to_state` and record why, in one transaction.

        Locks the row, checks the caller's expectations (`StaleIncident` when the state, version or
        owning run is not what they expected), checks the state table (`IllegalTransition`), bumps
        the version, and appends the event. Entering `escalated` enqueues a page; entering `resolved`
        or `ignored` after a page enqueues its resolve. `step`/`owner_run_id` are kept unless given.
        """
        _check_actor_reason(actor, reason)
        target = parse_state(to_state)
        with self._transaction(conn) as cur:
            current = self._lock(cur, incident_id)
            _check_expected(current, expected_state, expected_version, expected_run_id)
            incident, _pages = self._apply(
                cur, current, target, actor=actor, reason=reason, step=step, owner_run_id=owner_run_id,
                data=data, ignored_until=ignored_until,
            )
            return incident

    def claim(
        self,
        incident_id: int,
        *,
        run_id: str,
        actor: str,
        reason: str,
        from_states: Iterable[str | State] = (State.OPEN,),
        step: str | None = None,
        conn: psycopg.Connection[Any] | None = None,
    ) -> Incident:
        """Make playbook run `run_id` the owner: `from_states` -> remediating.

        Idempotent for the same run (an Airflow retry of the claim task gets the incident back
        unchanged). Another run owning it, or the incident having moved on, raises `StaleIncident`;
        a state with no edge to remediating (e.g. resolved) raises `IllegalTransition`.
        """
        _check_actor_reason(actor, reason)
        if not run_id:
            raise ValueError("claim needs the run_id of the playbook run taking ownership")
        allowed = tuple(parse_state(s) for s in from_states)
        with self._transaction(conn) as cur:
            current = self._lock(cur, incident_id)
            if current.state is State.REMEDIATING and current.owner_run_id == run_id:
                return current
            if current.state not in allowed:
                check_transition(incident_id, current.state, State.REMEDIATING)
                raise StaleIncident(
                    incident_id, actual_state=current.state, actual_version=current.version,
                    actual_run_id=current.owner_run_id, expected_state=allowed,
                )
            incident, _ = self._apply(
                cur, current, State.REMEDIATING, actor=actor, reason=reason, step=step, owner_run_id=run_id,
                data={"run_id": run_id},
            )
            return incident

    def set_step(
        self,
        incident_id: int,
        *,
        run_id: str,
        step: str,
        actor: str,
        reason: str,
        data: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
        conn: psycopg.Connection[Any] | None = None,
    ) -> Incident:
        """Record that run `run_id` moves to `step` (remediating -> remediating), fenced by its claim.

        Call it before acting: it raises `StaleIncident` unless the incident is remediating, owned by
        `run_id` (and at `expected_version` when given), so a stale or duplicated task never acts.
        """
        _check_actor_reason(actor, reason)
        if not step:
            raise ValueError("set_step needs the name of the step the run is entering")
        with self._transaction(conn) as cur:
            current = self._lock(cur, incident_id)
            if (
                current.state is not State.REMEDIATING
                or current.owner_run_id != run_id
                or (expected_version is not None and current.version != expected_version)
            ):
                raise StaleIncident(
                    incident_id, actual_state=current.state, actual_version=current.version,
                    actual_run_id=current.owner_run_id, expected_state=State.REMEDIATING,
                    expected_version=expected_version, expected_run_id=run_id,
                )
            incident, _ = self._apply(
                cur, current, State.REMEDIATING, actor=actor, reason=reason, step=step, data=data
            )
            return incident

    def escalate(
        self,
        incident_id: int,
        *,
        actor: str,
        reason: str,
        details: Mapping[str, Any],
        step: str | None = None,
        expected_run_id: str | None = None,
        conn: psycopg.Connection[Any] | None = None,
    ) -> tuple[Incident, Page | None]:
        """Wake a human: move to escalated and enqueue exactly one page, in one transaction.

        Idempotent: an incident already escalated is returned with no second page; a resolved or
        ignored one is left alone (page None). `details` go into the page (e.g. run_url, exception),
        along with the failed step and everything automation already tried. `step` None keeps the
        incident's current step (the one that failed).
        """
        _check_actor_reason(actor, reason)
        with self._transaction(conn) as cur:
            current = self._lock(cur, incident_id)
            if current.state is State.ESCALATED or current.final:
                return current, None
            _check_expected(current, None, None, expected_run_id)
            incident, pages = self._apply(
                cur, current, State.ESCALATED, actor=actor, reason=reason,
                step=UNSET if step is None else step, data=details,
            )
            return incident, (pages[0] if pages else None)

    def resolve(
        self,
        incident_id: int,
        *,
        actor: str,
        reason: str,
        expected_version: int | None = None,
        expected_state: str | State | None = None,
        expected_run_id: str | None = None,
        step: str | None | _Unset = UNSET,
        data: Mapping[str, Any] | None = None,
        conn: psycopg.Connection[Any] | None = None,
    ) -> Incident:
        """Move to resolved; if a page was triggered for it, enqueue the page's resolve in the same transaction.

        Idempotent: an incident already resolved is returned unchanged (a retried resolve task succeeds).
        """
        _check_actor_reason(actor, reason)
        with self._transaction(conn) as cur:
            current = self._lock(cur, incident_id)
            if current.state is State.RESOLVED:
                return current
            _check_expected(current, expected_state, expected_version, expected_run_id)
            incident, _ = self._apply(
                cur, current, State.RESOLVED, actor=actor, reason=reason, step=step, data=data
            )
            return incident

    # -- detection: open or refresh --------------------------------------------------------------

    def open_or_refresh_incident(
        self,
        resource_id: int,
        type: str,
        *,
        actor: str,
        reason: str,
        severity: str = "critical",
        state: str | State = State.OPEN,
        data: Mapping[str, Any] | None = None,
        conn: psycopg.Connection[Any] | None = None,
    ) -> tuple[Incident, bool]:
        """Open an incident for (resource, type), or refresh the one already there; True when it opened one.

        An active incident is refreshed (last_seen_at, detections); so is an ignored one whose
        ignored_until is still ahead. Otherwise a new incident opens (in `state`: open, or held when
        the mass-failure guard says so), linked to the latest resolved one of the same (resource, type),
        with an 'opened' event. Safe under any number of concurrent reports.
        """
        def run(cur: psycopg.Cursor[DictRow]) -> tuple[Incident, bool]:
            ((incident_id, created),) = self._open_or_refresh(
                cur, [Finding(resource_id, type, reason, severity, data)], actor=actor, state=state
            )
            cur.execute("SELECT * FROM incidents WHERE id = %s", (incident_id,))
            row = cur.fetchone()
            assert row is not None
            return Incident.from_row(row), created

        return self._retrying_deadlocks(conn, run)

    def open_or_refresh_many(
        self,
        findings: Sequence[Finding | Sequence[Any]],
        *,
        actor: str,
        state: str | State = State.OPEN,
        conn: psycopg.Connection[Any] | None = None,
    ) -> builtins.list[tuple[int, bool]]:
        """`open_or_refresh_incident` for a sweep's worth of findings, in a constant number of statements.

        `findings` are `Finding`s or tuples (resource_id, type, reason, severity[, data]). Returns
        (incident id, created) per finding, in input order; a repeated (resource, type) in the same
        batch counts as one detection and is reported created only once.
        """
        return self._retrying_deadlocks(
            conn, lambda cur: self._open_or_refresh(cur, findings, actor=actor, state=state)
        )

    def note(
        self,
        incident_id: int,
        *,
        actor: str,
        reason: str,
        step: str | None = None,
        data: Mapping[str, Any] | None = None,
        conn: psycopg.Connection[Any] | None = None,
    ) -> IncidentEvent:
        """Append an audit event that changes nothing (state, version and owner stay as they are).

        Dry runs record what they would have done this way, and humans can annotate an incident.
        """
        if not reason or not reason.strip():
            raise ValueError(f"incident {incident_id}: a note needs a reason")
        if not actor or not actor.strip():
            raise ValueError(f"incident {incident_id}: a note needs an actor")
        with self._transaction(conn) as cur:
            current = self._lock(cur, incident_id)
            cur.execute(
                """
                INSERT INTO incident_events (incident_id, from_state, to_state, version, step, actor, reason, data)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING *
                """,
                (current.id, current.state.value, current.state.value, current.version, step, actor, reason,
                 jsonb({**dict(data or {}), "note": True})),
            )
            row = cur.fetchone()
        assert row is not None
        return IncidentEvent.from_row(row)

    # -- internals -------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self, conn: psycopg.Connection[Any] | None) -> Iterator[psycopg.Cursor[DictRow]]:
        if conn is not None and not conn.autocommit and conn.info.transaction_status == pq.TransactionStatus.IDLE:
            # On an idle connection psycopg's transaction() would BEGIN and COMMIT by itself; enter the
            # caller's (implicit) transaction first so ours is a savepoint in it and the caller commits.
            conn.execute("SELECT 1")
        try:
            with connection(conn if conn is not None else self.dsn) as c, c.transaction(), dict_cursor(c) as cur:
                yield cur
        except psycopg.errors.ForeignKeyViolation as exc:
            raise ValueError(
                f"{exc.diag.message_detail or exc}: incidents need an existing resource; add it to "
                "`resources` first (fleet inventory)"
            ) from exc

    def _retrying_deadlocks(
        self, conn: psycopg.Connection[Any] | None, work: Callable[[psycopg.Cursor[DictRow]], T]
    ) -> T:
        # Bulk refreshes lock rows in id order, but two sweeps can still meet on the insert path in
        # another order; PostgreSQL then aborts one. In our own transaction, simply run it again.
        attempts = 1 if conn is not None else 3
        for attempt in range(1, attempts + 1):
            try:
                with self._transaction(conn) as cur:
                    return work(cur)
            except psycopg.errors.DeadlockDetected:
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def _lock(self, cur: psycopg.Cursor[DictRow], incident_id: int) -> Incident:
        cur.execute("SELECT * FROM incidents WHERE id = %s FOR UPDATE", (incident_id,))
        row = cur.fetchone()
        if row is None:
            raise IncidentNotFound(incident_id)
        return Incident.from_row(row)

    def _apply(
        self,
        cur: psycopg.Cursor[DictRow],
        current: Incident,
        target: State,
        *,
        actor: str,
        reason: str,
        step: str | None | _Unset = UNSET,
        owner_run_id: str | None | _Unset = UNSET,
        data: Mapping[str, Any] | None = None,
        ignored_until: datetime | None = None,
    ) -> tuple[Incident, builtins.list[Page]]:
        """The transition itself, on a row this transaction has locked: update, event, pager side effects."""
        check_transition(current.id, current.state, target)
        if target is State.IGNORED and ignored_until is None:
            raise ValueError(
                f"incident {current.id}: ignoring needs ignored_until (the time until which re-detections "
                "only refresh it)"
            )
        cur.execute(
            """
            UPDATE incidents SET
                state = %(state)s,
                version = version + 1,
                step = %(step)s,
                owner_run_id = %(owner)s,
                reason = %(reason)s,
                escalated_at = CASE WHEN %(state)s::text = 'escalated' THEN now() ELSE escalated_at END,
                resolved_at = CASE WHEN %(state)s::text = 'resolved' THEN now() ELSE resolved_at END,
                ignored_until = CASE WHEN %(state)s::text = 'ignored' THEN %(until)s::timestamptz
                                     ELSE ignored_until END
            WHERE id = %(id)s AND version = %(version)s
            RETURNING *
            """,
            {
                "state": target.value,
                "step": current.step if step is UNSET else step,
                "owner": current.owner_run_id if owner_run_id is UNSET else owner_run_id,
                "reason": reason,
                "until": ignored_until,
                "id": current.id,
                "version": current.version,
            },
        )
        row = cur.fetchone()
        if row is None:  # cannot happen while we hold the row lock; guard the invariant anyway
            raise StaleIncident(
                current.id, actual_state=current.state, actual_version=-1, expected_version=current.version
            )
        incident = Incident.from_row(row)
        cur.execute(
            """
            INSERT INTO incident_events (incident_id, from_state, to_state, version, step, actor, reason, data)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
            """,
            (incident.id, current.state.value, target.value, incident.version, incident.step, actor, reason,
             jsonb(dict(data or {}))),
        )
        pages: builtins.list[Page] = []
        if target is State.ESCALATED:
            page = self._enqueue_trigger(cur, incident, current.state, dict(data or {}))
            if page is not None:
                pages.append(page)
        elif target in FINAL_STATES:
            pages.extend(self._enqueue_resolves(cur, incident, actor, reason))
        return incident, pages

    def _resource(self, cur: psycopg.Cursor[DictRow], resource_id: int) -> dict[str, Any]:
        cur.execute("SELECT id, name, kind, role, host, port FROM resources WHERE id = %s", (resource_id,))
        row = cur.fetchone()
        return dict(row) if row else {"id": resource_id, "name": f"resource {resource_id}"}

    def _enqueue_trigger(
        self, cur: psycopg.Cursor[DictRow], incident: Incident, state_before: State, details: dict[str, Any]
    ) -> Page | None:
        cur.execute(
            "SELECT count(*) AS n FROM pages WHERE incident_id = %s AND action = 'trigger'", (incident.id,)
        )
        row = cur.fetchone()
        escalation = (row["n"] if row else 0) + 1
        resource = self._resource(cur, incident.resource_id)
        cur.execute(
            """
            SELECT * FROM (SELECT * FROM incident_events WHERE incident_id = %s ORDER BY id DESC LIMIT %s) e
            ORDER BY id
            """,
            (incident.id, PAGE_EVENT_LIMIT),
        )
        tried = [
            {
                "at": e["at"],
                "from_state": e["from_state"],
                "to_state": e["to_state"],
                "step": e["step"],
                "actor": e["actor"],
                "reason": e["reason"],
            }
            for e in cur.fetchall()
        ]
        page_details = {
            **details,
            "incident_id": incident.id,
            "incident_type": incident.type,
            "resource": resource,
            "state_before": state_before.value,
            "failed_step": incident.step,
            "reason": incident.reason,
            "detections": incident.detections,
            "opened_at": incident.opened_at,
            "escalation": escalation,
            "automation_tried": tried,
        }
        return enqueue_page(
            cur.connection,
            incident_id=incident.id,
            dedup_key=dedup_key_for_incident(incident.id, escalation),
            summary=page_summary(incident.type, str(resource["name"]), incident.reason),
            details=page_details,
            severity=incident.severity if incident.severity in SEVERITIES else "critical",
            action="trigger",
        )

    def _enqueue_resolves(
        self, cur: psycopg.Cursor[DictRow], incident: Incident, actor: str, reason: str
    ) -> builtins.list[Page]:
        cur.execute(
            """
            SELECT dedup_key, severity FROM pages
            WHERE incident_id = %s AND action = 'trigger' AND status <> 'failed'
            ORDER BY id
            """,
            (incident.id,),
        )
        triggers = cur.fetchall()
        if not triggers:
            return []
        resource = self._resource(cur, incident.resource_id)
        pages = []
        for trigger in triggers:
            page = enqueue_page(
                cur.connection,
                incident_id=incident.id,
                dedup_key=trigger["dedup_key"],
                summary=page_summary(incident.type, str(resource["name"]), f"{incident.state}: {reason}"),
                details={"incident_id": incident.id, "state": incident.state.value, "by": actor, "reason": reason},
                severity=trigger["severity"],
                action="resolve",
            )
            if page is not None:
                pages.append(page)
        return pages

    def _open_or_refresh(
        self,
        cur: psycopg.Cursor[DictRow],
        findings: Sequence[Finding | Sequence[Any]],
        *,
        actor: str,
        state: str | State,
    ) -> builtins.list[tuple[int, bool]]:
        check_actor(actor)
        initial = parse_state(state)
        if initial not in (State.OPEN, State.HELD):
            raise ValueError(f"new incidents open as open or held, not {initial}")
        parsed = [_as_finding(f) for f in findings]
        first: dict[tuple[int, str], Finding] = {}
        for f in parsed:
            first.setdefault((f.resource_id, f.type), f)
        result: dict[tuple[int, str], tuple[int, bool]] = {}
        remaining = sorted(first)

        # Large batches go to a temporary table by COPY once; every statement below joins with it
        # (passing 100k-element arrays to each statement costs more than the statements themselves).
        source, params = _load_findings(cur, [first[k] for k in remaining])

        # 1. An active incident: refresh it (rows locked in id order, so concurrent sweeps cannot deadlock).
        if remaining:
            for r in self._refresh(cur, _ACTIVE_REFRESH, source, params):
                result[(r["resource_id"], r["type"])] = (r["id"], False)
            remaining = [k for k in remaining if k not in result]
            source, params = _drop_done(cur, source, params, first, remaining, result)

        # 2. An ignored incident still inside its ignore window: refresh that instead of opening.
        if remaining:
            for r in self._refresh(cur, _IGNORED_REFRESH, source, params):
                result[(r["resource_id"], r["type"])] = (r["id"], False)
            remaining = [k for k in remaining if k not in result]
            source, params = _drop_done(cur, source, params, first, remaining, result)

        # 3. Open, linked to the latest resolved incident of the same (resource, type). A concurrent
        # opener of the same (resource, type) makes ours a refresh (created false).
        created: builtins.list[int] = []
        if remaining:
            cur.execute(_INSERT.format(findings=source, active=_ACTIVE_LIST), {**params, "state": initial.value})
            for r in cur.fetchall():
                result[(r["resource_id"], r["type"])] = (r["id"], r["created"])
                if r["created"]:
                    created.append(r["id"])

        if created:
            # 4. An ignore committed while we inserted (invisible to step 2's snapshot) wins: undo ours.
            cur.execute(_IGNORED_RACE, (created,))
            raced = cur.fetchall()
            if raced:
                cur.execute("DELETE FROM incidents WHERE id = ANY(%s)", ([r["id"] for r in raced],))
                raced_keys = [(r["resource_id"], r["type"]) for r in raced]
                created = [i for i in created if i not in {r["id"] for r in raced}]
                for r in self._refresh(cur, _IGNORED_REFRESH, _FINDINGS,
                                       _columns([first[k] for k in raced_keys])):
                    result[(r["resource_id"], r["type"])] = (r["id"], False)

        if source is _TEMP_FINDINGS:
            cur.execute("SET LOCAL enable_nestloop = on")
        if created:
            # 5. A resolve that committed while we inserted was invisible to step 3's link: link those
            # now (usually none), then record 'opened'.
            cur.execute(_RELINK, {"ids": created})
            cur.execute(_RECORD_OPENED, {"ids": created, "actor": actor})

        out: builtins.list[tuple[int, bool]] = []
        reported: set[int] = set()
        for f in parsed:
            incident_id, was_created = result[(f.resource_id, f.type)]
            out.append((incident_id, was_created and incident_id not in reported))
            reported.add(incident_id)
        return out

    @staticmethod
    def _refresh(
        cur: psycopg.Cursor[DictRow], query: sql.SQL, source: sql.Composable, params: dict[str, Any]
    ) -> builtins.list[DictRow]:
        cur.execute(query.format(findings=source, active=_ACTIVE_LIST), params)
        return cur.fetchall()


_BULK_THRESHOLD = 500
_TEMP_FINDINGS = sql.SQL("fm_findings AS f")


def _load_findings(cur: psycopg.Cursor[DictRow], batch: Sequence[Finding]) -> tuple[sql.Composable, dict[str, Any]]:
    """Where the statements read the findings from: inline arrays for a few, a COPYed temp table for many."""
    if len(batch) < _BULK_THRESHOLD:
        return _FINDINGS, _columns(batch)
    cur.execute(
        "CREATE TEMP TABLE IF NOT EXISTS fm_findings "
        "(resource_id bigint, type text, reason text, severity text, data jsonb) ON COMMIT DROP"
    )
    cur.execute("TRUNCATE fm_findings")
    with cur.copy("COPY fm_findings (resource_id, type, reason, severity, data) FROM STDIN") as copy:
        for f in batch:
            copy.write_row((f.resource_id, f.type, f.reason, f.severity, jsonb(dict(f.data or {}))))
    cur.execute("ANALYZE fm_findings")
    # Right after a large insert the planner's idea of `incidents` is stale (autovacuum has not
    # analyzed it yet) and a nested loop over 100k findings can take minutes; hash joins are
    # right for every bulk statement here whatever the statistics say.
    cur.execute("SET LOCAL enable_nestloop = off")
    return _TEMP_FINDINGS, {}


def _drop_done(
    cur: psycopg.Cursor[DictRow],
    source: sql.Composable,
    params: dict[str, Any],
    first: dict[tuple[int, str], Finding],
    remaining: Sequence[tuple[int, str]],
    result: dict[tuple[int, str], tuple[int, bool]],
) -> tuple[sql.Composable, dict[str, Any]]:
    """Leave only the findings still to handle in the statements' source."""
    if source is _TEMP_FINDINGS:
        done = [incident_id for incident_id, _ in result.values()]
        if done:
            cur.execute(
                "DELETE FROM fm_findings f USING incidents i "
                "WHERE i.id = ANY(%s) AND i.resource_id = f.resource_id AND i.type = f.type",
                (done,),
            )
        return source, params
    return _FINDINGS, _columns([first[k] for k in remaining])


def _columns(batch: Sequence[Finding]) -> dict[str, Any]:
    return {
        "resource_ids": [f.resource_id for f in batch],
        "types": [f.type for f in batch],
        "reasons": [f.reason for f in batch],
        "severities": [f.severity for f in batch],
        "datas": [jsonb(dict(f.data or {})) for f in batch],
    }


def _check_expected(
    current: Incident,
    expected_state: str | State | None,
    expected_version: int | None,
    expected_run_id: str | None,
) -> None:
    want_state = parse_state(expected_state) if expected_state is not None else None
    if (
        (want_state is not None and current.state is not want_state)
        or (expected_version is not None and current.version != expected_version)
        or (expected_run_id is not None and current.owner_run_id != expected_run_id)
    ):
        raise StaleIncident(
            current.id, actual_state=current.state, actual_version=current.version,
            actual_run_id=current.owner_run_id, expected_state=want_state,
            expected_version=expected_version, expected_run_id=expected_run_id,
        )


_FINDINGS = sql.SQL(
    "unnest(%(resource_ids)s::bigint[], %(types)s::text[], %(reasons)s::text[], %(severities)s::text[],"
    " %(datas)s::jsonb[]) AS f(resource_id, type, reason, severity, data)"
)

_ACTIVE_REFRESH = sql.SQL(
    """
    WITH target AS (
        SELECT i.id, f.data FROM incidents i JOIN {findings} ON i.resource_id = f.resource_id AND i.type = f.type
        WHERE i.state IN ({active})
        ORDER BY i.id
        FOR UPDATE OF i
    )
    UPDATE incidents i SET last_seen_at = now(), detections = i.detections + 1, data = i.data || target.data
    FROM target WHERE i.id = target.id
    RETURNING i.id, i.resource_id, i.type
    """
)

_IGNORED_REFRESH = sql.SQL(
    """
    WITH latest AS (
        SELECT DISTINCT ON (i.resource_id, i.type) i.id, f.data
        FROM incidents i JOIN {findings} ON i.resource_id = f.resource_id AND i.type = f.type
        WHERE i.state = 'ignored' AND i.ignored_until > now()
        ORDER BY i.resource_id, i.type, i.id DESC
    ), locked AS (
        SELECT id FROM incidents WHERE id IN (SELECT id FROM latest) ORDER BY id FOR UPDATE
    )
    UPDATE incidents i SET last_seen_at = now(), detections = i.detections + 1, data = i.data || latest.data
    FROM latest WHERE i.id = latest.id AND i.id IN (SELECT id FROM locked)
    RETURNING i.id, i.resource_id, i.type
    """
)

_INSERT = sql.SQL(
    """
    INSERT INTO incidents AS i (resource_id, type, state, severity, reason, data, previous_incident_id)
    SELECT f.resource_id, f.type, %(state)s, f.severity, f.reason, f.data,
           (SELECT max(o.id) FROM incidents o
            WHERE o.resource_id = f.resource_id AND o.type = f.type AND o.state = 'resolved')
    FROM {findings}
    ORDER BY f.resource_id, f.type
    ON CONFLICT (resource_id, type) WHERE state IN ({active})
    DO UPDATE SET last_seen_at = now(), detections = i.detections + 1, data = i.data || EXCLUDED.data
    RETURNING i.id, i.resource_id, i.type, (i.xmax = 0) AS created
    """
)

_IGNORED_RACE = """
SELECT n.id, n.resource_id, n.type FROM incidents n
WHERE n.id = ANY(%s) AND EXISTS (
    SELECT 1 FROM incidents o
    WHERE o.resource_id = n.resource_id AND o.type = n.type
      AND o.state = 'ignored' AND o.ignored_until > now())
"""

_RELINK = """
UPDATE incidents n SET previous_incident_id = (
    SELECT max(o.id) FROM incidents o
    WHERE o.resource_id = n.resource_id AND o.type = n.type AND o.state = 'resolved' AND o.id < n.id)
WHERE n.id = ANY(%(ids)s) AND EXISTS (
    SELECT 1 FROM incidents o
    WHERE o.resource_id = n.resource_id AND o.type = n.type AND o.state = 'resolved' AND o.id < n.id
      AND o.id IS DISTINCT FROM n.previous_incident_id AND o.id > coalesce(n.previous_incident_id, 0))
"""

_RECORD_OPENED = """
INSERT INTO incident_events (incident_id, from_state, to_state, version, step, actor, reason, data)
SELECT id, NULL, state, version, step, %(actor)s, reason, data FROM incidents WHERE id = ANY(%(ids)s) ORDER BY id
"""
