"""One contract for the hub's stores (hub/storage.py): every test runs against SQLite (hub/store.py) and
PostgreSQL (hub/store_pg.py, a throwaway cluster: tests/pg.py). Redeliveries dropped and counted, a reused
seq kept apart as a conflict, nothing the store cannot keep is acked, rejected records traced and gaps
named, health kept once, the hash chain verified, and two writers storing the same batches at once keep
each record once."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from customs_edge.agent.outbox import SqliteOutbox
from customs_edge.core.records import Pending, Priority, RecordIn
from customs_edge.core.signing import DeviceKey, parse_public, record_hash
from customs_edge.core.wire import encode_batch
from customs_edge.hub import intake
from customs_edge.hub import store as sqlite_store
from customs_edge.hub.storage import HubStorage, open_store

Factory = Callable[..., Any]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A factory of connections to one new, empty store (call it twice: two writers on one database)."""
    target = str(tmp_path / "hub.db") if request.param == "sqlite" else request.getfixturevalue("pg_url")
    opened: list[Any] = []

    def make(**kw: Any) -> HubStorage:
        st = open_store(target, **kw)
        opened.append(st)
        return st

    yield make
    for st in opened:
        st.close()


def count(st: Any, sql: str) -> int:
    """A count(*) query without parameters: the same SQL on both databases."""
    return int(st.db.execute(sql).fetchone()[0])


def batch(seqs: list[int], boot: str, batch_id: str = "b", device: str = "d1") -> intake.Incoming:
    recs = [Pending(s, 1.0, boot, float(s), "t", 1, json.dumps({"s": s, "boot": boot})) for s in seqs]
    return intake.parse(f"customs-edge/v1/{device}/records", encode_batch(device, batch_id, recs))


def acked(ranges: list[tuple[int, int]]) -> list[int]:
    return [s for lo, hi in ranges for s in range(lo, hi + 1)]


def test_redelivery_is_a_duplicate_and_a_reused_seq_is_a_conflict_kept_apart(new_store: Factory) -> None:
    st = new_store()
    (first,) = st.store([batch([1, 2, 3], "boot-a")])
    assert (first.stored, first.duplicates, first.ranges) == (3, 0, [(1, 3)])
    (again,) = st.store([batch([2, 3], "boot-a")])
    assert (again.stored, again.duplicates, again.conflicts) == (0, 2, [])
    (r,) = st.store([batch([2, 3, 4], "boot-b")])  # an outbox restored from an old image reuses 2 and 3
    assert acked(r.ranges) == [2, 3, 4]
    assert (r.stored, r.duplicates, r.conflicts, r.device_conflicts, r.boots) == (1, 0, [2, 3], 2,
                                                                                (["boot-a"], ["boot-b"]))
    (dev,) = st.stats()
    assert (dev.stored, dev.duplicates, dev.conflicts, dev.received, dev.max_seq, dev.gaps) == (4, 2, 2, 8, 4, 0)
    (resent,) = st.store([batch([2, 3], "boot-b")])  # the conflicting records resent: duplicates now
    assert (resent.stored, resent.duplicates, resent.conflicts) == (0, 2, [])
    assert count(st, "SELECT count(*) FROM conflicts") == 2 and count(st, "SELECT count(*) FROM records") == 4


def test_one_group_commit_sees_its_own_earlier_batches(new_store: Factory) -> None:
    """Batches of one device in one store() call (the hub's group commit): a later batch is compared with what
    an earlier one stored, and each result carries the device's conflicts as they stood after it."""
    st = new_store()
    out = st.store([batch([1, 2], "boot-a", "x"), batch([2, 3], "boot-a", "y"), batch([3, 4], "boot-b", "z"),
                    batch([3], "boot-b", "z2"), batch([7], "boot-a", "w", device="d2"), batch([5], "boot-b", "v")])
    assert [(s.device_id, s.stored, s.duplicates, s.conflicts, s.device_conflicts) for s in out] == [
        ("d1", 2, 0, [], 0), ("d1", 1, 1, [], 0), ("d1", 1, 0, [3], 1), ("d1", 0, 1, [], 1), ("d2", 1, 0, [], 0),
        ("d1", 1, 0, [], 1)]
    assert [(d.device_id, d.stored, d.duplicates, d.conflicts, d.received, d.max_seq, d.gaps) for d in st.stats()] \
        == [("d1", 5, 2, 1, 8, 5, 0), ("d2", 1, 0, 0, 1, 7, 6)]


