"""Evidence-grade records: the outbox's hash chain, signed batches, forgeries refused and counted at the hub,
tombstones for cap drops, and `customs-edge hub verify` naming the first seq where a history is not intact."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from customs_edge.agent.config import SyncConfig
from customs_edge.agent.outbox import SqliteOutbox
from customs_edge.agent.sync import Sync
from customs_edge.core.records import Priority, RecordIn
from customs_edge.core.signing import DeviceKey, SigningError, record_hash
from customs_edge.core.wire import Ack, chain_hashes, encode_batch
from customs_edge.hub.brokers import Mosquitto
from customs_edge.hub.service import Hub, HubConfig
from tests.conftest import wait_for
from tests.fleet import HubThread

DEV = "scale-ev1"
TOPIC = f"customs-edge/v1/{DEV}/records"
# values whose JSON text must hash the same on the unit (as stored) and at the hub (re-serialized on arrival)
ODD = {"f": 0.1, "big": 1e300, "tiny": 5e-324, "neg": -0.0, "i": 2**62, "s": "é ü 中 \x01 \"q\" \\", "nan": None,
       "nested": {"l": [1, 2.5, [True, False, None]], "empty": {}}}


def recs(n: int, prio: Priority = Priority.EVENT, size: int = 20) -> list[RecordIn]:
    return [RecordIn(type="weighing", priority=prio, payload={"n": i, "pad": "x" * size, **ODD}) for i in range(n)]


def registry(tmp_path: Path, *keys: tuple[str, DeviceKey]) -> Path:
    p = tmp_path / "keys.txt"
    p.write_text("# hub key registry\n" + "".join(f"{d} {k.public}\n" for d, k in keys))
    return p


def make_hub(tmp_path: Path, key: DeviceKey, **kw: object) -> Hub:
    return Hub(HubConfig(port=1, db=tmp_path / "hub.db", keys=registry(tmp_path, (DEV, key)), **kw))


def deliver(ob: SqliteOutbox, hub: Hub, key: DeviceKey | None) -> int:
    """Everything pending in `ob`, signed batch by batch, through the hub's message handling; acks applied."""
    n = 0
    while batch := ob.begin(100):
        outs = hub.handle([(TOPIC, encode_batch(DEV, f"b{n}", batch, key))])
        acks = [Ack.model_validate_json(o.payload) for o in outs if o.topic.endswith("/ack")]
        assert len(acks) == 1, "a genuine batch is acked"
        ob.ack(acks[0].ranges)
        n += 1
    return n


def verify(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "customs_edge", "hub", "verify", *args, "--db", str(db)],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def key(tmp_path: Path) -> DeviceKey:
    return DeviceKey.beside(tmp_path / "agent" / "outbox.db")


@pytest.fixture
def filled(tmp_path: Path, key: DeviceKey) -> Path:
    """A hub database holding seqs 1-30 of DEV, delivered signed, its hub closed."""
    ob = SqliteOutbox(tmp_path / "agent" / "outbox.db", device_id=DEV)
    ob.put(recs(30))
    hub = make_hub(tmp_path, key)
    deliver(ob, hub, key)
    hub.store.close()
    ob.close()
    return tmp_path / "hub.db"


