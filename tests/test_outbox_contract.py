"""The outbox contract, run against every Outbox implementation (SQLite with FULL and NORMAL, memory).
What only a file can do (restarts, the cap, disk space, locks, durability) is in test_outbox_sqlite.py."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from customs_edge.agent.outbox import (
    DEAD_LETTERS_KEPT,
    DEAD_PAYLOAD_CHARS,
    DeadLetter,
    MemoryOutbox,
    Outbox,
    SqliteOutbox,
)
from customs_edge.core.records import Priority, RecordIn

IMPLEMENTATIONS = ["sqlite-FULL", "sqlite-NORMAL", "memory"]


@pytest.fixture(params=IMPLEMENTATIONS)
def ob(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqliteOutbox | MemoryOutbox]:
    impl: SqliteOutbox | MemoryOutbox
    if request.param == "memory":
        impl = MemoryOutbox(device_id="dev-1")
    else:
        impl = SqliteOutbox(tmp_path / "outbox.db", device_id="dev-1", synchronous=request.param.split("-")[1])
    yield impl
    impl.close()


def recs(n: int, prio: Priority = Priority.EVENT, size: int = 10) -> list[RecordIn]:
    return [RecordIn(type="t", priority=prio, payload={"i": i, "pad": "x" * size}) for i in range(n)]


def unchecked(**fields: Any) -> RecordIn:
    """A record as a buggy app could hand one over, bypassing RecordIn's validation."""
    return RecordIn.model_construct(**{"type": "t", "priority": Priority.EVENT, "ts": 1.7e9, "payload": {}, **fields})


def seqs(ob: Outbox) -> list[int]:
    ob.release()
    return [r.seq for r in ob.begin(100_000)]


def test_every_implementation_has_the_protocols_methods_with_its_signatures(ob: Outbox) -> None:
    methods = [n for n, v in vars(Outbox).items() if inspect.isfunction(v) and not n.startswith("_")]
    assert {"put", "begin", "ack", "reject", "release", "stats", "close"} <= set(methods)
    for name in methods:
        impl = getattr(type(ob), name, None)
        assert callable(impl), f"{type(ob).__name__} has no {name}()"
        assert inspect.signature(impl) == inspect.signature(getattr(Outbox, name)), f"{type(ob).__name__}.{name}"


def test_seqs_are_contiguous_and_never_reused_after_deletion(ob: Outbox) -> None:
    assert list(ob.put(recs(3))) == [1, 2, 3]
    assert ob.ack([(1, 3)]) == 3  # all gone: a plain rowid would start again at 1
    assert list(ob.put(recs(2))) == [4, 5]
    assert ob.stats().last_seq == 5


def test_begin_hands_out_each_record_once_until_release(ob: Outbox) -> None:
    ob.put(recs(10))
    a = ob.begin(4)
    b = ob.begin(100)
    assert [r.seq for r in a] == [1, 2, 3, 4] and [r.seq for r in b] == list(range(5, 11))
    assert ob.begin(10) == []
    ob.ack([(1, 4)])
    assert seqs(ob) == list(range(5, 11))


def test_higher_priority_first_and_oldest_first_within_one(ob: Outbox) -> None:
    ob.put(recs(3, Priority.TELEMETRY))
    ob.put(recs(2, Priority.ALERT))
    ob.put(recs(2, Priority.REPORT))
    ob.put(recs(1, Priority.ALERT))
    got = ob.begin(6)
    assert [(r.seq, r.priority) for r in got] == [(4, 3), (5, 3), (8, 3), (6, 2), (7, 2), (1, 0)]


def test_ack_is_idempotent_and_exact(ob: Outbox) -> None:
    ob.put(recs(10))
    assert ob.ack([(2, 4), (8, 8)]) == 4
    assert ob.ack([(2, 4)]) == 0
    assert ob.ack([(100, 200)]) == 0
    assert ob.ack([(6, 7), (5, 6), (7, 6)]) == 3  # overlapping ranges count each record once; (7, 6) is empty
    assert seqs(ob) == [1, 9, 10]


def test_payload_round_trips_as_json_text(ob: Outbox) -> None:
    ob.put([RecordIn(type="scan", payload={"code": "]C10109506000134352", "ok": True, "v": [1.5, None]})])
    (r,) = ob.begin(1)
    assert r.payload == '{"code":"]C10109506000134352","ok":true,"v":[1.5,null]}'
    assert r.type == "scan" and r.boot_id and r.mono > 0


