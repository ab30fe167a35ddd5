"""The incident state machine in one place: states, allowed transitions, and the typed errors of changing them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from types import MappingProxyType

__all__ = [
    "ACTIVE_STATES",
    "FINAL_STATES",
    "MEANINGS",
    "TRANSITIONS",
    "IllegalTransition",
    "IncidentError",
    "IncidentNotFound",
    "StaleIncident",
    "State",
    "allowed_targets",
    "as_markdown",
    "check_transition",
    "is_allowed",
    "parse_state",
]


class State(StrEnum):
    OPEN = "open"
    REMEDIATING = "remediating"
    AWAIT_RESOLUTION = "await_resolution"
    HELD = "held"
    ESCALATED = "escalated"
    RESOLVED = "resolved"
    IGNORED = "ignored"


MEANINGS: Mapping[State, str] = MappingProxyType(
    {
        State.OPEN: "confirmed by detection, playbook run requested",
        State.REMEDIATING: "a playbook run owns it (`owner_run_id`), `step` says where",
        State.AWAIT_RESOLUTION: "automation acted; waiting for health to return (e.g. backup running)",
        State.HELD: "a breaker, silence or mass-failure guard stopped automation",
        State.ESCALATED: "a human was paged; automation has stopped",
        State.RESOLVED: "healthy again (by automation, a human, or transient)",
        State.IGNORED: "a human chose to ignore it until a time",
    }
)

# The table from DESIGN.md, in its order, with two additions:
# - remediating -> remediating is the "step progress" self-transition: every step a playbook run
#   takes bumps the version (the fencing token);
# - open -> escalated: a failure before the claim (claim task error, DAG run timeout, breaker gate
#   failing) must still page, and paging means the incident is escalated so automation stays off it.
TRANSITIONS: Mapping[State, tuple[State, ...]] = MappingProxyType(
    {
        State.OPEN: (State.REMEDIATING, State.HELD, State.ESCALATED, State.RESOLVED, State.IGNORED),
        State.REMEDIATING: (
            State.AWAIT_RESOLUTION,
            State.RESOLVED,
            State.ESCALATED,
            State.HELD,
            State.REMEDIATING,
        ),
        State.AWAIT_RESOLUTION: (State.RESOLVED, State.ESCALATED),
        State.HELD: (State.OPEN, State.ESCALATED, State.RESOLVED, State.IGNORED),
        State.ESCALATED: (State.RESOLVED, State.OPEN, State.IGNORED),
        State.RESOLVED: (),
        State.IGNORED: (),
    }
)

# States covered by the partial unique index `incidents_one_active`: at most one per (resource, type).
ACTIVE_STATES: frozenset[State] = frozenset(s for s in State if TRANSITIONS[s])
FINAL_STATES: frozenset[State] = frozenset(s for s in State if not TRANSITIONS[s])


class IncidentError(Exception):
    """Base of the errors raised when reading or changing an incident."""

    def __init__(self, incident_id: int | None, message: str) -> None:
        super().__init__(message)
        self.incident_id = incident_id


class IncidentNotFound(IncidentError, LookupError):
    """No incident has this id."""

    def __init__(self, incident_id: int) -> None:
        super().__init__(
            incident_id,
            f"incident {incident_id} does not exist; list incidents with `fleetmedic incidents list`",
        )


class IllegalTransition(IncidentError):
    """The state machine has no edge from the incident's state to the requested one."""

    def __init__(self, incident_id: int | None, from_state: State, to_state: State) -> None:
        self.from_state = from_state
        self.to_state = to_state
        self.allowed = TRANSITIONS[from_state]
        if self.allowed:
            why = f"{from_state} may go to: {', '.join(self.allowed)}"
        else:
            why = f"{from_state} is final"
        super().__init__(incident_id, f"incident {incident_id}: cannot go from {from_state} to {to_state} ({why})")


class StaleIncident(IncidentError):
    """A compare-and-set lost: the incident is not in the state/version/owner the caller expected."""

    def __init__(
        self,
        incident_id: int,
        *,
        actual_state: State,
        actual_version: int,
        actual_run_id: str | None = None,
        expected_state: State | Iterable[State] | None = None,
        expected_version: int | None = None,
        expected_run_id: str | None = None,
    ) -> None:
        self.actual_state = actual_state
        self.actual_version = actual_version
        self.actual_run_id = actual_run_id
        self.expected_state = expected_state
        self.expected_version = expected_version
        self.expected_run_id = expected_run_id
        expected: list[str] = []
        if expected_state is not None:
            if isinstance(expected_state, str):
                expected.append(f"state {expected_state}")
            else:
                expected.append(f"state {' or '.join(expected_state)}")
        if expected_version is not None:
            expected.append(f"version {expected_version}")
        if expected_run_id is not None:
            expected.append(f"owned by run {expected_run_id}")
        actual = [f"state {actual_state}", f"version {actual_version}"]
        if expected_run_id is not None or actual_run_id is not None:
            actual.append(f"owned by run {actual_run_id}" if actual_run_id else "owned by no run")
        super().__init__(
            incident_id,
            f"incident {incident_id} changed under you: expected {', '.join(expected) or 'no change'}, "
            f"found {', '.join(actual)}; re-read it and decide again (another run or a human moved it)",
        )


def parse_state(value: str | State) -> State:
    """`value` as a State; a ValueError naming the valid states otherwise."""
    try:
        return State(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is not an incident state (states: {', '.join(State)})"
        ) from None


def allowed_targets(from_state: str | State) -> tuple[State, ...]:
    return TRANSITIONS[parse_state(from_state)]


def is_allowed(from_state: str | State, to_state: str | State) -> bool:
    return parse_state(to_state) in TRANSITIONS[parse_state(from_state)]


def check_transition(incident_id: int | None, from_state: str | State, to_state: str | State) -> None:
    """Raise `IllegalTransition` unless the table allows `from_state` -> `to_state`."""
    source, target = parse_state(from_state), parse_state(to_state)
    if target not in TRANSITIONS[source]:
        raise IllegalTransition(incident_id, source, target)


def as_markdown() -> str:
    """The state table as markdown, as in DESIGN.md (generated from TRANSITIONS, so it cannot drift)."""
    lines = ["| state | meaning | may go to |", "|---|---|---|"]
    for state in State:
        targets = [t for t in TRANSITIONS[state] if t is not state]
        may_go = ", ".join(targets) if targets else "—"
        if state in TRANSITIONS[state]:
            may_go += f" (and {state} itself: step progress)"
        lines.append(f"| {state} | {MEANINGS[state]} | {may_go} |")
    return "\n".join(lines) + "\n"