# -- the key --------------------------------------------------------------------------------------------
def test_the_device_key_is_made_once_private_and_printable(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox.db"
    cfg = tmp_path / "unit.yaml"
    cfg.write_text(f"device_id: {DEV}\ntype: scale\noutbox: {{path: {outbox}}}\n"
                   "drivers: {scale: {driver: toledo-continuous, port: /dev/ttyUSB0}}\n")
    res = subprocess.run([sys.executable, "-m", "customs_edge", "key", str(cfg)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    keyfile = Path(f"{outbox}.key")
    assert os.stat(keyfile).st_mode & 0o777 == 0o600
    assert res.stdout.strip() == f"{DEV} {DeviceKey.beside(outbox).public}"  # the same key when read again
    keyfile.chmod(0o644)
    with pytest.raises(SigningError, match="chmod 600"):
        DeviceKey.beside(outbox)


# -- signed delivery, forgeries --------------------------------------------------------------------------
@pytest.mark.broker
def test_signed_delivery_end_to_end_then_verify_ok(tmp_path: Path, mosquitto: Mosquitto) -> None:
    path = tmp_path / "agent" / "outbox.db"
    ob = SqliteOutbox(path, device_id=DEV)
    sync = Sync(DEV, ob, SyncConfig(port=mosquitto.port, batch_max_records=25), outbox_path=path)
    key = DeviceKey.beside(path)  # made by Sync on its start
    hub = HubThread(mosquitto.port, tmp_path / "hub.db", keys=registry(tmp_path, (DEV, key)),
                    require_signatures=True).start()
    stop = threading.Event()
    t = threading.Thread(target=sync.run, args=(stop,), daemon=True)
    t.start()
    try:
        ob.put(recs(120))
        wait_for(lambda: ob.stats().pending == 0 and sync.stats.records_acked == 120, 30, "the hub's acks")
        assert hub.hub.refused == {}
    finally:
        stop.set()
        t.join(10)
        hub.stop()
        ob.close()
    res = verify(tmp_path / "hub.db", DEV)
    assert res.returncode == 0 and f"{DEV}: OK, 120 records" in res.stdout, res.stdout + res.stderr


def tamper(raw: bytes, how: str) -> bytes:
    msg = json.loads(raw)
    if how == "payload":
        msg["records"][3]["payload"]["n"] = 999
    elif how == "batch id":
        msg["batch"] = "another-batch"
    elif how == "unsigned":
        del msg["sig"], msg["key"]
    return json.dumps(msg).encode()


@pytest.mark.parametrize("how", ["wrong key", "payload", "batch id", "unsigned"])
def test_a_forged_batch_is_refused_counted_and_not_acked(tmp_path: Path, key: DeviceKey, how: str) -> None:
    ob = SqliteOutbox(tmp_path / "agent" / "outbox.db", device_id=DEV)
    ob.put(recs(10))
    hub = make_hub(tmp_path, key)
    batch = ob.begin(10)
    signer = DeviceKey.load_or_create(tmp_path / "other.key") if how == "wrong key" else key
    forged = tamper(encode_batch(DEV, "b1", batch, signer), how)
    assert hub.handle([(TOPIC, forged)]) == []  # no ack: the device keeps its records
    kind = "unsigned" if how == "unsigned" else "forged"
    assert hub.refused == {kind: 1} and hub.store.refused() == {kind: 1}
    assert hub.store.db.execute("SELECT count(*) FROM records").fetchone() == (0,)
    (ack,) = hub.handle([(TOPIC, encode_batch(DEV, "b1", batch, key))])  # the genuine batch still goes through
    assert Ack.model_validate_json(ack.payload).ranges == [(1, 10)]


def test_unregistered_devices_are_refused_only_where_signatures_are_required(tmp_path: Path,
                                                                             key: DeviceKey) -> None:
    ob = SqliteOutbox(tmp_path / "agent" / "outbox.db", device_id=DEV)
    ob.put(recs(2))
    batch = ob.begin(10)
    other = "scale-other"
    lax = Hub(HubConfig(port=1, db=tmp_path / "lax.db", keys=registry(tmp_path, (other, key))))
    assert len(lax.handle([(TOPIC, encode_batch(DEV, "b", batch))])) == 1  # an older, unsigned agent: stored
    strict = Hub(HubConfig(port=1, db=tmp_path / "strict.db", keys=tmp_path / "keys.txt", require_signatures=True))
    assert strict.handle([(TOPIC, encode_batch(DEV, "b", batch, key))]) == []
    assert strict.refused == {"unsigned": 1}


def test_a_batch_signs_the_chain_hashes_its_records_hash_to(tmp_path: Path, key: DeviceKey) -> None:
    """The signer takes a record's hash from its successor's `prev` where that follows in the batch; every
    hash must still be the one its content hashes to: a run, a gap (priorities), the end, an unchained record."""
    ob = SqliteOutbox(tmp_path / "agent" / "outbox.db", device_id=DEV)
    ob.put(recs(4) + recs(3, Priority.ALERT) + recs(4))  # begin() hands out 5-7 first, then 1-4 and 8-11
    batch = ob.begin(100)
    assert [r.seq for r in batch] == [5, 6, 7, 1, 2, 3, 4, 8, 9, 10, 11]
    unchained = batch[0]._replace(prev=None)
    for records in (batch, [unchained, *batch[1:]], batch[3:6]):
        assert chain_hashes(records) == [record_hash(r.prev or "", r.seq, r.ts, r.type, r.priority, r.payload)
                                         for r in records]
    hub = make_hub(tmp_path, key)
    (ack,) = hub.handle([(TOPIC, encode_batch(DEV, "b", batch, key))])
    assert Ack.model_validate_json(ack.payload).ranges == [(1, 11)]


def test_records_sharing_a_stamp_hash_and_encode_as_each_alone(tmp_path: Path, key: DeviceKey) -> None:
    """The outbox's chain and encode_batch format a float once for the records that share it (one reading's
    stamp, one commit's mono): every hash and wire number must be the record's own. 0.0 and -0.0 are equal
    and print apart."""
    stamp = 1_700_000_000.123456
    stamps = [stamp, stamp, 0.0, -0.0, -0.0, 0.0, stamp + 1e-6]
    ob = SqliteOutbox(tmp_path / "agent" / "outbox.db", device_id=DEV)
    assert ob.begin(10) == []  # caught up: the next begin hands out the rows as put() made them
    ob.put([RecordIn(type="weighing", ts=ts, payload={"n": i}) for i, ts in enumerate(stamps)])
    batch = ob.begin(10)
    assert batch[0].ts is batch[1].ts and batch[0].mono is batch[-1].mono  # shared objects, as in the bench
    for before, rec in itertools.pairwise(batch):
        assert rec.prev == record_hash(before.prev or "", before.seq, before.ts, before.type, before.priority,
                                       before.payload)
    wire = json.loads(encode_batch(DEV, "b", batch, key))["records"]
    assert [repr(r["ts"]) for r in wire] == [repr(ts) for ts in stamps]
    (ack,) = make_hub(tmp_path, key).handle([(TOPIC, encode_batch(DEV, "b", batch, key))])
    assert Ack.model_validate_json(ack.payload).ranges == [(1, 7)]  # the signature holds over the hub's hashes
    ob.close()


# -- hub verify -----------------------------------------------------------------------------------------
def test_verify_is_ok_on_an_intact_store(filled: Path) -> None:
    res = verify(filled)
    assert res.returncode == 0 and f"{DEV}: OK, 30 records, 0 dropped" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("sql, bad", [
    ("UPDATE records SET payload = replace(payload, '\"n\":11', '\"n\":12') WHERE seq = 12", 12),
    ("UPDATE records SET payload = replace(payload, '\"n\":29', '\"n\":1') WHERE seq = 30", 30),  # the newest
    ("DELETE FROM records WHERE seq = 7", 7),
    ("DELETE FROM records WHERE seq >= 28", 28),  # the newest ones
    ("UPDATE records SET ts = ts + 1 WHERE seq = 5", 5),
    ("UPDATE records SET payload = '{}', prev = NULL, h = NULL WHERE seq = 9", 9),  # passed off as unchained
])
def test_verify_names_the_first_bad_seq(filled: Path, sql: str, bad: int) -> None:
    with sqlite3.connect(filled) as db:
        assert db.execute(sql).rowcount >= 1
    res = verify(filled, DEV)
    assert res.returncode == 1 and f"{DEV}: BAD at seq {bad}:" in res.stdout, res.stdout + res.stderr


def test_a_rewritten_hash_is_caught_by_the_next_records_link(filled: Path) -> None:
    with sqlite3.connect(filled) as db:  # an editor who rewrites seq 12 and its stored hash to match
        prev, ts, type_, prio = db.execute("SELECT prev, ts, type, priority FROM records WHERE seq = 12").fetchone()
        db.execute("UPDATE records SET payload = '{}', h = ? WHERE seq = 12",
                   (record_hash(prev, 12, ts, type_, prio, "{}"),))
    res = verify(filled)
    assert res.returncode == 1 and "BAD at seq 13: its link does not match seq 12" in res.stdout, res.stdout


def test_the_kept_signatures_catch_an_edit_that_recomputed_every_hash_after_it(filled: Path, key: DeviceKey,
                                                                                  tmp_path: Path) -> None:
    keys = str(registry(tmp_path, (DEV, key)))
    res = verify(filled, "--keys", keys)
    assert res.returncode == 0 and "signatures: 1 batches, 30 records signed, 0 before them" in res.stdout, res.stdout
    with sqlite3.connect(filled) as db:  # seq 12 edited, every chain hash and link from it on rewritten to match
        prev = db.execute("SELECT prev FROM records WHERE seq = 12").fetchone()[0]
        for seq, ts, type_, prio, payload in db.execute("SELECT seq, ts, type, priority, payload FROM records"
                                                        " WHERE seq >= 12 ORDER BY seq").fetchall():
            payload = '{"n":0}' if seq == 12 else payload
            h = record_hash(prev, seq, ts, type_, prio, payload)
            db.execute("UPDATE records SET payload = ?, prev = ?, h = ? WHERE seq = ?", (payload, prev, h, seq))
            prev = h
    assert verify(filled).returncode == 0  # the chain alone holds
    res = verify(filled, DEV, "--keys", keys)
    assert res.returncode == 1 and f"{DEV}: BAD at seq 12: no kept signature covers it" in res.stdout, res.stdout


def test_a_deleted_kept_signature_is_found_with_all_signed(filled: Path, key: DeviceKey, tmp_path: Path) -> None:
    keys = str(registry(tmp_path, (DEV, key)))
    assert verify(filled, "--keys", keys, "--all-signed").returncode == 0
    with sqlite3.connect(filled) as db:  # every record kept, its batch's signature gone
        assert db.execute("DELETE FROM signatures").rowcount == 1
    res = verify(filled, "--keys", keys)  # records before any kept signature: unsigned, as a device registered late
    assert res.returncode == 0 and "0 batches, 0 records signed, 30 before them" in res.stdout, res.stdout
    res = verify(filled, "--keys", keys, "--all-signed")
    assert res.returncode == 1 and f"{DEV}: BAD at seq 1: no kept signature covers it (--all-signed" in res.stdout, \
        res.stdout
    res = verify(filled, "--all-signed")
    assert res.returncode == 2 and "give the key registry with --keys" in res.stderr, res.stderr


def test_a_cap_drop_leaves_a_tombstone_and_verify_still_passes(tmp_path: Path, key: DeviceKey) -> None:
    ob = SqliteOutbox(tmp_path / "agent" / "outbox.db", device_id=DEV, max_mb=0.3)
    hub = make_hub(tmp_path, key)
    ob.put(recs(20))
    deliver(ob, hub, key)  # 1-20 at the hub
    ob.put(recs(20, Priority.ALERT) + recs(400, Priority.TELEMETRY, size=900) + recs(40, size=200))
    ob.enforce_cap()
    n = ob.stats().dropped["dropped.telemetry"]
    assert n > 100 and ob.stats().dropped == {"dropped.telemetry": n}  # over the cap: the oldest telemetry went
    deliver(ob, hub, key)
    hub.store.close()
    db = tmp_path / "hub.db"
    res = verify(db)
    assert res.returncode == 0 and f"OK, {480 - n + len(tombstones(db))} records, {n} dropped" in res.stdout, \
        res.stdout + res.stderr
    res = verify(db, "--keys", str(registry(tmp_path, (DEV, key))))  # tombstones are signed like any record
    assert res.returncode == 0 and f"{480 - n + len(tombstones(db))} records signed, 0 before them" in res.stdout, \
        res.stdout
    shutil.copy(db, tmp_path / "copy.db")
    with sqlite3.connect(tmp_path / "copy.db") as c:  # without its tombstone, the gap is unexplained
        c.execute("DELETE FROM records WHERE type = 'tombstone'")
    res = verify(tmp_path / "copy.db")
    assert res.returncode == 1 and "BAD at seq 41: seqs 41-" in res.stdout, res.stdout


def tombstones(db: Path) -> list[str]:
    with sqlite3.connect(db) as c:
        return [p for (p,) in c.execute("SELECT payload FROM records WHERE type = 'tombstone'")]


def test_a_record_the_hub_rejects_keeps_the_chain_verifiable(tmp_path: Path, key: DeviceKey) -> None:
    ob = SqliteOutbox(tmp_path / "agent" / "outbox.db", device_id=DEV)
    ob.put([*recs(3), RecordIn(type="big", payload={"x": "y" * 70000}), *recs(3)])  # seq 4: over 64 KiB
    hub = make_hub(tmp_path, key)
    deliver(ob, hub, key)
    hub.store.close()
    res = verify(tmp_path / "hub.db", "--keys", str(registry(tmp_path, (DEV, key))))
    assert res.returncode == 0 and "OK, 6 records, 0 dropped (tombstones), 1 rejected" in res.stdout, res.stdout
    assert "6 records signed, 0 before them" in res.stdout, res.stdout