def test_a_record_that_cannot_be_stored_is_a_dead_letter_and_its_neighbours_are_committed(ob: Outbox) -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop  # cannot be encoded as JSON
    batch = [RecordIn(type="ok", payload={"n": 1}), unchecked(ts=math.nan), RecordIn(type="ok", payload={"n": 2}),
             unchecked(ts=math.inf), unchecked(type="loop", payload=loop), unchecked(priority=7),
             unchecked(type="bytes", payload={"blob": b"\xff" * 5000}), RecordIn(type="ok", payload={"n": 3})]
    committed = ob.put(batch)
    assert list(committed) == [1, 2, 3]
    assert [r.payload for r in ob.begin(10)] == ['{"n":1}', '{"n":2}', '{"n":3}']
    st = ob.stats()
    assert st.dead_letters == {"bad_ts": 2, "bad_payload": 2, "bad_priority": 1} and st.pending == 3
    dead = {d.type: d for d in dead_letters(ob)}
    assert dead["loop"].seq is None and dead["loop"].reason == "bad_payload" and "Circular" in dead["loop"].detail
    assert len(dead["bytes"].payload) == DEAD_PAYLOAD_CHARS  # the payload's text, cut
    assert list(ob.put(recs(1))) == [4]  # the bad ones took no seq: the hub sees no gap


def test_reject_moves_records_to_dead_letters_counted_by_reason(ob: Outbox) -> None:
    ob.put([RecordIn(type=f"t{i}", payload={"i": i}) for i in range(1, 6)])
    assert ob.reject([(2, 3)], "schema: weight missing") == 2
    assert ob.reject([(2, 3)], "schema: weight missing") == 0
    assert seqs(ob) == [1, 4, 5]
    st = ob.stats()
    assert st.dead_letters == {"schema: weight missing": 2} and st.pending == 3 and st.acked_seq == 3
    assert [(d.seq, d.type, d.payload) for d in dead_letters(ob)] == [(3, "t3", '{"i":3}'), (2, "t2", '{"i":2}')]


def test_dead_letters_keep_the_newest_and_count_them_all(ob: Outbox) -> None:
    ob.put([unchecked(ts=math.nan, payload={"i": i}) for i in range(DEAD_LETTERS_KEPT + 5)])
    kept = dead_letters(ob, limit=10 * DEAD_LETTERS_KEPT)
    assert len(kept) == DEAD_LETTERS_KEPT and kept[0].payload == f'{{"i":{DEAD_LETTERS_KEPT + 4}}}'
    assert ob.stats().dead_letters == {"bad_ts": DEAD_LETTERS_KEPT + 5}


def test_app_state_commits_with_the_records_and_alone(ob: Outbox) -> None:
    assert ob.load_state("lot") is None
    ob.put(recs(2), state=("lot", b"\x00lot-1"))
    assert ob.load_state("lot") == b"\x00lot-1"
    assert ob.put([], state=("lot", b"lot-2")) == range(0)
    ob.put(recs(1), state=("lane", b"7"))
    assert (ob.load_state("lot"), ob.load_state("lane")) == (b"lot-2", b"7")
    assert ob.stats().pending == 3


def test_pending_is_counted_per_priority(ob: Outbox) -> None:
    ob.put(recs(4, Priority.TELEMETRY) + recs(3, Priority.EVENT) + recs(2, Priority.ALERT))  # seqs 1-9
    ob.ack([(1, 2), (8, 8)])
    ob.reject([(5, 5)], "bad")
    st = ob.stats()
    assert st.pending_by_priority == {"telemetry": 2, "event": 2, "report": 0, "alert": 1} and st.pending == 5


def test_the_seq_floor_keeps_new_seqs_above_what_the_hub_holds(ob: Outbox) -> None:
    ob.put(recs(2))
    ob.raise_seq_floor(1000)
    assert list(ob.put(recs(1))) == [1001]
    ob.raise_seq_floor(10)  # lower: no change
    assert list(ob.put(recs(1))) == [1002]
    assert ob.stats().last_seq == 1002 and ob.stats().acked_seq == 1000


def test_acked_seq_is_the_highest_seq_the_hub_settled(ob: Outbox) -> None:
    ob.put(recs(10))
    assert ob.stats().acked_seq == 0
    ob.ack([(1, 3)])
    ob.reject([(5, 5)], "bad")
    ob.ack([(2, 2)])
    assert ob.stats().acked_seq == 5


def dead_letters(ob: Outbox, limit: int = 100) -> list[DeadLetter]:
    assert isinstance(ob, SqliteOutbox | MemoryOutbox)
    return ob.dead_letters(limit)
