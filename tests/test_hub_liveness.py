"""The hub's liveness (hub/liveness.py): each worker says "alive and storing" at most every alive_interval_s, only
while it stores, never in the way of the store; on a real mosquitto the message is retained for the units that
connect later, and a unit (agent/sync.py) holds back a resend while a hub's live messages show it storing."""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from customs_edge.agent.config import SyncConfig
from customs_edge.agent.sync import Sync
from customs_edge.core.mqtt import NotConnected
from customs_edge.core.records import RecordIn
from customs_edge.core.wire import HubAlive
from customs_edge.hub.brokers import Mosquitto
from customs_edge.hub.liveness import MIN_INTERVAL_S, Liveness
from customs_edge.hub.service import HubConfig
from tests.conftest import wait_for
from tests.fakes import FakeLink, MemOutbox
from tests.fleet import HubThread, rec, records_msg

PREFIX = "customs-edge/v1"
ALIVE = f"{PREFIX}/fleet/hub-alive"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def connected_link() -> FakeLink:
    link = FakeLink("hub-1")
    link.connect()
    link.step(0)
    return link


def test_a_worker_publishes_at_most_once_a_period_and_only_while_it_stores() -> None:
    clock, link = Clock(), connected_link()
    live = Liveness(PREFIX, "hub-1", 5.0, clock=clock, wall=lambda: 1.7e9)
    stored, sent_at = 0, []
    for _ in range(2000):  # a busy hub: a tick every 10 ms, a batch stored at each
        clock.t += 0.01
        stored += 1
        if live.tick(link, stored, 1 << 20):
            sent_at.append((clock.t, stored))
    assert len(link.published) == len(sent_at) == 4
    assert all(b[0] - a[0] >= 5.0 - 1e-6 for a, b in itertools.pairwise(sent_at))
    p = link.published[-1]
    assert p.topic == ALIVE and p.retain and len(p.payload) < 120
    msg = HubAlive.model_validate_json(p.payload)
    assert (msg.hub, msg.ts, msg.stored, msg.pending) == ("hub-1", 1.7e9, sent_at[-1][1], 1 << 20)
    for _ in range(1000):  # idle: what was stored since the last message said once, a period after it; then nothing
        clock.t += 0.01
        live.tick(link, stored, 0)
    assert len(link.published) == 5 and json.loads(link.published[4].payload)["stored"] == 2000
    clock.t += 0.01
    assert live.tick(link, stored + 1, 0)  # storing again: said at once, the period long past
    assert not live.tick(link, stored + 2, 0)


def test_the_period_has_a_floor_and_the_config_refuses_below_it() -> None:
    clock, link = Clock(), connected_link()
    live = Liveness(PREFIX, "hub-1", 0.01, clock=clock)
    for i in range(1, 1001):
        clock.t += 0.01
        live.tick(link, i, 0)
    assert len(link.published) == 5 and live.interval_s == MIN_INTERVAL_S
    with pytest.raises(ValidationError, match="alive_interval_s"):
        HubConfig(alive_interval_s=0.5)
    assert HubConfig(alive_interval_s=None).alive_interval_s is None


def test_a_link_down_or_a_failing_publish_skips_the_message_and_never_raises() -> None:
    clock = Clock()
    live = Liveness(PREFIX, "hub-1", 2.0, clock=clock)
    down = FakeLink()
    assert not live.tick(down, 10, 0) and live.skipped == 1

    class Broken(FakeLink):
        def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> int:
            raise (NotConnected(topic) if self.aborts else OSError("socket gone"))

    broken = Broken()
    broken.connect()
    broken.step(0)
    clock.t = 3.0
    assert not live.tick(broken, 20, 0)
    broken.aborts.append("x")
    clock.t = 6.0
    assert not live.tick(broken, 30, 0) and live.skipped == 3 and live.sent == 0
    clock.t = 9.0
    link = connected_link()
    assert live.tick(link, 40, 0) and json.loads(link.published[0].payload)["stored"] == 40


