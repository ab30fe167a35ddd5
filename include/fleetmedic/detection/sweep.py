"""Sweep planning, bulk health recording and confirmation rules (no Airflow here)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from fleetmedic.detection.checks import CHECKS, CheckResult, Target, run_checks

__all__ = [
    "DetectRule",
    "Finding",
    "HealthRow",
    "confirmed_findings",
    "load_targets",
    "plan_shards",
    "probe_round",
    "record_results",
    "rules_from_playbooks",
]

ACTIVE_STATES = ("open", "remediating", "await_resolution", "held", "escalated")


@dataclass(frozen=True)
class DetectRule:
    """A playbook's detect block: which check opens which incident type, after how much evidence."""

    type: str
    check: str
    failures: int
    over_seconds: float
    severity: str
    kinds: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectRule:
        return cls(**{**d, "kinds": tuple(d["kinds"])})


@dataclass(frozen=True)
class Finding:
    """A confirmed problem: the evidence satisfied a playbook's confirmation rule."""

    resource_id: int
    type: str
    check: str
    reason: str
    severity: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class HealthRow:
    resource_id: int
    check: str
    healthy: bool
    reason: str
    checked_at: datetime
    consecutive_failures: int
    first_failure_at: datetime | None


def rules_from_playbooks(playbooks: Iterable[Any]) -> list[DetectRule]:
    rules = []
    for pb in playbooks:
        for detect in pb.detects:
            kind = CHECKS[detect.check][0]
            rules.append(
                DetectRule(
                    type=pb.type,
                    check=detect.check,
                    failures=detect.confirm.failures,
                    over_seconds=detect.confirm.over.total_seconds(),
                    severity=pb.severity,
                    kinds=(kind,),
                )
            )
    return rules


def plan_shards(resource_count: int, shard_size: int) -> list[dict[str, int]]:
    """Split the inventory into shards of about `shard_size` resources (by id modulo shard count)."""
    count = max(1, math.ceil(resource_count / max(1, shard_size)))
    return [{"shard": i, "shard_count": count} for i in range(count)]


async def load_targets(aconn: Any, shard: int, shard_count: int) -> list[Target]:
    """The shard's enabled resources; each target's attrs carry its server under the key `server`,
    and a follower's the primary the inventory names under `primary` ({name, host, port})."""
    async with aconn.cursor() as cur:
        await cur.execute(
            "SELECT r.id, r.name, r.kind, r.host, r.port, r.attrs, r.role, "
            "       s.name, s.provider, s.address, s.attrs, p.name, p.host, p.port "
            "FROM resources r LEFT JOIN servers s ON s.id = r.server_id "
            "LEFT JOIN resources p ON p.id = r.primary_id "
            "WHERE r.enabled AND r.id %% %s = %s ORDER BY r.id",
            (shard_count, shard),
        )
        rows = await cur.fetchall()
    targets = []
    for r in rows:
        attrs = dict(r[5] or {})
        attrs["role"] = r[6]
        if r[7] is not None:
            attrs["server"] = {"name": r[7], "provider": r[8], "address": r[9], "attrs": dict(r[10] or {})}
        if r[11] is not None:
            attrs["primary"] = {"name": r[11], "host": r[12], "port": r[13]}
        targets.append(Target(r[0], r[1], r[2], r[3], r[4], attrs))
    return targets


_RECORD_SQL = """
INSERT INTO health AS h (resource_id, check_name, healthy, value, reason, checked_at,
                         consecutive_failures, first_failure_at, last_healthy_at)
SELECT r.resource_id, r.check_name, r.healthy, r.value, r.reason, r.checked_at,
       CASE WHEN r.healthy THEN 0 ELSE 1 END,
       CASE WHEN r.healthy THEN NULL ELSE r.checked_at END,
       CASE WHEN r.healthy THEN r.checked_at ELSE NULL END
FROM unnest(%s::bigint[], %s::text[], %s::bool[], %s::float8[], %s::text[], %s::timestamptz[])
     AS r(resource_id, check_name, healthy, value, reason, checked_at)
ON CONFLICT (resource_id, check_name) DO UPDATE SET
    healthy = excluded.healthy,
    value = excluded.value,
    reason = excluded.reason,
    checked_at = excluded.checked_at,
    consecutive_failures = CASE WHEN excluded.healthy THEN 0 ELSE h.consecutive_failures + 1 END,
    first_failure_at = CASE WHEN excluded.healthy THEN NULL
                            WHEN h.consecutive_failures = 0 THEN excluded.checked_at
                            ELSE h.first_failure_at END,
    last_healthy_at = CASE WHEN excluded.healthy THEN excluded.checked_at ELSE h.last_healthy_at END
WHERE h.checked_at <= excluded.checked_at
RETURNING resource_id, check_name, healthy, reason, checked_at, consecutive_failures, first_failure_at
"""


