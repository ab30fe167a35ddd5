"""Who blocks whom: the sessions automation may act on are the heads of the lock queues, never their victims."""

from __future__ import annotations

from fleetmedic.actions.queries import Blocker, protected_reason
from fleetmedic.detection.probes.queries import describe_blocking, picture_from_rows


def _row(pid, blockers, waited, user="app_user", query="UPDATE t SET n = n + 1"):
    return (pid, user, blockers, waited, query)


def test_a_queued_victim_that_blocks_later_arrivals_is_not_a_root():
    # 100 holds the lock; 200 waits on it; 300 queued after 200 waits on both.
    picture = picture_from_rows([_row(200, [100], 30.0), _row(300, [100, 200], 20.0)], threshold=10)
    assert [b.pid for b in picture.long_blocked] == [200, 300]
    assert picture.root_blockers() == [100]
    assert picture.longest_wait == 30.0


def test_sessions_under_the_threshold_are_not_blocked_yet():
    picture = picture_from_rows([_row(200, [100], 4.0)], threshold=10)
    assert picture.long_blocked == [] and picture.root_blockers() == []
    assert picture.longest_wait == 4.0


def test_a_lock_cycle_has_no_root():
    picture = picture_from_rows([_row(1, [2], 30.0), _row(2, [1], 30.0)], threshold=10)
    assert picture.root_blockers() == []
    assert "none (a deadlock?)" in describe_blocking(picture)


def test_two_independent_queues_have_two_roots():
    picture = picture_from_rows([_row(11, [10], 15.0), _row(21, [20], 12.0), _row(22, [21], 11.0)], threshold=10)
    assert picture.root_blockers() == [10, 20]
    text = describe_blocking(picture)
    assert text.startswith("3 session(s) blocked longer than 10s: pid 11 (app_user) waiting 15s on pid(s) 10")
    assert "also blocked: pid(s) 21, 22" in text and "head of the queue: pid(s) 10, 20" in text


def _blocker(**kw):
    base = {"pid": 7, "usename": "app_user", "backend_type": "client backend", "state": "idle in transaction",
            "superuser": False, "xact_seconds": 42.0, "query": "LOCK TABLE t"}
    return Blocker(**{**base, **kw})


def test_superusers_replication_and_listed_users_are_protected():
    assert protected_reason(_blocker(), set()) is None
    assert "superuser session" in (protected_reason(_blocker(superuser=True, usename="postgres"), set()) or "")
    assert "walsender process" in (protected_reason(_blocker(backend_type="walsender"), set()) or "")
    assert "attrs.protected_users" in (protected_reason(_blocker(usename="batch"), {"batch"}) or "")