class Watcher:
    """A plain client on the liveness topic: (message, retain flag) as they come."""

    def __init__(self, port: int, name: str) -> None:
        self.got: list[tuple[HubAlive, bool]] = []
        self.subscribed = threading.Event()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=name)
        self.c.on_message = lambda _c, _u, m: self.got.append((HubAlive.model_validate_json(m.payload), m.retain))
        self.c.on_subscribe = lambda *_: self.subscribed.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.c.subscribe(ALIVE, 0)
        assert self.subscribed.wait(10), "no SUBACK"

    def publish(self, topic: str, payload: str | bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.mark.broker
def test_the_hub_says_it_is_storing_retained_for_units_that_connect_later(tmp_path: Path,
                                                                         mosquitto: Mosquitto) -> None:
    hub = HubThread(mosquitto.port, tmp_path / "hub.db", alive_interval_s=2).start()
    w = Watcher(mosquitto.port, "watch-1")
    try:
        assert hub.hub.liveness is not None and hub.hub.liveness.sent == 0  # stored nothing yet: said nothing
        for i in range(3):
            w.publish(f"{PREFIX}/d{i}/records", records_msg(f"d{i}", f"b{i}", [rec(1)]))
        msg, retained = wait_for(lambda: w.got and w.got[-1], 10, "the hub's liveness")
        assert not retained and msg.hub == hub.hub.link.client_id and 1 <= msg.stored <= 3
        w.publish(f"{PREFIX}/d9/records", records_msg("d9", "b9", [rec(1)]))
        later, _ = wait_for(lambda: w.got[-1] if w.got[-1][0].stored == 4 else None, 10,
                            "a liveness message counting the 4 batches")
        counts = [m.stored for m, _ in w.got]
        assert counts == sorted(set(counts)) and hub.hub.batches == 4  # each message said something new
        w2 = Watcher(mosquitto.port, "watch-2")  # a unit connecting now gets the latest at once, flagged retained
        try:
            got, retained = wait_for(lambda: w2.got and w2.got[0], 10, "the retained liveness")
            assert retained and got == later
        finally:
            w2.close()
    finally:
        w.close()
        hub.stop()


@pytest.mark.broker
def test_a_unit_waits_for_a_hub_that_says_it_stores_on_a_real_broker(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """The sync on a real link: a hub's live messages (here a plain client's, never acking) hold back the resend
    past ack_timeout_s, until max_resend_interval_s; the broker's retained copy, flagged so, holds back nothing."""
    w = Watcher(mosquitto.port, "hub-fake")
    w.publish(ALIVE, HubAlive(hub="hub-x", ts=1.0, stored=1_000_000).model_dump_json(), retain=True)  # a dead hub's
    ob = MemOutbox()
    ob.put([RecordIn(type="t", payload={"i": i}) for i in range(5)])
    cfg = SyncConfig(port=mosquitto.port, ack_timeout_s=2, max_resend_interval_s=5, keepalive_s=5)
    sync = Sync("dev", ob, cfg, outbox_path=tmp_path / "outbox.db")
    stop = threading.Event()
    t = threading.Thread(target=sync.run, args=(stop,), daemon=True)
    t.start()
    try:
        wait_for(lambda: sync.stats.hub_alive_heard >= 1 and sync.stats.batches_sent >= 1, 10,
                 "the retained liveness and the unit's first batch")
        assert sync._hub_alive_at == float("-inf")  # a retained copy is a baseline only
        stored = 1_000_000
        state: dict[str, Any] = {}

        def hub_storing() -> bool:  # a live message every poll (50 ms), stored rising; True once resent
            nonlocal stored
            stored += 10
            w.publish(ALIVE, HubAlive(hub="hub-x", ts=2.0, stored=stored).model_dump_json())
            state.update(resends=sync.stats.hub_resends, deferred=sync.stats.hub_resends_deferred_alive)
            return sync.stats.hub_resends >= 1

        wait_for(hub_storing, 20, "the resend at max_resend_interval_s")
        # held back at ack_timeout_s by the liveness alone (no ack came), resent at the cap all the same
        assert sync.stats.hub_resends_deferred_alive == 1 and sync.stats.hub_alive_refused == 0
        assert sync.stats.hub_alive_heard > 20
    finally:
        stop.set()
        t.join(10)
        w.close()
