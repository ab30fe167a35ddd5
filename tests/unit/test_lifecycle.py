"""The incident state machine: the table from DESIGN.md, its errors, and its markdown rendering."""

from __future__ import annotations

import re

import pytest

from fleetmedic.db.migrate import MIGRATIONS_DIR
from fleetmedic.incidents.lifecycle import (
    ACTIVE_STATES,
    FINAL_STATES,
    MEANINGS,
    TRANSITIONS,
    IllegalTransition,
    IncidentError,
    IncidentNotFound,
    StaleIncident,
    State,
    as_markdown,
    check_transition,
    is_allowed,
)

# DESIGN.md's table plus open -> escalated (a failure before the claim must page) and the
# remediating -> remediating step-progress self-transition.
DESIGN_TABLE = {
    "open": {"remediating", "held", "escalated", "resolved", "ignored"},
    "remediating": {"await_resolution", "resolved", "escalated", "held", "remediating"},
    "await_resolution": {"resolved", "escalated"},
    "held": {"open", "escalated", "resolved", "ignored"},
    "escalated": {"resolved", "open", "ignored"},
    "resolved": set(),
    "ignored": set(),
}


def test_the_transition_table_is_the_one_in_the_design() -> None:
    assert {str(s): {str(t) for t in targets} for s, targets in TRANSITIONS.items()} == DESIGN_TABLE
    assert set(MEANINGS) == set(State)


def test_every_allowed_pair_passes_and_every_other_pair_raises() -> None:
    for source in State:
        for target in State:
            if target in TRANSITIONS[source]:
                check_transition(1, source, target)
                assert is_allowed(source, target)
            else:
                with pytest.raises(IllegalTransition):
                    check_transition(1, source, target)
                assert not is_allowed(source, target)


def test_only_remediating_may_stay_where_it_is_as_step_progress() -> None:
    assert [s for s in State if s in TRANSITIONS[s]] == [State.REMEDIATING]


def test_active_states_are_exactly_the_ones_in_the_partial_unique_index() -> None:
    schema = (MIGRATIONS_DIR / "0001_initial.sql").read_text()
    index = re.search(r"CREATE UNIQUE INDEX incidents_one_active.*?WHERE state IN \(([^)]*)\)", schema, re.S)
    assert index is not None
    assert {s.strip().strip("'") for s in index.group(1).split(",")} == set(ACTIVE_STATES)
    assert FINAL_STATES == {State.RESOLVED, State.IGNORED}


def test_the_schema_check_constraint_knows_every_state() -> None:
    schema = (MIGRATIONS_DIR / "0001_initial.sql").read_text()
    check = re.search(r"state\s+text NOT NULL CHECK \(state IN\s*\(([^)]*)\)\)", schema, re.S)
    assert check is not None
    assert {s.strip().strip("'") for s in check.group(1).split(",")} == {s.value for s in State}


def test_an_illegal_transition_names_both_states_and_where_it_may_go() -> None:
    with pytest.raises(IllegalTransition) as caught:
        check_transition(12, "open", "await_resolution")

    assert str(caught.value) == (
        "incident 12: cannot go from open to await_resolution "
        "(open may go to: remediating, held, escalated, resolved, ignored)"
    )
    assert caught.value.from_state is State.OPEN and caught.value.to_state is State.AWAIT_RESOLUTION
    assert caught.value.incident_id == 12
    assert isinstance(caught.value, IncidentError)


def test_leaving_a_final_state_says_it_is_final() -> None:
    with pytest.raises(IllegalTransition, match=r"^incident 12: cannot go from resolved to remediating \(resolved is final\)$"):
        check_transition(12, State.RESOLVED, State.REMEDIATING)


def test_an_unknown_state_is_a_value_error_listing_the_states() -> None:
    with pytest.raises(ValueError, match="'fixed' is not an incident state .states: open, remediating"):
        check_transition(1, "open", "fixed")


def test_a_lost_compare_and_set_names_what_was_expected_and_what_was_found() -> None:
    error = StaleIncident(
        7, actual_state=State.REMEDIATING, actual_version=4, actual_run_id="incident-7",
        expected_state=State.OPEN, expected_version=3,
    )

    assert "incident 7 changed under you" in str(error)
    assert "expected state open, version 3" in str(error)
    assert "found state remediating, version 4" in str(error)
    assert (error.expected_version, error.actual_version) == (3, 4)


def test_stale_with_several_expected_states_lists_them() -> None:
    error = StaleIncident(7, actual_state=State.ESCALATED, actual_version=2, expected_state=(State.OPEN, State.HELD))
    assert "expected state open or held" in str(error)


def test_not_found_is_a_lookup_error_naming_the_id() -> None:
    error = IncidentNotFound(99)
    assert isinstance(error, LookupError) and "incident 99 does not exist" in str(error)


def test_the_markdown_table_has_one_row_per_state_with_its_targets() -> None:
    text = as_markdown()
    lines = text.strip().splitlines()

    assert lines[0] == "| state | meaning | may go to |"
    assert len(lines) == 2 + len(State)
    assert (
        "| open | confirmed by detection, playbook run requested | remediating, held, escalated, resolved, ignored |"
        in lines
    )
    assert "| resolved | healthy again (by automation, a human, or transient) | — |" in lines
    remediating = next(line for line in lines if line.startswith("| remediating |"))
    assert "await_resolution, resolved, escalated, held" in remediating and "step progress" in remediating