async def record_results(aconn: Any, results: Sequence[CheckResult]) -> list[HealthRow]:
    """Write a round of probe results to `health` in one statement; returns the updated rows."""
    if not results:
        return []
    cols = (
        [r.resource_id for r in results],
        [r.check for r in results],
        [r.healthy for r in results],
        [r.value for r in results],
        [r.reason for r in results],
        [r.checked_at for r in results],
    )
    async with aconn.cursor() as cur:
        await cur.execute(_RECORD_SQL, cols)
        rows = await cur.fetchall()
    await aconn.commit()
    return [HealthRow(*row) for row in rows]


def confirmed_findings(rows: Iterable[HealthRow], rules: Sequence[DetectRule]) -> list[Finding]:
    """Apply each rule: `failures` consecutive failed probes whose span is at least `over_seconds`."""
    by_check: dict[str, list[DetectRule]] = {}
    for rule in rules:
        by_check.setdefault(rule.check, []).append(rule)
    findings = []
    for row in rows:
        if row.healthy or row.first_failure_at is None:
            continue
        span = (row.checked_at - row.first_failure_at).total_seconds()
        for rule in by_check.get(row.check, []):
            if row.consecutive_failures >= rule.failures and span >= rule.over_seconds:
                findings.append(
                    Finding(
                        resource_id=row.resource_id,
                        type=rule.type,
                        check=row.check,
                        reason=f"{row.check} failed {row.consecutive_failures} times over {span:.0f}s: {row.reason}",
                        severity=rule.severity,
                    )
                )
    return findings


@dataclass
class RoundResult:
    probed: int
    unhealthy: int
    findings: list[Finding]
    new_findings: list[Finding]


async def probe_round(
    aconn: Any,
    targets: Sequence[Target],
    rules: Sequence[DetectRule],
    *,
    timeout: float,
    concurrency: int,
) -> RoundResult:
    """Probe every target with the checks its kind needs, record health, apply confirmation rules."""
    checks_by_kind: dict[str, set[str]] = {}
    for rule in rules:
        for kind in rule.kinds:
            checks_by_kind.setdefault(kind, set()).add(rule.check)
    work = [(t, c) for t in targets for c in sorted(checks_by_kind.get(t.kind, ()))]
    results = await run_checks(work, timeout=timeout, concurrency=concurrency)
    rows = await record_results(aconn, results)
    findings = confirmed_findings(rows, rules)
    if findings:
        # A database whose server is down waits for the server's playbook (detection/correlation.py);
        # it must not count as new, or every sweep run would end after one round.
        from fleetmedic.detection.correlation import aload_server_facts, correlate

        findings, _deferred = correlate(findings, await aload_server_facts(aconn, findings))
    new = await _without_active_incident(aconn, findings)
    return RoundResult(
        probed=len(results),
        unhealthy=sum(1 for r in results if not r.healthy),
        findings=findings,
        new_findings=new,
    )


async def _without_active_incident(aconn: Any, findings: Sequence[Finding]) -> list[Finding]:
    if not findings:
        return []
    async with aconn.cursor() as cur:
        await cur.execute(
            "SELECT resource_id, type FROM incidents WHERE state = ANY(%s) AND resource_id = ANY(%s)",
            (list(ACTIVE_STATES), [f.resource_id for f in findings]),
        )
        active = {(r[0], r[1]) for r in await cur.fetchall()}
    await aconn.commit()
    return [f for f in findings if (f.resource_id, f.type) not in active]
