"""Load and validate playbook YAML files; errors name the file, the step, the field and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from fleetmedic.config import REPO_ROOT
from fleetmedic.playbooks.schema import TERMINALS, Playbook, Step

__all__ = [
    "OUTCOMES",
    "LoadResult",
    "PlaybookError",
    "default_playbooks_dir",
    "load_all",
    "load_playbook",
    "validate_playbook",
]

# The outcomes each kind of step can branch on.
OUTCOMES = {
    "action": ("ok", "error"),
    "wait_healthy": ("healthy", "timeout"),
}


class PlaybookError(ValueError):
    """A playbook file is invalid. `str()` is one line per problem, each naming file, step and field."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        super().__init__("\n".join(f"{self.path}: {p}" for p in problems))


def default_playbooks_dir() -> Path:
    return REPO_ROOT / "playbooks"


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _pydantic_problems(exc: ValidationError, raw: dict) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = list(err["loc"])
        where = ""
        if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
            steps = raw.get("steps") or []
            name = steps[loc[1]].get("name") if loc[1] < len(steps) and isinstance(steps[loc[1]], dict) else None
            where = f"step '{name}'" if name else f"step #{loc[1] + 1}"
            loc = loc[2:]
        field = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "is required"
            if field == "timeout":
                msg = "is required: every step needs a timeout (e.g. timeout: 2m)"
        elif err["type"] == "extra_forbidden":
            msg = "is not a known field (check the spelling)"
        problems.append(f"{where + ': ' if where else ''}field '{field}' {msg}")
    return problems


def validate_playbook(pb: Playbook, *, known_actions: Iterable[str], known_checks: Iterable[str]) -> list[str]:
    """Graph and reference checks that pydantic cannot express. Returns problems (empty: valid)."""
    problems: list[str] = []
    known_actions = set(known_actions)
    known_checks = set(known_checks)
    names = [s.name for s in pb.steps]
    seen: set[str] = set()
    for n in names:
        if n in seen:
            problems.append(f"step '{n}' is defined twice; step names must be unique")
        if n in TERMINALS:
            problems.append(f"step '{n}': '{n}' is a terminal and cannot be a step name")
        seen.add(n)
    for d in pb.detects:
        if d.check not in known_checks:
            problems.append(
                f"detect: field 'check' names unknown check '{d.check}'{_suggest(d.check, known_checks)} "
                f"(known: {', '.join(sorted(known_checks))})"
            )
    targets = set(names) | set(TERMINALS)
    for s in pb.steps:
        if bool(s.action) == bool(s.wait_healthy):
            problems.append(f"step '{s.name}': give exactly one of 'action' or 'wait_healthy'")
            continue
        if s.action and s.action not in known_actions:
            problems.append(
                f"step '{s.name}': field 'action' names unknown action '{s.action}'"
                f"{_suggest(s.action, known_actions)} (known: {', '.join(sorted(known_actions))})"
            )
        if s.action:
            kind = s.action.split(".", 1)[0]
            allowed_kinds = {"instance": "server"}.get(kind, kind)
            if allowed_kinds not in pb.applies_to and kind not in ("pager", "incident", "resource"):
                problems.append(
                    f"step '{s.name}': action '{s.action}' acts on {allowed_kinds}, but the playbook applies_to "
                    f"{pb.applies_to}; add it to applies_to or use another action"
                )
        if s.wait_healthy and s.wait_healthy not in known_checks:
            problems.append(
                f"step '{s.name}': field 'wait_healthy' names unknown check '{s.wait_healthy}'"
                f"{_suggest(s.wait_healthy, known_checks)}"
            )
        allowed = OUTCOMES[s.kind]
        for outcome, target in s.next.items():
            if outcome not in allowed:
                problems.append(
                    f"step '{s.name}': next has outcome '{outcome}', but a {s.kind} step's outcomes are "
                    f"{', '.join(allowed)}"
                )
            if target not in targets:
                problems.append(
                    f"step '{s.name}' goes to '{target}', which is not a step{_suggest(target, targets)} "
                    f"(steps: {', '.join(names)}; terminals: {', '.join(TERMINALS)})"
                )
        for outcome in allowed:
            if outcome not in s.next:
                problems.append(
                    f"step '{s.name}': next has no '{outcome}' outcome; say where to go, e.g. {outcome}: escalate"
                )
    if problems:
        return problems
    problems += _graph_problems(pb)
    return problems


def _graph_problems(pb: Playbook) -> list[str]:
    problems: list[str] = []
    by_name: dict[str, Step] = {s.name: s for s in pb.steps}
    # Reachability from the first step.
    reached: set[str] = set()
    stack = [pb.steps[0].name]
    while stack:
        n = stack.pop()
        if n in reached or n not in by_name:
            continue
        reached.add(n)
        stack.extend(by_name[n].next.values())
    for s in pb.steps:
        if s.name not in reached:
            problems.append(
                f"step '{s.name}' is unreachable: no path from the first step '{pb.steps[0].name}' leads to it"
            )
    # Cycles (Airflow DAGs are acyclic).
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        if n not in by_name:
            return
        if state.get(n) == 1:
            cycle = path[path.index(n):] + [n]
            problems.append(
                f"step '{n}': cycle {' -> '.join(cycle)}; playbooks are acyclic, repeat a step with 'attempts:' instead"
            )
            return
        if state.get(n) == 2:
            return
        state[n] = 1
        for t in by_name[n].next.values():
            visit(t, path + [n])
        state[n] = 2

    for s in pb.steps:
        visit(s.name, [])
    if problems:
        return problems
    # Every path ends at a terminal: with no cycles and all targets valid this holds by construction,
    # but a playbook must reach at least one terminal other than escalate to be worth automating.
    return problems


@dataclass
class LoadResult:
    playbooks: dict[str, Playbook]
    errors: dict[str, PlaybookError]


def load_playbook(path: Path | str, *, known_actions: Iterable[str] | None = None,
                  known_checks: Iterable[str] | None = None) -> Playbook:
    """Parse and validate one playbook file; raises PlaybookError naming the file."""
    from fleetmedic.actions.registry import ACTIONS
    from fleetmedic.detection.checks import CHECKS

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PlaybookError(path, [f"is not valid YAML: {exc}"]) from exc
    except OSError as exc:
        raise PlaybookError(path, [f"cannot be read: {exc.strerror}"]) from exc
    if not isinstance(raw, dict):
        raise PlaybookError(path, ["must be a YAML mapping with type, title, runbook, steps, ..."])
    try:
        pb = Playbook.model_validate(raw)
    except ValidationError as exc:
        raise PlaybookError(path, _pydantic_problems(exc, raw)) from None
    if path.stem != pb.type:
        raise PlaybookError(path, [f"field 'type' is '{pb.type}' but the file is named {path.name}; "
                                   f"rename the file to {pb.type}.yaml"])
    problems = validate_playbook(
        pb,
        known_actions=known_actions if known_actions is not None else ACTIONS.keys(),
        known_checks=known_checks if known_checks is not None else CHECKS.keys(),
    )
    if problems:
        raise PlaybookError(path, problems)
    return pb


def load_all(directory: Path | str | None = None) -> LoadResult:
    """Every playbooks/*.yaml: the valid ones, and an error per broken file (the others still load)."""
    directory = Path(directory) if directory else default_playbooks_dir()
    result = LoadResult({}, {})
    for path in sorted(directory.glob("*.yaml")):
        try:
            pb = load_playbook(path)
        except PlaybookError as exc:
            result.errors[str(path)] = exc
            continue
        result.playbooks[pb.type] = pb
    return result
