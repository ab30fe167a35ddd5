"""Detection benchmarks, printed as ratios against a baseline measured in the same run.

1. Sweep throughput: fleetmedic's probe round (run_checks + bulk health write + confirmation rules)
   against a bare asyncio loop of the same client calls (connect, SELECT 1) on the same servers.
   Target: >= 0.7x the bare loop's probes per second.
2. Opening/refreshing incidents for N findings (open_or_refresh_many) against COPY of the same rows
   (incidents and their 'opened' events) into the same tables. Target: within 5x.
3. Evaluating confirmation rules over 1M `health` rows. Target: under 10 s; shown against a bare
   Python loop that only reads the same fields.

Run: .venv/bin/python bench/bench_detection.py [--servers 4] [--rounds 20] [--findings 100000]
Machines here are shared and noisy: each measurement is the best of several repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from fleetmedic.db.migrate import migrate
from fleetmedic.detection.checks import Target, run_checks
from fleetmedic.detection.sweep import DetectRule, HealthRow, confirmed_findings, load_targets, probe_round
from fleetmedic.incidents.store import Finding, IncidentStore
from fleetmedic.localfleet.services import PostgresCluster, free_port

RULE = DetectRule("resource_down", "postgres.connect", 2, 10.0, "critical", ("postgres",))


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


async def bare_round(targets: list[Target], concurrency: int) -> int:
    """The same client calls as postgres.connect, with nothing around them."""
    sem = asyncio.Semaphore(concurrency)

    async def one(t: Target) -> None:
        async with sem:
            conn = await psycopg.AsyncConnection.connect(t.conninfo(3), autocommit=True)
            try:
                await (await conn.execute("SELECT 1")).fetchone()
            finally:
                await conn.close()

    await asyncio.gather(*(one(t) for t in targets))
    return len(targets)


def bench_sweep(ops: PostgresCluster, fleet: list[PostgresCluster], per_server: int, rounds: int) -> None:
    dsn = ops.dsn("bench_sweep")
    ops.create_database("bench_sweep")
    migrate(dsn)
    with psycopg.connect(dsn) as conn:
        for i in range(per_server * len(fleet)):
            c = fleet[i % len(fleet)]
            conn.execute("INSERT INTO resources (name, kind, host, port) VALUES (%s, 'postgres', '127.0.0.1', %s)",
                         (f"r{i}", c.port))
    targets: list[Target] = []

    async def load() -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as aconn:
            targets.extend(await load_targets(aconn, 0, 1))

    asyncio.run(load())
    concurrency = 20

    async def fleetmedic_rounds() -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as aconn:
            for _ in range(rounds):
                await probe_round(aconn, targets, [RULE], timeout=3, concurrency=concurrency)

    async def checks_only_rounds() -> None:
        for _ in range(rounds):
            await run_checks([(t, "postgres.connect") for t in targets], timeout=3, concurrency=concurrency)

    async def bare_rounds() -> None:
        for _ in range(rounds):
            await bare_round(targets, concurrency)

    probes = len(targets) * rounds
    print(f"sweep: {len(targets)} targets on {len(fleet)} PostgreSQL servers, {rounds} rounds, "
          f"concurrency {concurrency}", flush=True)
    bare = best_of(3, lambda: asyncio.run(bare_rounds()))
    checks = best_of(3, lambda: asyncio.run(checks_only_rounds()))
    full = best_of(3, lambda: asyncio.run(fleetmedic_rounds()))
    print(f"  bare asyncio loop          {probes / bare:8.0f} probes/s")
    print(f"  run_checks                 {probes / checks:8.0f} probes/s   ratio {bare / checks:.2f}x of bare")
    print(f"  probe_round (+health, rules){probes / full:7.0f} probes/s   ratio {bare / full:.2f}x of bare "
          f"(target >= 0.70)")


def bench_incidents(ops: PostgresCluster, n: int) -> None:
    dsn = ops.dsn("bench_incidents")
    ops.create_database("bench_incidents")
    migrate(dsn)
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO resources (name, kind, host, port) "
                     "SELECT 'r' || g, 'postgres', '127.0.0.1', 5432 FROM generate_series(1, %s) g", (n,))
        ids = [r[0] for r in conn.execute("SELECT id FROM resources ORDER BY id").fetchall()]
    findings = [Finding(rid, "resource_down", "postgres.connect failed 2 times over 10s: cannot connect")
                for rid in ids]
    store = IncidentStore(dsn)

    def copy_rows() -> None:
        # The same rows into the same tables (same indexes and constraints), with no logic at all.
        reset()
        with psycopg.connect(dsn) as conn, conn.cursor() as cur:
            with cur.copy("COPY incidents (id, resource_id, type, state, reason) FROM STDIN") as cp:
                for i, f in enumerate(findings, 1):
                    cp.write_row((i, f.resource_id, f.type, "open", f.reason))
            with cur.copy("COPY incident_events (id, incident_id, to_state, version, actor, reason) "
                          "FROM STDIN") as cp:
                for i, f in enumerate(findings, 1):
                    cp.write_row((i, i, "open", 1, "detection:bench", f.reason))

    def reset() -> None:
        with psycopg.connect(dsn) as conn:
            conn.execute("TRUNCATE incidents, incident_events, pages RESTART IDENTITY CASCADE")

    print(f"incidents: {n} findings", flush=True)
    copy_t = best_of(3, copy_rows)
    reset()
    open_times = []
    refresh_times = []
    for _ in range(2):
        reset()
        t0 = time.perf_counter()
        store.open_or_refresh_many(findings, actor="detection:bench")
        open_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        store.open_or_refresh_many(findings, actor="detection:bench")
        refresh_times.append(time.perf_counter() - t0)
    opened, refreshed = min(open_times), min(refresh_times)
    print(f"  COPY of the same rows      {copy_t:6.2f} s")
    print(f"  open (all new)             {opened:6.2f} s   ratio {opened / copy_t:.2f}x of COPY (target <= 5)")
    print(f"  refresh (all existing)     {refreshed:6.2f} s   ratio {refreshed / copy_t:.2f}x of COPY (target <= 5)")


def bench_rules(n: int) -> None:
    now = datetime.now(UTC)
    rows = [
        HealthRow(i, "postgres.connect", i % 10 != 0, "reason", now, (i % 10 == 0) * (i % 4),
                  (now - timedelta(seconds=i % 30)) if i % 10 == 0 else None)
        for i in range(n)
    ]

    def bare() -> int:
        count = 0
        for r in rows:
            if not r.healthy and r.first_failure_at is not None and r.consecutive_failures >= 2:
                count += 1
        return count

    print(f"rules: {n} health rows", flush=True)
    bare_t = best_of(3, bare)
    rules_t = best_of(3, lambda: confirmed_findings(rows, [RULE]))
    found = len(confirmed_findings(rows, [RULE]))
    print(f"  bare loop over the fields  {bare_t:6.2f} s")
    print(f"  confirmed_findings         {rules_t:6.2f} s   ratio {rules_t / bare_t:.2f}x of bare; "
          f"{found} confirmed (target: under 10 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=4, help="PostgreSQL servers to probe")
    parser.add_argument("--per-server", type=int, default=25, help="inventory resources per server")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--findings", type=int, default=100_000)
    parser.add_argument("--health-rows", type=int, default=1_000_000)
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="fleetmedic-bench-"))
    os.chmod(base, 0o755)
    ops = PostgresCluster(base / "ops", free_port(), settings={"max_connections": "300"})
    fleet = [PostgresCluster(base / f"pg{i}", free_port(), settings={"max_connections": "300"})
             for i in range(args.servers)]
    try:
        print(f"starting {args.servers + 1} PostgreSQL servers in {base}", flush=True)
        ops.start()
        for c in fleet:
            c.start()
        bench_sweep(ops, fleet, args.per_server, args.rounds)
        bench_incidents(ops, args.findings)
        bench_rules(args.health_rows)
    finally:
        for c in [*fleet, ops]:
            c.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
