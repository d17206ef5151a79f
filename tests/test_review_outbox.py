"""Review of the SQLite outbox's fresh tail and waiting deletes (agent/outbox.py): what a line-by-line reading
suspected, shown deterministically (a full disk simulated by a delete that raises SQLite's own message; threads
paused on events, no sleeps)."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from customs_edge.agent.outbox import SqliteOutbox
from customs_edge.core.records import Priority, RecordIn

DONE = "waiting deletes done: disk space is back"


@pytest.fixture
def ob(tmp_path: Path) -> Iterator[SqliteOutbox]:
    o = SqliteOutbox(tmp_path / "outbox.db")
    yield o
    o.close()


def recs(n: int, prio: Priority = Priority.EVENT) -> list[RecordIn]:
    return [RecordIn(type="t", priority=prio, payload={"i": i}) for i in range(n)]


def disk_full_for(ob: SqliteOutbox, monkeypatch: pytest.MonkeyPatch, full: set[int]) -> None:
    """ob's delete transactions raise a full disk (SQLite's message) for ranges starting at a seq in `full`."""
    real = ob._delete

    def delete(ranges: list[tuple[int, int]], reason: str | None) -> int:
        if ranges[0][0] in full:
            raise sqlite3.OperationalError("database or disk is full")
        return real(ranges, reason)

    monkeypatch.setattr(ob, "_delete", delete)


def test_done_is_logged_only_once_every_waiting_delete_is_done(ob: SqliteOutbox, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Two acks wait for disk space; the retry does the first and finds the disk full again for the second: the
    log must not say the waiting deletes are done while one still waits (it once said so after each one)."""
    ob.put(recs(10))
    ob.begin(10)
    full = {1, 3}
    disk_full_for(ob, monkeypatch, full)
    assert ob.ack([(1, 2)]) == 2
    ob._retry_at = 0.0
    assert ob.ack([(3, 4)]) == 2
    assert ob.stats().awaiting_delete == 4
    full.discard(1)  # the first waiting delete succeeds, the second finds the disk full again
    ob._retry_at = 0.0
    with caplog.at_level(logging.INFO, logger="customs_edge.agent.outbox"):
        assert ob.stats().awaiting_delete == 2
        assert [r for r in caplog.records if r.getMessage() == DONE] == []
        full.clear()
        ob._retry_at = 0.0
        assert ob.stats().awaiting_delete == 0
    assert [r.getMessage() for r in caplog.records].count(DONE) == 1
    ob.release()
    assert [r.seq for r in ob.begin(10)] == [5, 6, 7, 8, 9, 10]


def test_begin_beside_a_put_paused_in_its_transaction_and_after_its_commit(ob: SqliteOutbox,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """begin() in the sync's thread while a put in another holds the connection: nothing of the put's open
    transaction, nothing of it before it joined the tail, then each of its records once, in order."""
    assert ob.begin(10) == []  # caught up: the fast path from now on
    ob.put(recs(2))
    assert [r.seq for r in ob.begin(1)] == [1]
    in_tx, committed, go_commit, go_join = (threading.Event() for _ in range(4))
    real_insert, real_add = ob._insert, ob._add_fresh

    def insert(rows: list[tuple[float, str, float, str, int, str]]) -> int:
        last = real_insert(rows)
        in_tx.set()
        assert go_commit.wait(10)
        return last

    def add_fresh() -> None:
        committed.set()
        assert go_join.wait(10)
        real_add()

    monkeypatch.setattr(ob, "_insert", insert)
    monkeypatch.setattr(ob, "_add_fresh", add_fresh)
    t = threading.Thread(target=ob.put, args=(recs(3) + recs(1, Priority.ALERT),))
    t.start()
    assert in_tx.wait(10)
    assert [r.seq for r in ob.begin(10)] == [2]  # the tail only: the put's rows are not committed yet
    go_commit.set()
    assert committed.wait(10)
    assert ob.begin(10) == []  # committed, not yet in the tail: left for the next begin, not lost
    go_join.set()
    t.join(10)
    assert [r.seq for r in ob.begin(10)] == [6, 3, 4, 5]  # the alert first, then the bulk, in seq order
    assert ob.begin(10) == []
