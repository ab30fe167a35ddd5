"""Playbook validation: every bad playbook is refused with a message naming file, step and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from fleetmedic.playbooks.loader import PlaybookError, load_all, load_playbook

GOOD = """
type: demo_down
title: Demo down
applies_to: [postgres]
runbook: what to do
detect: {check: postgres.connect, confirm: {failures: 2, over: 10s}}
steps:
  - {name: restart, action: postgres.restart, timeout: 2m, next: {ok: verify, error: escalate}}
  - {name: verify, wait_healthy: postgres.connect, timeout: 3m, next: {healthy: resolve, timeout: escalate}}
"""


def write(tmp_path: Path, text: str, name: str = "demo_down.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_good_playbook_loads_with_durations_parsed(tmp_path):
    pb = load_playbook(write(tmp_path, GOOD))
    assert pb.dag_id == "playbook_demo_down"
    assert pb.step("verify").timeout.total_seconds() == 180
    assert pb.detect is not None and pb.detect.confirm.over.total_seconds() == 10


def test_repository_playbooks_all_load():
    result = load_all()
    assert result.errors == {}
    assert "resource_down" in result.playbooks


BAD = [
    ("unknown next step", GOOD.replace("next: {ok: verify", "next: {ok: verfy"),
     "demo_down.yaml: step 'restart' goes to 'verfy', which is not a step; did you mean 'verify'? "
     "(steps: restart, verify; terminals: resolve, await_resolution, escalate)"),
    ("unknown action", GOOD.replace("action: postgres.restart", "action: postgres.restrat"),
     "step 'restart': field 'action' names unknown action 'postgres.restrat'; did you mean 'postgres.restart'?"),
    ("missing timeout", GOOD.replace("action: postgres.restart, timeout: 2m,", "action: postgres.restart,"),
     "step 'restart': field 'timeout' is required: every step needs a timeout (e.g. timeout: 2m)"),
    ("bad duration", GOOD.replace("timeout: 2m", "timeout: soon"),
     "step 'restart': field 'timeout' Value error, 'soon' is not a duration; write e.g. 30s, 5m, 1h"),
    ("unknown check", GOOD.replace("detect: {check: postgres.connect", "detect: {check: postgres.conect"),
     "detect: field 'check' names unknown check 'postgres.conect'; did you mean 'postgres.connect'?"),
    ("cycle", GOOD.replace("next: {healthy: resolve", "next: {healthy: restart"),
     "cycle restart -> verify -> restart; playbooks are acyclic, repeat a step with 'attempts:' instead"),
    ("unreachable step", GOOD + "  - {name: orphan, action: postgres.restart, timeout: 1m, "
                                "next: {ok: resolve, error: escalate}}\n",
     "step 'orphan' is unreachable: no path from the first step 'restart' leads to it"),
    ("wrong outcome name", GOOD.replace("next: {ok: verify, error: escalate}", "next: {ok: verify, fail: escalate}"),
     "step 'restart': next has outcome 'fail', but a action step's outcomes are ok, error"),
    ("missing outcome", GOOD.replace("next: {ok: verify, error: escalate}", "next: {ok: verify}"),
     "step 'restart': next has no 'error' outcome; say where to go, e.g. error: escalate"),
    ("both action and wait", GOOD.replace("action: postgres.restart,", "action: postgres.restart, "
                                          "wait_healthy: postgres.connect,"),
     "step 'restart': give exactly one of 'action' or 'wait_healthy'"),
    ("duplicate step", GOOD.replace("name: verify", "name: restart"),
     "step 'restart' is defined twice; step names must be unique"),
    ("unknown field", GOOD.replace("title: Demo down", "title: Demo down\ntitel: typo"),
     "field 'titel' is not a known field (check the spelling)"),
    ("type does not match file", GOOD.replace("type: demo_down", "type: other"),
     "field 'type' is 'other' but the file is named demo_down.yaml; rename the file to other.yaml"),
    ("action on another kind", GOOD.replace("action: postgres.restart", "action: redis.restart"),
     "step 'restart': action 'redis.restart' acts on redis, but the playbook applies_to ['postgres']"),
    ("empty runbook", GOOD.replace("runbook: what to do", "runbook: '  '"),
     "field 'runbook' Value error, runbook is empty"),
    ("not yaml", "type: [unclosed", "is not valid YAML"),
]


@pytest.mark.parametrize(("label", "text", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_playbook_is_refused_with_a_clear_message(tmp_path, label, text, message):
    path = write(tmp_path, text)
    with pytest.raises(PlaybookError) as info:
        load_playbook(path)
    assert message in str(info.value)
    assert str(info.value).startswith(str(path))


def test_one_broken_playbook_does_not_stop_the_others(tmp_path):
    write(tmp_path, GOOD)
    write(tmp_path, GOOD.replace("type: demo_down", "type: broken").replace("verify", "verfy", 1), "broken.yaml")
    result = load_all(tmp_path)
    assert set(result.playbooks) == {"demo_down"}
    assert list(result.errors) == [str(tmp_path / "broken.yaml")]
