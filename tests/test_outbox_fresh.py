"""The SQLite outbox's fresh tail (agent/outbox.py begin()): the records put() just committed are handed out
from memory, not read back from the file. It must hand out exactly what the file holds: nothing from a
transaction that rolled back, nothing deleted, everything again after release(), all of a backlog past its
bounds, in seq order per priority."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from customs_edge.agent.outbox import SqliteOutbox
from customs_edge.core.records import Pending, Priority, RecordIn

COLUMNS = "seq, ts, boot_id, mono, type, priority, payload, prev"


@pytest.fixture
def ob(tmp_path: Path) -> Iterator[SqliteOutbox]:
    o = SqliteOutbox(tmp_path / "outbox.db")
    yield o
    o.close()


def recs(n: int, prio: Priority = Priority.EVENT, type_: str = "t") -> list[RecordIn]:
    return [RecordIn(type=type_, priority=prio, payload={"i": i, "w": i / 3}) for i in range(n)]


def in_file(ob: SqliteOutbox, seqs: list[int]) -> list[Pending]:
    """The rows as another connection reads them from the file."""
    db = sqlite3.connect(ob.path)
    try:
        return [Pending(*r) for r in db.execute(
            f"SELECT {COLUMNS} FROM records WHERE seq IN ({','.join(map(str, seqs))}) ORDER BY seq")]
    finally:
        db.close()


def reads(ob: SqliteOutbox) -> list[str]:
    """Trace the SELECTs of records the outbox's connection runs from now on."""
    seen: list[str] = []
    ob._db.set_trace_callback(lambda sql: seen.append(sql) if sql.startswith("SELECT seq, ts") else None)
    return seen


def test_records_just_put_are_handed_out_without_reading_the_file_and_equal_its_rows(ob: SqliteOutbox) -> None:
    assert ob.begin(100) == []  # caught up with the file: from now on the tail has every new record
    selects = reads(ob)
    ob.put(recs(5) + recs(2, Priority.ALERT))
    got = ob.begin(100)
    assert selects == []
    assert [r.seq for r in got] == [6, 7, 1, 2, 3, 4, 5]  # the highest priority first, as from the file
    assert sorted(got) == in_file(ob, [1, 2, 3, 4, 5, 6, 7])
    assert ob.begin(100) == []


def test_a_put_that_rolls_back_leaves_nothing_to_hand_out(ob: SqliteOutbox) -> None:
    ob.begin(10)
    ob._db.execute("CREATE TEMP TRIGGER boom BEFORE INSERT ON records WHEN NEW.type = 'boom'"
                   " BEGIN SELECT RAISE(ABORT, 'refused'); END")
    with pytest.raises(sqlite3.IntegrityError):
        ob.put(recs(3) + recs(1, type_="boom"))
    assert ob.begin(10) == []
    assert list(ob.put(recs(2))) == [1, 2]  # the seqs of the rolled-back put, given to other records
    assert ob.begin(10) == in_file(ob, [1, 2])


def test_release_hands_out_everything_again_from_the_file(ob: SqliteOutbox) -> None:
    ob.begin(10)
    ob.put(recs(4))
    first = ob.begin(10)
    ob.release()
    ob.put(recs(2))
    assert ob.begin(10) == first + in_file(ob, [5, 6])
    ob.put(recs(1))
    assert ob.begin(10) == in_file(ob, [7])


def test_records_deleted_before_they_were_handed_out_are_not_handed_out(ob: SqliteOutbox) -> None:
    ob.begin(10)
    ob.put(recs(6))
    assert ob.ack([(2, 3)]) == 2
    assert ob.reject([(5, 5)], "refused") == 1
    assert [r.seq for r in ob.begin(10)] == [1, 4, 6]


def test_a_backlog_past_the_bounds_is_read_from_the_file_in_order(ob: SqliteOutbox) -> None:
    ob.FRESH_MAX_RECORDS = 25
    ob.begin(10)
    for _ in range(4):
        ob.put(recs(10))
    assert ob._fresh_count == 0  # over its bound: forgotten, the file has them
    got = [r.seq for _ in range(6) for r in ob.begin(7)]
    assert got == list(range(1, 41))
    ob.put(recs(3))
    assert ob.begin(7) == in_file(ob, [41, 42, 43])


def test_a_batch_smaller_than_the_tail_leaves_the_rest_for_the_next_begin(ob: SqliteOutbox) -> None:
    ob.begin(10)
    ob.put(recs(10))
    assert [r.seq for r in ob.begin(4)] == [1, 2, 3, 4]
    assert [r.seq for r in ob.begin(4)] == [5, 6, 7, 8]
    ob.put(recs(1))
    assert [r.seq for r in ob.begin(4)] == [9, 10, 11]


def test_begin_beside_puts_and_acks_in_other_threads_hands_out_each_committed_record_once(ob: SqliteOutbox) -> None:
    """begin() takes the fresh tail under a lock of its own, while another thread's put() holds the connection
    through its commit: still each committed record exactly once, in seq order per priority, as the file has it,
    and nothing a put has not committed (here a put that rolls back now and then)."""
    ob.begin(10)
    ob._db.execute("CREATE TEMP TRIGGER boom BEFORE INSERT ON records WHEN NEW.type = 'boom'"
                   " BEGIN SELECT RAISE(ABORT, 'refused'); END")
    committed: list[int] = []
    done = threading.Event()

    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(120):
                if i % 10 == 0:
                    with pytest.raises(sqlite3.IntegrityError):
                        ob.put(recs(3) + recs(1, type_="boom"))
                committed.extend(ob.put(recs(7) + recs(i % 3, Priority.ALERT)))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=writer)
    t.start()
    got: list[Pending] = []
    acked: set[int] = set()
    while True:
        finished = done.is_set()  # then this begin() sees every commit: an empty batch means drained
        batch = ob.begin(50)
        assert all(r.type == "t" for r in batch)  # nothing of a put that rolled back
        got += batch
        if batch:  # a delete transaction between the puts, as the sync's acks make
            ob.ack([(batch[0].seq, batch[0].seq)])
            acked.add(batch[0].seq)
        elif finished:
            break
    t.join()
    assert errors == []
    assert sorted(r.seq for r in got) == sorted(committed)  # each committed record once
    for prio in (Priority.ALERT, Priority.EVENT):
        seqs = [r.seq for r in got if r.priority == prio]
        assert seqs == sorted(seqs)
    left = sorted(set(committed) - acked)
    assert in_file(ob, left) == sorted((r for r in got if r.seq not in acked), key=lambda r: r.seq)