def test_what_is_held_is_found_for_dense_and_sparse_seqs(new_store: Factory) -> None:
    """A batch's seqs are looked up by their range when dense (as an agent's batches are) and one by one when
    sparse: either way a resend is a duplicate, other content a conflict, and a held seq the batch does not
    carry (inside its range) is left out of its counts."""
    st = new_store()
    st.store([batch([1, 2, 3, 4], "boot-a")])
    (dense,) = st.store([batch([1, 3, 5], "boot-a")])  # the range 1-5 also holds 2 and 4
    assert (dense.stored, dense.duplicates, dense.conflicts, acked(dense.ranges)) == (1, 2, [], [1, 3, 5])
    (sparse,) = st.store([batch([2, 5000], "boot-b")])
    assert (sparse.stored, sparse.duplicates, sparse.conflicts) == (1, 0, [2])
    again, _ = st.store([batch([4, 9000], "boot-a"), batch([1, 2, 3], "boot-a", device="d2")])
    assert (again.stored, again.duplicates, again.conflicts) == (1, 1, [])
    assert [(d.device_id, d.stored, d.duplicates, d.conflicts, d.received) for d in st.stats()] == [
        ("d1", 7, 3, 1, 11), ("d2", 3, 0, 0, 3)]


def test_a_record_the_store_cannot_keep_is_never_acked(new_store: Factory) -> None:
    """SQLite's REAL NOT NULL refuses a NaN; PostgreSQL would take it without the CHECK constraint."""
    st = new_store()
    nan = intake.Incoming("d1", "b2", [(2, 1.0, "boot-a", float("nan"), "t", 1, "{}")], [])
    with pytest.raises(Exception, match=r"(?i)constraint|check|NOT NULL"):
        st.store([batch([1], "boot-a"), nan])
    assert count(st, "SELECT count(*) FROM records") == 0 and st.stats() == []  # rolled back whole


def test_a_bad_row_inside_a_large_batch_fails_it_whole(new_store: Factory) -> None:
    """Rows go in many to a statement (SQLite) or in one COPY (PostgreSQL): a row the store refuses in the
    middle of a large batch still fails the transaction, and a redelivered row beside it is still counted."""
    st = new_store()
    st.store([batch([1], "boot-a")])
    good = batch(list(range(1, 131)), "boot-a")
    rows = list(good.rows)
    rows[69] = (*rows[69][:3], float("nan"), *rows[69][4:])
    with pytest.raises(Exception, match=r"(?i)constraint|check|NOT NULL"):
        st.store([intake.Incoming("d1", "b2", rows, [], good.links)])
    assert count(st, "SELECT count(*) FROM records") == 1
    (s,) = st.store([good])
    assert (s.stored, s.duplicates) == (129, 1) and count(st, "SELECT count(*) FROM records") == 130


