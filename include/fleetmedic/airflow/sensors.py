"""Sensors over the fleet: one deferred sensor per shard of the inventory."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from fleetmedic.airflow.connections import OPS_CONN_ID, ops_dsn
from fleetmedic.airflow.triggers import ProbeShardTrigger

__all__ = ["FleetProbeSensor"]


class FleetProbeSensor(BaseSensorOperator):
    """Probe one shard of the fleet every `interval` seconds for up to `window` seconds.

    It defers at once, so no worker slot is held while it waits: the probes run in the triggerer.
    It completes early when a new incident is confirmed, so the sweep can start its playbook.

    :param shard: this shard's number, 0 <= shard < shard_count (resources with id % shard_count == shard)
    :param shard_count: how many shards the inventory is split into
    :param rules: the playbooks' detect rules (`DetectRule.to_dict()`)
    :param window: seconds to keep probing when nothing new is found
    :param interval: seconds between probe rounds
    :param probe_timeout: seconds before a probe that does not answer counts as failed
    :param concurrency: probes in flight at once
    """

    template_fields = ("shard", "shard_count")
    ui_color = "#c4b5fd"

    def __init__(self, *, shard: int, shard_count: int, rules: list[dict[str, Any]], window: float = 45.0,
                 interval: float = 5.0, probe_timeout: float = 3.0, concurrency: int = 50,
                 conn_id: str = OPS_CONN_ID, **kwargs: Any):
        kwargs.setdefault("timeout", timedelta(seconds=window + 120))
        super().__init__(**kwargs)
        self.shard = shard
        self.shard_count = shard_count
        self.rules = rules
        self.window = window
        self.interval = interval
        self.probe_timeout = probe_timeout
        self.concurrency = concurrency
        self.conn_id = conn_id

    def _trigger(self, deadline: float) -> ProbeShardTrigger:
        return ProbeShardTrigger(
            shard=int(self.shard), shard_count=int(self.shard_count), rules=self.rules, deadline=deadline,
            interval=self.interval, probe_timeout=self.probe_timeout, concurrency=self.concurrency,
            conn_id=self.conn_id,
        )

    def execute(self, context: Any) -> None:
        self.defer(
            trigger=self._trigger(time.time() + self.window),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.window + 60),
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        self.log.info(
            "shard %s: %s probes in %s rounds over %ss, %s unhealthy now, %s confirmed (%s new)",
            event.get("shard"), event.get("probes"), event.get("rounds"), event.get("seconds"),
            event.get("unhealthy"), len(event.get("findings", [])), event.get("new"),
        )
        return event

    def poke(self, context: Any) -> PokeReturnValue:
        """One probe round without deferring (for `dag.test()` and debugging)."""
        import psycopg

        from fleetmedic.detection.sweep import DetectRule, load_targets, probe_round

        async def one_round() -> dict[str, Any]:
            rules = [DetectRule.from_dict(r) for r in self.rules]
            async with await psycopg.AsyncConnection.connect(ops_dsn(self.conn_id)) as aconn:
                targets = await load_targets(aconn, int(self.shard), int(self.shard_count))
                rr = await probe_round(aconn, targets, rules, timeout=self.probe_timeout,
                                       concurrency=self.concurrency)
            return {"shard": self.shard, "rounds": 1, "probes": rr.probed, "targets": len(targets),
                    "unhealthy": rr.unhealthy, "findings": [f.to_dict() for f in rr.findings],
                    "new": len(rr.new_findings), "seconds": 0}

        return PokeReturnValue(is_done=True, xcom_value=asyncio.run(one_round()))
