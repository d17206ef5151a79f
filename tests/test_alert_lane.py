"""The alert lane (issue 12's backlog burst): a unit's ALERT records leave in batches of their own on
`{prefix}/{device}/alerts`, and the hub reads that topic on a session of its own, ahead of the backlog the broker
holds for its bulk session. The sync's half against a scripted link; the hub's against a real mosquitto, flooded
before it connects."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from customs_edge.agent.config import SyncConfig
from customs_edge.agent.sync import Sync
from customs_edge.core.records import Priority, RecordIn
from customs_edge.hub.brokers import Mosquitto
from tests.conftest import wait_for
from tests.fakes import FakeLink, MemOutbox, Published
from tests.fleet import HubThread, hub_seqs, rec, records_msg

PREFIX = "customs-edge/v1"


# --- the sync: which topic a batch goes on ------------------------------------------------------------------------
def make(tmp_path: Path, **cfg: Any) -> tuple[Sync, FakeLink, MemOutbox]:
    ob = MemOutbox()
    ob.put([RecordIn(type="weighing", payload={"i": i}) for i in range(3)]  # seqs 1-3
           + [RecordIn(type="radiation_alarm", priority=Priority.ALERT, payload={"i": i}) for i in range(2)]  # 4-5
           + [RecordIn(type="weighing", payload={"i": i}) for i in range(3)])  # 6-8
    link = FakeLink()
    sync = Sync("dev", ob, SyncConfig(**{"batch_max_records": 10, "ack_timeout_s": 5, **cfg}),
                outbox_path=tmp_path / "outbox.db", link=link)
    link.connect()
    sync.step()
    return sync, link, ob


def sent(link: FakeLink) -> list[tuple[str, list[int]]]:
    return [(p.topic.rsplit("/", 1)[1], [r["seq"] for r in p.json()["records"]]) for p in link.batches()]


def ack(link: FakeLink, p: Published, ranges: list[tuple[int, int]]) -> None:
    link.deliver(f"{PREFIX}/dev/ack", json.dumps({"v": 1, "batch": p.json()["batch"], "ranges": ranges}))


def test_alert_records_leave_in_a_batch_of_their_own_on_the_alert_topic(tmp_path: Path) -> None:
    sync, link, ob = make(tmp_path)
    assert sent(link) == [("alerts", [4, 5]), ("records", [1, 2, 3, 6, 7, 8])]  # the outbox hands alerts out first
    alerts, bulk = link.batches()
    link.puback(bulk.mid)
    ack(link, bulk, [(1, 3), (6, 8)])
    # the hub does not ack the alerts: resent alternately on /records (a hub older than the lane reads that) and
    # /alerts, under the same batch id
    for expect in ("records", "alerts", "records"):
        f = sync._inflight[alerts.json()["batch"]]
        link.puback(f.mid)
        sync.step()
        sync._check_deadline(f.sent_at + 5 * 2 ** f.attempt + 0.1)
        assert sent(link)[-1] == (expect, [4, 5])
    ack(link, alerts, [(4, 5)])  # the ack of whichever copy the hub stored deletes them
    sync.step()
    assert ob.records == {} and sync.stats.hub_resends == 3


@pytest.mark.parametrize("cfg", [{"alert_lane": False}, {"ack_mode": "broker"}])
def test_without_the_lane_everything_goes_on_records(tmp_path: Path, cfg: dict[str, Any]) -> None:
    """`sync.alert_lane: false`, and ack_mode broker (a consumer of /records replaces the hub)."""
    _, link, _ = make(tmp_path, **cfg)
    assert sent(link) == [("records", [4, 5, 1, 2, 3, 6, 7, 8])]


# --- the hub: a flood queued before it connects -------------------------------------------------------------------
class Publisher:
    """A paho client publishing at QoS 1 as units would; `wait()` until the broker PUBACKed everything."""

    def __init__(self, port: int) -> None:
        self.c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        self.c.max_inflight_messages_set(1000)
        self.got: list[tuple[str, Any]] = []
        self.subacked: set[int] = set()
        self.c.on_message = lambda _c, _u, m: self.got.append((m.topic, json.loads(m.payload)))
        self.c.on_subscribe = lambda _c, _u, mid, *_: self.subacked.add(mid)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        wait_for(self.c.is_connected, 10, "the publisher's CONNACK")
        self.infos: list[paho.MQTTMessageInfo] = []

    def sub(self, topic: str) -> None:
        _, mid = self.c.subscribe(topic, 1)
        wait_for(lambda: mid in self.subacked, 10, f"SUBACK for {topic}")

    def pub(self, topic: str, payload: str | bytes) -> None:
        self.infos.append(self.c.publish(topic, payload, qos=1))

    def wait(self, timeout: float = 60) -> None:
        wait_for(lambda: all(i.is_published() for i in self.infos), timeout, "the broker's PUBACKs")

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def backlog_batch(device: str, first: int, n: int) -> str:
    """n EVENT records of ~150 bytes (a weighing's size), seqs first.. first+n-1."""
    return records_msg(device, f"{device}-{first}", [rec(s, type="weighing", payload={"kg": 1000.0 + s, "lane": 3})
                                                    for s in range(first, first + n)])


class Store:
    """The hub's SQLite file, read as the console reads it (WAL: committed transactions only)."""

    def __init__(self, db: Path) -> None:
        self.db = sqlite3.connect(f"file:{db}?mode=ro", uri=True)

    def stored(self, device: str | None = None) -> int:
        q, args = ("SELECT coalesce(sum(stored), 0) FROM devices", ()) if device is None else \
            ("SELECT coalesce(sum(stored), 0) FROM devices WHERE device_id=?", (device,))
        return int(self.db.execute(q, args).fetchone()[0])


@pytest.fixture
def flooded(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[tuple[Path, int]]:
    """The hub's sessions exist (it ran once), it is down, and 4 units' backlog waits for it at the broker:
    1,600 batches of 100 records. Yields (hub db, records queued)."""
    db = tmp_path / "hub.db"
    HubThread(mosquitto.port, db, client_id="hub-flood").start().stop()  # its persistent sessions, subscribed
    pub = Publisher(mosquitto.port)
    devices, batches, size = 4, 400, 100
    try:
        for b in range(batches):
            for d in range(devices):
                pub.pub(f"{PREFIX}/unit-{d}/records", backlog_batch(f"unit-{d}", b * size + 1, size))
        pub.wait()
    finally:
        pub.close()
    yield db, devices * batches * size


def alert_batch(device: str, seq: int) -> str:
    return records_msg(device, f"alert-{seq}", [rec(seq, type="radiation_alarm", prio=3, payload={"cps": 900})])


def test_a_new_alert_overtakes_a_backlog_queued_for_the_hub(flooded: tuple[Path, int], mosquitto: Mosquitto) -> None:
    """The hub comes back to 160,000 queued records. While it drains them, three alerts from another unit are
    published one after another on the alert lane: each is stored while the backlog is still draining, far ahead
    of it; every record of the backlog is stored too, once. (On one queue the alerts would wait for the whole
    backlog; how long they take is bench/alert_lane.py's figure, not asserted here.)"""
    db, queued = flooded
    hub = HubThread(mosquitto.port, db, client_id="hub-flood")
    hub.thread.start()  # not start(): the backlog arrives at once, with the CONNACK
    store, pub = Store(db), Publisher(mosquitto.port)
    latencies, behind = [], []
    try:
        wait_for(lambda: store.stored() > 0, 30, "the hub to start draining the backlog")
        for seq in (1, 2, 3):
            pub.pub(f"{PREFIX}/gate-9/alerts", alert_batch("gate-9", seq))
            t0 = time.monotonic()
            wait_for(lambda s=seq: store.stored("gate-9") == s, 60, f"alert {seq} stored", interval=0.01)  # type: ignore[misc]
            latencies.append(time.monotonic() - t0)
            behind.append(queued - store.stored())
        print(f"alert lane: stored after {[round(x * 1000) for x in latencies]} ms, "
              f"with {behind} backlog records still to store")
        assert all(n > 0 for n in behind), "the backlog was drained before an alert was stored"
        wait_for(lambda: store.stored() == queued + 3, 120, "the whole backlog stored")
        assert hub_seqs(db, "unit-0")[0] == list(range(1, queued // 4 + 1))
        assert hub.hub.link.connects == 1 and hub.hub.lane is not None and hub.hub.lane.connects == 1
    finally:
        pub.close()
        hub.stop()


def test_an_alert_is_stored_once_whichever_topic_brings_it(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """An older agent sends its alerts on /records: stored and acked as before. The same record again on the lane
    (a resend alternates topics) is a redelivery, acked, not stored twice; and the other way round."""
    db = tmp_path / "hub.db"
    hub = HubThread(mosquitto.port, db, client_id="hub-t").start()
    op = Publisher(mosquitto.port)
    try:
        op.sub(f"{PREFIX}/+/ack")
        alarm = [rec(1, type="radiation_alarm", prio=3, payload={"cps": 900})]
        op.pub(f"{PREFIX}/old-unit/records", records_msg("old-unit", "b1", alarm))
        wait_for(lambda: len(op.got) == 1, 15, "the ack of the alert sent on /records")
        op.pub(f"{PREFIX}/old-unit/alerts", records_msg("old-unit", "b1", alarm))
        op.pub(f"{PREFIX}/new-unit/alerts", records_msg("new-unit", "b1", alarm))
        wait_for(lambda: len(op.got) == 3, 15, "the acks of the lane's copies")
        op.pub(f"{PREFIX}/new-unit/records", records_msg("new-unit", "b1", alarm))
        wait_for(lambda: len(op.got) == 4, 15, "the ack of the copy on /records")
        acks = [(t.split("/")[2], a["ranges"], a["stored"], a["duplicates"]) for t, a in op.got]
        assert acks == [("old-unit", [[1, 1]], 1, 0), ("old-unit", [[1, 1]], 0, 1), ("new-unit", [[1, 1]], 1, 0),
                        ("new-unit", [[1, 1]], 0, 1)]  # (device, ranges, stored, duplicates)
        for device in ("old-unit", "new-unit"):
            assert hub_seqs(db, device) == ([1], 1)
        assert not hub.hub.refusals.counts
    finally:
        op.close()
        hub.stop()


def test_records_below_alert_on_the_lane_are_stored_and_counted(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """The lane is for alerts: a unit that sends its bulk there delays everyone's alerts. Its records are stored
    and acked all the same (refusing them would block the unit), and the misuse is counted and logged."""
    db = tmp_path / "hub.db"
    hub = HubThread(mosquitto.port, db, client_id="hub-t").start()
    op = Publisher(mosquitto.port)
    try:
        op.sub(f"{PREFIX}/+/ack")
        op.pub(f"{PREFIX}/odd-unit/alerts", records_msg("odd-unit", "b1", [rec(1), rec(2, prio=3)]))
        wait_for(lambda: op.got, 15, "the ack")
        assert hub_seqs(db, "odd-unit") == ([1, 2], 2)
        assert hub.hub.refusals.counts == {"alert_lane_not_alerts": 1}
    finally:
        op.close()
        hub.stop()


def test_a_unit_with_alerts_in_its_backlog_delivers_everything_once(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """The real sync and hub: alerts leave first, on the lane; all records stored once, the outbox emptied."""
    ob = MemOutbox()
    for i in range(6):
        ob.put([RecordIn(type="weighing", payload={"i": i}) for _ in range(40)]
               + [RecordIn(type="radiation_alarm", priority=Priority.ALERT, payload={"i": i})])
    db = tmp_path / "hub.db"
    hub = HubThread(mosquitto.port, db, client_id="hub-t").start()
    sync = Sync("unit-7", ob, SyncConfig(port=mosquitto.port, batch_max_records=50),
                outbox_path=tmp_path / "unit-7" / "outbox.db")
    spy = Publisher(mosquitto.port)
    stop = threading.Event()
    thread = threading.Thread(target=sync.run, args=(stop,), daemon=True)
    try:
        spy.sub(f"{PREFIX}/unit-7/alerts")
        thread.start()
        wait_for(lambda: not ob.records, 30, "the outbox emptied by the hub's acks")
        assert hub_seqs(db, "unit-7") == (list(range(1, 247)), 246)
        lane = sorted(r["seq"] for _, m in spy.got for r in m["records"])
        assert lane == [41 * k for k in range(1, 7)]  # the six alerts, on the lane, and nothing else
    finally:
        stop.set()
        thread.join(10)
        spy.close()
        hub.stop()


def test_one_wait_serves_two_links(mosquitto: Mosquitto) -> None:
    """core/mqtt.step_links: a message for the second link ends the wait the first one would have slept through
    (30 s here: the call returning with the message well before is the point)."""
    from customs_edge.core.mqtt import Connected, Message, MqttLink, step_links

    a, b = (MqttLink(f"lane-test-{n}", "127.0.0.1", mosquitto.port) for n in "ab")
    pub = Publisher(mosquitto.port)
    try:
        for link in (a, b):
            wait_for(lambda link=link: any(isinstance(e, Connected) for e in link.step(0.1)), 10, "CONNACK")  # type: ignore[misc]
        b.subscribe("lane-test/b", 1)
        wait_for(lambda: not any(step_links([(a, True), (b, True)], 0.05)), 10, "the SUBACK read")
        pub.pub("lane-test/b", b"x")
        t0 = time.monotonic()
        ev_a, ev_b = step_links([(a, True), (b, True)], 30.0)
        while not ev_b and time.monotonic() - t0 < 30:  # a PUBACK-free QoS 1 delivery may take two reads
            ev_a, ev_b = step_links([(a, True), (b, True)], 30.0)
        assert time.monotonic() - t0 < 15 and ev_a == [] and [e.topic for e in ev_b if isinstance(e, Message)] == \
            ["lane-test/b"]
    finally:
        pub.close()
        for link in (a, b):
            link.close()