def test_rejected_records_are_traced_and_gaps_named(new_store: Factory) -> None:
    st = new_store()
    recs = [Pending(1, float("inf"), "b", 1.0, "t", 1, "{}"), Pending(2, 1.0, "b", 2.0, "t", 1, "{}"),
            Pending(5, 1.0, "b", 5.0, "t", 1, "{}"), Pending(9, 1.0, "b", 9.0, "t", 1, "{}")]
    b = intake.parse("customs-edge/v1/d1/records", encode_batch("d1", "x", recs))
    (s,) = st.store([b], {"malformed": 2})
    assert (s.ranges, s.rejected, s.stored) == ([(2, 2), (5, 5), (9, 9)], [(1, 1)], 3)
    st.store([], {"malformed": 1, "device_mismatch": 1})
    assert st.refused() == {"device_mismatch": 1, "malformed": 3}
    (dev,) = st.stats()
    assert (dev.received, dev.stored, dev.rejected, dev.max_seq, dev.gaps) == (4, 3, 1, 9, 5)
    assert st.gap_ranges("d1") == [(3, 4), (6, 8)]
    assert count(st, "SELECT count(*) FROM rejected") == 1


def test_status_and_health_are_kept_once_and_trimmed(new_store: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "HEALTH_KEPT", 3)
    st = new_store()
    st.set_status("u2", "online")
    msgs = [("u1", float(t), json.dumps({"t": t})) for t in range(6)]
    assert st.put_health(msgs[:2], {}) == 2
    assert st.put_health(msgs, {"u3": 2}) == 4  # the first two again (a retained copy): skipped
    assert [json.loads(p)["t"] for _, p in st.health_history("u1")] == [5, 4, 3]  # the HEALTH_KEPT latest
    st.set_status("u1", "offline")
    fleet = {r.device_id: r for r in st.fleet()}
    assert sorted(fleet) == ["u1", "u2", "u3"]
    assert (fleet["u1"].status, json.loads(fleet["u1"].health or "null"), fleet["u1"].last_seen is not None) == \
        ("offline", {"t": 5}, True)
    assert (fleet["u2"].status, fleet["u2"].health, fleet["u3"].health_refused) == ("online", None, 2)
    st.set_status("u2", "online", "gate", "port-a")
    st.set_status("u2", "offline")  # a last will names neither: the last known ones stay
    assert st.db.execute("SELECT status, unit_type, site FROM devices WHERE device_id = 'u2'").fetchone() == \
        ("offline", "gate", "port-a")


def chained(tmp_path: Path, n: int) -> list[intake.Incoming]:
    """Batches of a real outbox's records (hash-chained), as the hub's intake makes them."""
    ob = SqliteOutbox(tmp_path / "agent" / "outbox.db", device_id="d1")
    ob.put([RecordIn(type="w", priority=Priority.EVENT, payload={"n": i, "f": 0.1, "s": "é \x01"}) for i in range(n)])
    out = []
    while recs := ob.begin(7):
        out.append(intake.parse("customs-edge/v1/d1/records", encode_batch("d1", f"b{len(out)}", recs)))
        ob.ack([(recs[0].seq, recs[-1].seq)])
    ob.close()
    return out


def test_verify_proves_a_chain_and_names_an_altered_record(new_store: Factory, tmp_path: Path) -> None:
    st = new_store()
    batches = chained(tmp_path, 30)
    st.store(batches[1:])
    v = st.verify("d1")
    assert (v.bad_seq, v.reason) == (1, "seqs 1-7 are missing and no tombstone names them")
    st.store(batches[:1])
    v = st.verify("d1")
    assert (v.records, v.bad_seq) == (30, None)
    st.db.execute("UPDATE records SET payload = '{\"n\": 999}' WHERE device_id = 'd1' AND seq = 12")
    v = st.verify("d1")
    assert (v.bad_seq, v.reason) == (12, "its content does not match its chain hash: altered in this database")


