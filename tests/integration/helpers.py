"""Test helpers for integration tests: inventory rows, raw queries, and running calls on real threads at once."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row

T = TypeVar("T")

_names = itertools.count(1)


def query(dsn: str, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
    """Run one statement in its own committed transaction; the rows it returns, if any."""
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        cur = conn.execute(sql, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def add_server(dsn: str, name: str | None = None) -> int:
    rows = query(dsn, "INSERT INTO servers (name) VALUES (%s) RETURNING id", (name or f"server-{next(_names)}",))
    return int(rows[0]["id"])


def add_resource(
    dsn: str,
    name: str | None = None,
    *,
    kind: str = "postgres",
    role: str = "primary",
    host: str = "127.0.0.1",
    port: int = 5432,
    server_id: int | None = None,
) -> int:
    rows = query(
        dsn,
        "INSERT INTO resources (name, kind, role, host, port, server_id) VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
        (name or f"{kind}-{next(_names)}", kind, role, host, port, server_id),
    )
    return int(rows[0]["id"])


def add_resources(dsn: str, count: int, *, kind: str = "postgres") -> list[int]:
    return [add_resource(dsn, kind=kind, port=5400 + i) for i in range(count)]


def run_concurrently(count: int, work: Callable[[int], T], timeout: float = 60) -> list[T | BaseException]:
    """Run work(0..count-1) on `count` real threads released together; each result or the exception raised."""
    barrier = threading.Barrier(count)
    results: list[T | BaseException | None] = [None] * count

    def run(i: int) -> None:
        try:
            barrier.wait(timeout)
            results[i] = work(i)
        except BaseException as exc:  # collected and asserted on by the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), name=f"concurrent-{i}") for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), f"{t.name} still running after {timeout}s (deadlock?)"
    return results  # type: ignore[return-value]


def errors(results: Sequence[object]) -> list[BaseException]:
    return [r for r in results if isinstance(r, BaseException)]
