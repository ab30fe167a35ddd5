"""Async triggers: probe a shard of the fleet every few seconds, or wait until one resource is healthy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from fleetmedic.airflow.connections import OPS_CONN_ID, aops_dsn

__all__ = ["ProbeShardTrigger", "WaitHealthyTrigger"]


class ProbeShardTrigger(BaseTrigger):
    """Probe one shard in rounds until a new incident is confirmed or the sweep window ends.

    Each round loads the shard's targets, runs every check its playbooks need, writes `health` in
    bulk and applies the confirmation rules. Health is written every round, so evidence builds up
    across rounds and across sweep runs.
    """

    def __init__(self, *, shard: int, shard_count: int, rules: list[dict[str, Any]], deadline: float,
                 interval: float = 5.0, probe_timeout: float = 3.0, concurrency: int = 50,
                 conn_id: str = OPS_CONN_ID):
        super().__init__()
        self.shard = shard
        self.shard_count = shard_count
        self.rules = rules
        self.deadline = deadline
        self.interval = interval
        self.probe_timeout = probe_timeout
        self.concurrency = concurrency
        self.conn_id = conn_id

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "fleetmedic.airflow.triggers.ProbeShardTrigger",
            {
                "shard": self.shard, "shard_count": self.shard_count, "rules": self.rules,
                "deadline": self.deadline, "interval": self.interval, "probe_timeout": self.probe_timeout,
                "concurrency": self.concurrency, "conn_id": self.conn_id,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import psycopg

        from fleetmedic.detection.sweep import DetectRule, load_targets, probe_round

        dsn = await aops_dsn(self.conn_id)
        rules = [DetectRule.from_dict(r) for r in self.rules]
        rounds = probed = unhealthy = 0
        started = time.time()
        async with await psycopg.AsyncConnection.connect(dsn) as aconn:
            while True:
                round_started = time.monotonic()
                targets = await load_targets(aconn, self.shard, self.shard_count)
                result = await probe_round(aconn, targets, rules, timeout=self.probe_timeout,
                                           concurrency=self.concurrency)
                rounds += 1
                probed += result.probed
                unhealthy = result.unhealthy
                self.log.info(
                    "shard %s/%s round %s: probed=%s unhealthy=%s confirmed=%s new=%s",
                    self.shard, self.shard_count, rounds, result.probed, result.unhealthy,
                    len(result.findings), len(result.new_findings),
                )
                done = bool(result.new_findings) or time.time() + self.interval >= self.deadline
                if done:
                    yield TriggerEvent({
                        "shard": self.shard,
                        "rounds": rounds,
                        "probes": probed,
                        "targets": len(targets),
                        "unhealthy": unhealthy,
                        "findings": [f.to_dict() for f in result.findings],
                        "new": len(result.new_findings),
                        "seconds": round(time.time() - started, 1),
                    })
                    return
                await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - round_started)))


class WaitHealthyTrigger(BaseTrigger):
    """Probe one resource every `interval` seconds until the check passes or `deadline` (epoch) passes."""

    def __init__(self, *, target: dict[str, Any], check: str, deadline: float, interval: float = 3.0,
                 probe_timeout: float = 3.0, healthy_needed: int = 1):
        super().__init__()
        self.target = target
        self.check = check
        self.deadline = deadline
        self.interval = interval
        self.probe_timeout = probe_timeout
        self.healthy_needed = healthy_needed

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "fleetmedic.airflow.triggers.WaitHealthyTrigger",
            {"target": self.target, "check": self.check, "deadline": self.deadline, "interval": self.interval,
             "probe_timeout": self.probe_timeout, "healthy_needed": self.healthy_needed},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from fleetmedic.detection.checks import Target, run_one

        target = Target(**self.target)
        probes = streak = 0
        while True:
            result = await run_one(target, self.check, self.probe_timeout)
            probes += 1
            streak = streak + 1 if result.healthy else 0
            if streak >= self.healthy_needed:
                yield TriggerEvent({"healthy": True, "probes": probes, "reason": result.reason})
                return
            if time.time() + self.interval >= self.deadline:
                yield TriggerEvent({"healthy": False, "probes": probes, "reason": result.reason})
                return
            await asyncio.sleep(self.interval)
