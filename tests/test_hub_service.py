"""The hub against a real mosquitto: each record validated on its own, redeliveries and conflicts told
apart by content, conflicts alerted, and the messages it refuses whole."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from customs_edge.core.logs import LogfmtFormatter
from customs_edge.core.wire import MAX_PAYLOAD_BYTES
from customs_edge.hub.brokers import Mosquitto
from tests.conftest import wait_for
from tests.fleet import HubThread, rec, records_msg

pytestmark = pytest.mark.broker

PREFIX = "customs-edge/v1"


class Operator:
    """A paho client: publishes as an agent would, collects what the hub publishes."""

    def __init__(self, port: int) -> None:
        self.c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        self.got: list[tuple[str, bytes, bool]] = []
        self.subacked: set[int] = set()
        self.c.on_message = lambda _c, _u, m: self.got.append((m.topic, bytes(m.payload), bool(m.retain)))
        self.c.on_subscribe = lambda _c, _u, mid, *_: self.subacked.add(mid)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        wait_for(self.c.is_connected, 10, "the test client's CONNACK")

    def sub(self, topic: str) -> None:
        _, mid = self.c.subscribe(topic, 1)
        wait_for(lambda: mid in self.subacked, 10, f"SUBACK for {topic}")

    def pub(self, topic: str, payload: str | bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(10)

    def json(self, topic: str) -> list[Any]:
        return [json.loads(p) for t, p, _ in self.got if t == topic]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def hub(tmp_path: Path, mosquitto: Mosquitto) -> Any:
    h = HubThread(mosquitto.port, tmp_path / "hub.db", client_id="hub-t").start()
    yield h
    h.stop()


@pytest.fixture
def op(mosquitto: Mosquitto) -> Any:
    o = Operator(mosquitto.port)
    o.sub(f"{PREFIX}/+/ack")
    yield o
    o.close()


def held(db: Path, device_id: str, seq: int) -> list[dict[str, Any]]:
    """Every version of (device_id, seq) the hub holds, stored or kept as a conflict, as sent on the wire."""
    con = sqlite3.connect(db)
    try:
        return [{"seq": seq, "ts": ts, "boot": boot, "mono": mono, "type": t, "prio": p, "payload": json.loads(pl)}
                for ts, boot, mono, t, p, pl in con.execute(
                    "SELECT ts, boot_id, mono, type, priority, payload FROM records WHERE device_id=?1 AND seq=?2"
                    " UNION ALL SELECT ts, boot_id, mono, type, priority, payload FROM conflicts"
                    " WHERE device_id=?1 AND seq=?2", (device_id, seq))]
    finally:
        con.close()


def test_a_record_that_fails_validation_is_rejected_alone_and_its_neighbours_are_stored(
        tmp_path: Path, hub: HubThread, op: Operator) -> None:
    t = f"{PREFIX}/dev-p/records"
    # messages refused whole, first: not JSON, no device_id, records not a list, another device's records
    op.pub(t, b"{broken")
    op.pub(t, json.dumps({"v": 1, "batch": "x", "records": [rec(1)]}))
    op.pub(t, json.dumps({"v": 1, "device_id": "dev-p", "batch": "x", "records": {"seq": 1}}))
    op.pub(t, records_msg("dev-q", "x", [rec(1)]))
    poison = [rec(1), rec(2, mono=float("nan")), rec(3, ts=float("inf")), rec(4, prio=7),
              rec(5, payload={"blob": "x" * MAX_PAYLOAD_BYTES}), rec(6, type=5), rec(7, payload=[1, 2]), rec(8),
              rec("nine"), rec(10, payload={"v": [1.0, float("-inf")]}), rec(11, ts=True)]
    op.pub(t, records_msg("dev-p", "b-1", poison))
    op.pub(t, records_msg("dev-p", "b-2", poison))  # resent: the agent had not handled the ack yet
    wait_for(lambda: len(op.got) >= 2, 20, "two acks")
    expected = {"v": 1, "batch": "b-1", "ranges": [[1, 1], [8, 8]], "stored": 2, "duplicates": 0,
                "rejected": [[2, 7], [10, 11]]}
    acks = op.json(f"{PREFIX}/dev-p/ack")
    assert all(abs(a.pop("ts") - time.time()) < 60 for a in acks)  # the hub's clock: agents estimate their offset
    assert acks == [expected, expected | {"batch": "b-2", "stored": 0, "duplicates": 2}]
    assert [topic for topic, _, _ in op.got] == [f"{PREFIX}/dev-p/ack"] * 2  # nothing acked for refused messages
    for seq in (1, 8):
        assert held(tmp_path / "hub.db", "dev-p", seq) == [poison[seq - 1]]
    assert hub.hub.refused == {"malformed": 3, "device_mismatch": 1}
    assert hub.hub.store.refused() == {"malformed": 3, "device_mismatch": 1}
    (st,) = hub.hub.store.stats()
    assert (st.received, st.stored, st.duplicates, st.rejected, st.conflicts) == (22, 2, 2, 18, 0)
    assert (st.max_seq, st.gaps, hub.hub.store.gap_ranges("dev-p")) == (11, 1, [(9, 9)])  # "nine" never came
    trace = {seq: (reason, raw) for seq, reason, raw in hub.hub.store.db.execute(
        "SELECT seq, reason, raw FROM rejected WHERE device_id='dev-p' AND seq IS NOT NULL")}
    reasons = {seq: reason for seq, (reason, _) in trace.items()}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 10, 11]
    for seq, words in {2: ("mono", "finite"), 3: ("ts", "finite"), 4: ("prio", "3"),
                       5: ("payload", str(MAX_PAYLOAD_BYTES)), 6: ("type", "string"), 7: ("payload", "dict"),
                       10: ("payload", "non-finite"), 11: ("ts", "number")}.items():
        assert all(w in reasons[seq] for w in words), (seq, reasons[seq])
    assert '"mono":NaN' in trace[2][1] and len(trace[5][1]) == 500
    unnamed = hub.hub.store.db.execute("SELECT reason, raw FROM rejected WHERE seq IS NULL").fetchall()
    assert len(unnamed) == 2 and all(r.startswith("seq:") and '"seq":"nine"' in raw for r, raw in unnamed)


def test_every_acked_record_is_held_with_the_content_sent(tmp_path: Path, hub: HubThread, op: Operator) -> None:
    t = f"{PREFIX}/dev-x/records"
    sent = {
        "b-1": [rec(1, payload={"a": 1}), rec(2, payload={"a": 1})],
        "b-2": [rec(1, payload={"a": 2})],  # seq 1 again, same boot and mono, other payload: a conflict
        "b-3": [rec(3, payload={"a": float("nan")})],  # never stored as null: rejected
        "b-4": [rec(4, payload={"x": 1}), rec(4, payload={"x": 2})],  # one seq twice in one batch
        "b-5": [rec(1, payload={"a": 2})],  # b-2 resent: a redelivery of the conflict
        "b-6": [rec(2, payload={"a": 1}, type="u")],  # seq 2 again, only its type differs: a conflict
    }
    for batch, records in sent.items():
        op.pub(t, records_msg("dev-x", batch, records))
    wait_for(lambda: len(op.got) >= len(sent), 20, "an ack per batch")
    acks = {a["batch"]: a for a in op.json(f"{PREFIX}/dev-x/ack")}
    for batch, records in sent.items():
        for lo, hi in acks[batch]["ranges"]:
            for seq in range(lo, hi + 1):
                for r in (r for r in records if r["seq"] == seq):
                    assert r in held(tmp_path / "hub.db", "dev-x", seq), f"{batch} acked seq {seq} it does not hold"
    assert [(acks[b]["stored"], acks[b]["duplicates"], acks[b]["rejected"]) for b in sent] == [
        (2, 0, []), (0, 0, []), (0, 0, [[3, 3]]), (1, 0, []), (0, 1, []), (0, 0, [])]
    assert held(tmp_path / "hub.db", "dev-x", 3) == []
    (st,) = hub.hub.store.stats()
    assert (st.received, st.stored, st.duplicates, st.conflicts, st.rejected) == (8, 3, 1, 3, 1)


def test_a_seq_conflict_is_logged_counted_and_alerted_retained(tmp_path: Path, hub: HubThread, op: Operator,
                                                               mosquitto: Mosquitto,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    t = f"{PREFIX}/dev-c/records"
    op.pub(t, records_msg("dev-c", "b-1", [rec(s) for s in (1, 2, 3)]))
    # an outbox restored from an old image hands out seqs 2 and 3 again
    op.pub(t, records_msg("dev-c", "b-2", [rec(s, boot="boot-b") for s in (2, 3, 4)]))
    wait_for(lambda: len(op.got) >= 2, 20, "two acks")
    late = Operator(mosquitto.port)  # an operator's dashboard connecting later still sees the alert
    try:
        late.sub(f"{PREFIX}/+/alert")
        wait_for(lambda: late.got, 10, "the retained alert")
        (topic, payload, retained), = late.got
        alert = json.loads(payload)
        assert topic == f"{PREFIX}/dev-c/alert" and retained
        assert alert | {"ts": 0} == {"v": 1, "alert": "seq_conflict", "device_id": "dev-c", "seqs": [[2, 3]],
                                     "conflicts": 2, "hub": "hub-t", "ts": 0}
    finally:
        late.close()
    lines = [LogfmtFormatter(with_time=False).format(r) for r in caplog.records if r.getMessage() == "seq conflict"]
    # both boots named: the stored records' (b-1's, the default boot of `rec`) and the conflicting ones'
    assert lines == ['level=warning logger=customs_edge.hub.service event="seq conflict" device=dev-c seq=2-3'
                     f' count=2 conflicts=2 stored_boot={rec(2)["boot"]} new_boot=boot-b']
    assert [r.levelno for r in caplog.records if r.getMessage() == "seq conflict"] == [logging.WARNING]
    assert hub.hub.store.stats()[0].conflicts == 2


def test_hub_reports_gaps(tmp_path: Path, hub: HubThread, op: Operator) -> None:
    op.pub(f"{PREFIX}/dev-g/records", records_msg("dev-g", "x", [rec(s) for s in (1, 2, 5, 9)]))
    wait_for(lambda: op.got, 10, "ack")
    (st,) = hub.hub.store.stats()
    assert st.gaps == 5 and hub.hub.store.gap_ranges("dev-g") == [(3, 4), (6, 8)]
    cli = [sys.executable, "-m", "customs_edge", "hub", "stats", "--db", str(tmp_path / "hub.db")]
    out = json.loads(subprocess.run([*cli, "--json"], capture_output=True, text=True, check=True).stdout)
    assert out["devices"]["dev-g"] | {"last_seen": None} == {
        "device_id": "dev-g", "received": 4, "duplicates": 0, "conflicts": 0, "rejected": 0, "stored": 4,
        "max_seq": 9, "gaps": 5, "last_seen": None, "status": None, "suspect": 0}
    table = subprocess.run(cli, capture_output=True, text=True, check=True).stdout
    assert "missing seq ranges: [(3, 4), (6, 8)]" in table


def test_hub_survives_hostile_messages_including_retained_ones(tmp_path: Path, mosquitto: Mosquitto,
                                                               op: Operator) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    op.c.publish(f"{PREFIX}/evil/status", deep, qos=1, retain=True).wait_for_publish(5)
    hub = HubThread(mosquitto.port, tmp_path / "hub.db").start()
    try:
        op.pub(f"{PREFIX}/evil/records", records_msg("evil", "e", [rec(2**63)]))  # beyond SQLite INTEGER
        op.pub(f"{PREFIX}/evil/records", records_msg("evil", "n", [rec(1, ts="NaN")]))
        op.pub(f"{PREFIX}/dev-ok/records", records_msg("dev-ok", "g", [rec(1)]))
        wait_for(lambda: op.json(f"{PREFIX}/dev-ok/ack"), 10, "the good batch's ack")
        assert hub.thread.is_alive()
        # each evil record rejected on its own; a seq beyond SQLite INTEGER cannot be named in an ack
        assert [(a["ranges"], a["rejected"]) for a in op.json(f"{PREFIX}/evil/ack")] == [([], []), ([], [[1, 1]])]
        assert {s.device_id: (s.rejected, s.status) for s in hub.hub.store.stats()} == {
            "evil": (2, "?"), "dev-ok": (0, None)}
    finally:
        hub.stop()
        op.c.publish(f"{PREFIX}/evil/status", b"", qos=1, retain=True).wait_for_publish(5)


def test_acks_are_published_at_qos_0_and_conflict_alerts_at_qos_1(hub: HubThread, mosquitto: Mosquitto) -> None:
    """A lost ack costs one resend (acked again as a duplicate): QoS 1 would add a PUBACK at hub, broker and unit for
    every batch and buy nothing. A subscriber at QoS 1 receives at the publisher's QoS, so this tells them apart."""
    got: list[tuple[str, int]] = []
    o = Operator(mosquitto.port)
    o.c.on_message = lambda _c, _u, m: got.append((m.topic, m.qos))
    try:
        o.sub(f"{PREFIX}/+/ack")
        o.sub(f"{PREFIX}/+/alert")
        o.pub(f"{PREFIX}/dev-q/records", records_msg("dev-q", "b-1", [rec(1, payload={"a": 1})]))
        o.pub(f"{PREFIX}/dev-q/records", records_msg("dev-q", "b-2", [rec(1, payload={"a": 2})]))  # a conflict
        wait_for(lambda: len(got) >= 3, 20, "two acks and the conflict's alert")
    finally:
        o.close()
    assert sorted(got) == sorted([(f"{PREFIX}/dev-q/ack", 0), (f"{PREFIX}/dev-q/ack", 0),
                                  (f"{PREFIX}/dev-q/alert", 1)])
