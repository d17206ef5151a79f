"""Review of the SQLite outbox's fresh tail and waiting deletes (agent/outbox.py): what a line-by-line reading
suspected, shown deterministically (a full disk simulated by a delete that raises SQLite's own message; threads
paused on events, no sleeps)."""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from customs_edge.agent.outbox import SqliteOutbox
from customs_edge.core.records import Pending, Priority, RecordIn

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


def key(r: Pending) -> tuple[object, ...]:
    """What both outboxes agree on: a tombstone's hashes cover stamps that differ between them."""
    if r.type == "tombstone":
        return r.seq, r.priority, r.type, [run[:2] for run in json.loads(r.payload)["runs"]]
    return r.seq, r.priority, r.type, r.payload


def test_the_fresh_tail_hands_out_what_a_read_of_the_file_would_over_random_operations(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Differential: the same random puts (some rolled back), begins, acks, rejects (some finding the disk full),
    cap drops (with their tombstones), releases and restarts on two outboxes, one of which never keeps a tail
    (it reads every record back from its file, as before the tail): each begin() hands out the same records."""
    rng = random.Random(20261203)
    paths = [tmp_path / "tail.db", tmp_path / "file.db"]
    obs = [SqliteOutbox(p, synchronous="NORMAL") for p in paths]
    full: set[int] = set()

    def setup(o: SqliteOutbox, i: int) -> None:
        if i == 1:
            o.FRESH_MAX_RECORDS = -1  # every tail forgotten at once: begin() always reads the file
        else:
            o.FRESH_MAX_RECORDS = 60  # small, so the bound is crossed now and then
        o._db.execute("CREATE TEMP TRIGGER boom BEFORE INSERT ON records WHEN NEW.type = 'boom'"
                      " BEGIN SELECT RAISE(ABORT, 'refused'); END")
        disk_full_for(o, monkeypatch, full)

    for i, o in enumerate(obs):
        setup(o, i)
    prios = list(Priority)
    out: list[set[int]] = [set(), set()]
    try:
        for step in range(1500):
            op = rng.random()
            if op < 0.40:
                batch = [RecordIn(type="t", priority=rng.choice(prios), payload={"s": step, "k": k})
                         for k in range(rng.randint(1, 12))]
                if rng.random() < 0.05:
                    batch.append(RecordIn(type="boom", payload={}))
                got = []
                for o in obs:
                    try:
                        got.append(list(o.put(batch)))
                    except sqlite3.IntegrityError:
                        got.append(None)
                assert got[0] == got[1]
            elif op < 0.65:
                n = rng.randint(1, 25)
                handed = [[key(r) for r in o.begin(n)] for o in obs]
                assert handed[0] == handed[1], f"step {step}"
                for s in out:
                    s.update(h[0] for h in handed[0])
            elif op < 0.80:
                if not out[0]:
                    continue
                lo = rng.choice(sorted(out[0]))
                hi = lo + rng.randint(0, 5)
                if rng.random() < 0.2:
                    full.add(lo)
                elif rng.random() < 0.3:
                    full.clear()
                    for o in obs:
                        o._retry_at = 0.0
                if rng.random() < 0.2:
                    assert obs[0].reject([(lo, hi)], "bad") == obs[1].reject([(lo, hi)], "bad")
                else:
                    assert obs[0].ack([(lo, hi)]) == obs[1].ack([(lo, hi)])
            elif op < 0.92:
                rows = obs[1]._db.execute("SELECT seq FROM records WHERE priority < ? ORDER BY seq DESC LIMIT 40",
                                          (int(Priority.ALERT),)).fetchall()  # the newest: in the tail or not
                seqs = sorted(rng.sample([s for (s,) in rows], min(rng.randint(1, 8), len(rows))))
                if seqs:
                    for o in obs:
                        with o._lock:
                            o._write(partial(o._drop, seqs))
            elif op < 0.98:
                for o in obs:
                    o.release()
                for s in out:
                    s.clear()
            else:  # a restart: the waiting deletes are lost with the process (a resend, deduped by the hub)
                full.clear()
                for o in obs:
                    o.close()
                monkeypatch.undo()
                obs = [SqliteOutbox(p, synchronous="NORMAL") for p in paths]
                for i, o in enumerate(obs):
                    setup(o, i)
                for s in out:
                    s.clear()
        full.clear()
        for o in obs:
            o._retry_at = 0.0
            o.release()
        rest = [[key(r) for r in o.begin(100_000)] for o in obs]
        assert rest[0] == rest[1]
    finally:
        for o in obs:
            o.close()