def run(st: Any, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
    """One statement with `?` placeholders on either database; its rows (none for a write)."""
    pg = not isinstance(st, sqlite_store.HubStore)
    cur = st.db.execute(sql.replace("?", "%s") if pg else sql, args)
    return list(cur.fetchall()) if cur.description else []


def recompute_chain(st: Any, device: str, start: int) -> None:
    """What an attacker with write access to the database does after editing a record: every chain hash from
    `start` on recomputed from the content, every link after it rewritten, so that the chain walk holds."""
    rows = run(st, "SELECT seq, ts, type, priority, payload, prev FROM records WHERE device_id = ? AND seq >= ?"
                   " ORDER BY seq", (device, start))
    prev = rows[0][5]
    for seq, ts, type_, prio, payload, _ in rows:
        h = record_hash(prev, seq, ts, type_, prio, payload)
        run(st, "UPDATE records SET prev = ?, h = ? WHERE device_id = ? AND seq = ?", (prev, h, device, seq))
        prev = h


def test_kept_batch_signatures_find_an_edit_that_recomputed_the_chain(new_store: Factory, tmp_path: Path) -> None:
    """The chain walk proves the stored history consistent, not authentic: an edit that recomputes every hash
    after it passes. The batch signatures verified on arrival, kept with the hashes they cover, are checked
    under the device's registered key (`hub verify --keys`): that edit, an added record, an edited signature
    hash all fail, at the first seq concerned."""
    key = DeviceKey.load_or_create(tmp_path / "d1.key")
    public = parse_public(key.public)
    ob = SqliteOutbox(tmp_path / "agent" / "outbox.db", device_id="d1")
    ob.put([RecordIn(type="w", priority=Priority.EVENT, payload={"n": i}) for i in range(20)])
    batches = []
    while recs := ob.begin(6):
        batches.append(intake.parse("customs-edge/v1/d1/records", encode_batch("d1", f"b{len(batches)}", recs, key),
                                    {"d1": public}))
        ob.ack([(recs[0].seq, recs[-1].seq)])
    ob.close()
    st = new_store()
    st.store(batches[:2])
    st.store(batches[:2] + batches[2:])  # a redelivery keeps one copy of each signature
    v = st.verify("d1", public)
    assert (v.bad_seq, v.records, v.signed_batches, v.signed, v.unsigned) == (None, 20, 4, 20, 0)
    assert count(st, "SELECT count(*) FROM signatures") == 4
    assert st.verify("d1").signed_batches == 0  # without the key: the chain walk alone
    assert st.verify("d1", public, all_signed=True).bad_seq is None

    # the first batch's kept signature deleted: its records count as from before the device was registered, unless
    # every record must be signed
    run(st, "DELETE FROM signatures WHERE device_id = 'd1' AND batch = 'b0'")
    v = st.verify("d1", public)
    assert (v.bad_seq, v.signed_batches, v.signed, v.unsigned) == (None, 3, 14, 6)
    assert st.verify("d1", public, all_signed=True).bad_seq == 1
    st.store(batches[:1])  # its redelivery keeps the signature again
    assert st.verify("d1", public, all_signed=True).bad_seq is None

    # a record added after the last, linked to it (and the device's max_seq raised to match)
    (last_h,) = run(st, "SELECT h FROM records WHERE device_id = 'd1' AND seq = 20")[0]
    payload = '{"n":99}'
    run(st, "INSERT INTO records (device_id, seq, ts, boot_id, mono, type, priority, payload, received_at, prev, h)"
            " VALUES ('d1', 21, 1.0, 'x', 1.0, 'w', 2, ?, 1.0, ?, ?)",
        (payload, last_h, record_hash(last_h, 21, 1.0, "w", 2, payload)))
    run(st, "UPDATE devices SET max_seq = 21 WHERE device_id = 'd1'")
    assert st.verify("d1").bad_seq is None
    v = st.verify("d1", public)
    assert (v.bad_seq, v.signed) == (21, 20) and "no kept signature covers it" in v.reason
    run(st, "DELETE FROM records WHERE device_id = 'd1' AND seq = 21")
    run(st, "UPDATE devices SET max_seq = 20 WHERE device_id = 'd1'")

    # a record's content edited, and the chain recomputed from it on
    run(st, "UPDATE records SET payload = ? WHERE device_id = 'd1' AND seq = 9", ('{"n":999}',))
    assert st.verify("d1").bad_seq == 9
    recompute_chain(st, "d1", 9)
    assert st.verify("d1").bad_seq is None  # consistent again: the walk alone cannot tell
    v = st.verify("d1", public)
    assert (v.bad_seq, v.signed) == (9, 8) and "no kept signature covers it" in v.reason

    # ... and the kept hashes edited to match: the signature over them no longer verifies
    (text,) = run(st, "SELECT hashes FROM signatures WHERE device_id = 'd1' AND batch = 'b1'")[0]
    fixed = {q: h for q, h in run(st, "SELECT seq, h FROM records WHERE device_id = 'd1'")}
    run(st, "UPDATE signatures SET hashes = ? WHERE device_id = 'd1' AND batch = 'b1'",
        (json.dumps([[q, fixed[q]] for q, _ in json.loads(text)]),))
    v = st.verify("d1", public)
    assert v.bad_seq == 7 and "kept signature of batch 'b1' does not verify" in v.reason


def test_two_writers_storing_the_same_batches_keep_each_record_once(new_store: Factory) -> None:
    """Two hub workers handed the same batches (a resend after an ack timeout reaches the other worker while
    the first is still storing): every seq stored once, the other copy counted a redelivery; a quarantined record
    of each batch (an implausible seq) kept and counted once, named rejected to both."""
    writers = [new_store(), new_store()]
    devices = [f"d{i}" for i in range(4)]
    far = 10**12  # past the default max_seq_jump
    work = [[batch([*range(k * 50 + 1, k * 50 + 51), far + k], "boot-a", f"b{k}", d) for k in range(6)
             for d in devices] for _ in writers]
    for w in work[1]:
        w.rows.reverse()
    work[1].reverse()  # the other order: locks taken in device order never deadlock
    results: list[list[Any]] = [[], []]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            for k in range(0, len(work[i]), 3):  # group commits of three batches
                results[i] += writers[i].store(work[i][k:k + 3])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sum(s.stored for r in results for s in r) == 4 * 300
    assert sum(s.duplicates for r in results for s in r) == 4 * 300
    assert all(acked(s.ranges) == sorted(range(acked(s.ranges)[0], acked(s.ranges)[-1] + 1)) for r in results
               for s in r)
    assert count(writers[0], "SELECT count(*) FROM records") == 1200
    assert count(writers[0], "SELECT count(*) FROM conflicts") == 0
    assert [(d.device_id, d.stored, d.duplicates, d.received, d.gaps, d.suspect) for d in writers[1].stats()] == \
        [(d, 300, 300, 600, 0, 6) for d in devices]
    assert sorted(len(s.suspect) for r in results for s in r) == [0] * 24 + [1] * 24
    assert all(acked(s.rejected) == s.suspect + s.suspect_resent == [far + int(s.batch[1:])] for r in results
               for s in r)
    assert count(writers[0], "SELECT count(*) FROM suspect") == 24


@pytest.mark.postgres
def test_an_implausible_seq_jump_is_quarantined_not_stored(new_store: Factory) -> None:
    """A seq more than max_seq_jump past the device's highest (held, or named by an earlier batch of the same
    group commit) is kept in `suspect`, named as rejected in the ack, and left out of max_seq and gaps."""
    st = new_store(max_seq_jump=1000)
    st.store([batch([1, 2], "boot-a", "a")])
    far = 2**63 - 1  # one record at the top of the seq range would otherwise report 9.2e18 gaps
    first, second = st.store([batch([3, 1003, far], "boot-a", "b"), batch([2003, 4000], "boot-a", "c")])
    assert (acked(first.ranges), acked(first.rejected), first.suspect) == ([3, 1003], [far], [far])
    # the second batch is judged against the first's plausible seqs (1003), stored in the same transaction
    assert (acked(second.ranges), acked(second.rejected), second.suspect) == ([2003], [4000], [4000])
    (d,) = st.stats()
    assert (d.stored, d.max_seq, d.suspect, d.received, d.gaps) == (5, 2003, 2, 5, 2003 - 5)
    assert count(st, "SELECT count(*) FROM suspect") == 2 and count(st, "SELECT max(seq) FROM records") == 2003
    assert st.store([batch([2004], "boot-a", "d")])[0].suspect == []  # the device goes on from its plausible seqs


def test_a_resent_quarantined_record_is_named_again_not_kept_or_counted_again(new_store: Factory) -> None:
    """The ack that named a quarantined record rejected was lost, and the unit resends its batch: the record is named
    rejected again (the unit dead-letters it) but neither kept nor counted again, in a later transaction, in the
    same group commit or by another writer. Another content under that seq is kept and counted, once."""
    st = new_store(max_seq_jump=1000)
    st.store([batch([1], "boot-a", "a")])
    (first,) = st.store([batch([2, 5000], "boot-a", "b")])
    assert (acked(first.rejected), first.suspect, first.suspect_resent) == ([5000], [5000], [])
    (again,) = st.store([batch([2, 5000], "boot-a", "b")])  # the same batch resent
    assert (acked(again.ranges), acked(again.rejected), again.suspect, again.suspect_resent, again.duplicates) == \
        ([2], [5000], [], [5000], 1)
    assert (st.stats()[0].suspect, count(st, "SELECT count(*) FROM suspect")) == (1, 1)
    # another content under the suspect seq (another boot's record) is evidence: kept and counted; its copy in the
    # same group commit is a resend
    other, copy = st.store([batch([5000], "boot-b", "c"), batch([5000], "boot-b", "c")])
    assert (other.suspect, other.suspect_resent, copy.suspect, copy.suspect_resent) == ([5000], [], [], [5000])
    assert acked(copy.rejected) == [5000]
    (late,) = new_store(max_seq_jump=1000).store([batch([5000], "boot-a", "b")])  # another writer (worker)
    assert (acked(late.rejected), late.suspect, late.suspect_resent) == ([5000], [], [5000])
    (d,) = st.stats()
    assert (d.suspect, d.stored, d.max_seq, d.gaps) == (2, 2, 2, 0)
    assert (count(st, "SELECT count(*) FROM suspect"), count(st, "SELECT count(DISTINCT boot_id) FROM suspect")) == \
        (2, 2)


def test_a_wrong_postgres_url_is_a_clear_error_and_creates_nothing(pg_url: str) -> None:
    from customs_edge.core.errors import CustomsEdgeError
    from customs_edge.hub.store_pg import PgHubStore

    with pytest.raises(CustomsEdgeError, match="is not a hub database"):
        open_store(pg_url, readonly=True)  # an empty database: `hub stats` never makes it a hub database
    st = PgHubStore(pg_url)
    assert st.stats() == []
    st.close()
    closed = "postgresql://postgres@127.0.0.1:1/none"
    with pytest.raises(CustomsEdgeError, match=r"cannot connect to the hub database .*check the PostgreSQL URL"):
        open_store(closed, readonly=True)


@pytest.mark.postgres
def test_a_broken_postgres_connection_fails_one_store_and_the_next_reconnects(pg_url: str) -> None:
    """A database restart or failover: the store that meets it raises (nothing acked), the next one reconnects."""
    import psycopg

    from customs_edge.hub.store_pg import PgHubStore

    st = PgHubStore(pg_url)
    st.store([batch([1], "boot-a")])
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (st.db.info.backend_pid,))
    with pytest.raises(psycopg.OperationalError):
        st.store([batch([2], "boot-a")])
    (s,) = st.store([batch([2, 3], "boot-a")])
    assert (s.stored, st.stats()[0].stored) == (2, 3)
    st.close()
