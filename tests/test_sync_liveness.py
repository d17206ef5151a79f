"""The sync and the hub's liveness (agent/sync.py, hub/liveness.py): a PUBACKed batch the hub has not acked waits
past ack_timeout_s while a hub worker's live HubAlive messages show it storing, up to max_resend_interval_s; without
them (an older hub, or one that stopped) it is resent after ack_timeout_s as before. Against a scripted link
(tests/fakes.py) and the sync module's clock, driven by the test (fixture sync_clock)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from customs_edge.agent.config import SyncConfig
from customs_edge.agent.sync import Sync
from customs_edge.core.mqtt import Message
from customs_edge.core.records import Priority, RecordIn
from tests.fakes import FakeLink, MemOutbox, Published, SyncClock
from tests.test_sync_backlog import make as make_sent

ALIVE = "customs-edge/v1/fleet/hub-alive"


def make(tmp_path: Path, n: int, **cfg: Any) -> tuple[Sync, FakeLink, MemOutbox]:
    """n records in flight, PUBACKed by the broker, not yet acked by the hub (max_resend_interval_s 60 s)."""
    return make_sent(tmp_path, [RecordIn(type="t", payload={"i": i}) for i in range(n)],
                     **{"max_resend_interval_s": 60, **cfg})


def alive(link: FakeLink, stored: int, hub: str = "hub-1", retain: bool = False) -> None:
    payload = json.dumps({"v": 1, "hub": hub, "ts": 1.7e9, "stored": stored, "pending": 4096}).encode()
    link._next.append(Message(ALIVE, payload, retain))


def copies(link: FakeLink, seq: int) -> list[Published]:
    return [p for p in link.batches() if seq in [r["seq"] for r in p.json()["records"]]]


def run_alive_hub(sync: Sync, link: FakeLink, clock: SyncClock, until: float, every: float = 4.0,
                  stored: int = 100) -> int:
    """A hub worker storing other units' batches, saying so every `every` s (never acking ours), up to `until`."""
    while clock.t + every <= until:
        clock.t += every
        stored += 50
        alive(link, stored)
        sync.step()
    return stored


def test_a_batch_waits_for_a_hub_that_says_it_is_storing_until_max_resend_interval(tmp_path: Path,
                                                                                    sync_clock: SyncClock) -> None:
    """The burst: the hub is busy with other units' batches and reaches none of ours; it says so every 4 s. Ours
    wait past ack_timeout_s (10 s) and go again only at max_resend_interval_s (60 s) after their send."""
    sync, link, _ = make(tmp_path, 20)
    assert ALIVE in link.subscribed and len(link.batches()) == 2
    alive(link, 100, retain=False)  # the baseline
    sync.step()
    run_alive_hub(sync, link, sync_clock, 1059.9)
    assert len(copies(link, 1)) == 1 and sync.stats.hub_resends == 0
    assert sync.stats.hub_resends_deferred == sync.stats.hub_resends_deferred_alive == 2  # both, once
    sync_clock.t = 1060.1
    sync.step()
    assert len(copies(link, 1)) == 2 and len(copies(link, 11)) == 2 and sync.stats.hub_resends == 2


def test_without_liveness_the_batch_is_resent_after_ack_timeout(tmp_path: Path, sync_clock: SyncClock) -> None:
    """The same, from an older hub that publishes none, or a unit with hub_liveness off: resent at 10 s."""
    for cfg in ({}, {"hub_liveness": False}):
        sync, link, _ = make(tmp_path, 10, **cfg)
        if cfg:
            assert ALIVE not in link.subscribed
            alive(link, 100)
            sync.step()
            alive(link, 200)  # a unit that did not subscribe refuses it as unexpected, and never waits for it
        sync_clock.t = 1010.1
        sync.step()
        assert len(copies(link, 1)) == 2 and sync.stats.hub_resends_deferred == 0, cfg
        sync_clock.t = 1000.0


def test_a_hub_that_stops_saying_it_stores_gets_the_resend_a_wait_after_its_last_word(tmp_path: Path,
                                                                                     sync_clock: SyncClock) -> None:
    sync, link, _ = make(tmp_path, 10)
    alive(link, 100)
    sync.step()
    run_alive_hub(sync, link, sync_clock, 1012.0)  # the last at 1012, then the hub dies (or is stuck)
    sync_clock.t = 1021.9
    sync.step()
    assert len(copies(link, 1)) == 1
    sync_clock.t = 1022.1
    sync.step()
    assert len(copies(link, 1)) == 2 and sync.stats.hub_resends == 1


def test_liveness_without_progress_or_only_retained_is_no_reason_to_wait(tmp_path: Path,
                                                                         sync_clock: SyncClock) -> None:
    """A worker alive but storing nothing (the same `stored`), a stored count going down (a restarted worker),
    another worker's first word, and a retained copy at (re)subscribe (a dead hub's, maybe) are baselines only."""
    sync, link, _ = make(tmp_path, 10)
    alive(link, 100)
    sync.step()
    for t, stored, hub, retain in [(1004.0, 100, "hub-1", False), (1006.0, 5, "hub-1", False),
                                   (1007.0, 900, "hub-2", False), (1008.0, 300, "hub-1", True)]:
        sync_clock.t = t
        alive(link, stored, hub, retain)
        sync.step()
    assert sync.stats.hub_alive_heard == 5
    sync_clock.t = 1010.1
    sync.step()
    assert len(copies(link, 1)) == 2 and sync.stats.hub_resends_deferred == 0


def test_liveness_does_not_hold_back_an_alert_lane_batch(tmp_path: Path, sync_clock: SyncClock) -> None:
    """The hub reads /alerts ahead of any backlog: a busy hub that has not acked an alert batch is no reason for
    it to wait; it goes again (on /records) after ack_timeout_s, while the bulk batch waits."""
    ob = MemOutbox()
    ob.put([RecordIn(type="alarm", priority=Priority.ALERT), RecordIn(type="t")])
    link = FakeLink()
    sync = Sync("dev", ob, SyncConfig(ack_timeout_s=10), outbox_path=tmp_path / "outbox.db", link=link)
    link.connect()
    sync.step()
    for p in link.published:
        link.puback(p.mid)
    alive(link, 100)
    sync.step()
    run_alive_hub(sync, link, sync_clock, 1010.5, every=3.5)
    assert [p.topic.rsplit("/", 1)[1] for p in copies(link, 1)] == ["alerts", "records"]
    assert len(copies(link, 2)) == 1


def test_a_malformed_or_oversized_liveness_message_is_counted_and_ignored(tmp_path: Path,
                                                                          sync_clock: SyncClock) -> None:
    sync, link, _ = make(tmp_path, 10)
    alive(link, 100)
    for bad in [b"{", b'{"v": 1, "hub": "hub-1", "ts": 1, "stored": -5}', b'{"v": 2, "hub": "x", "ts": 1, "stored": 9}',
                b'[[[[[[[[', b'{"hub": "hub-1", "stored": 500}', b"x" * 5000]:
        link.deliver(ALIVE, bad)
    link.deliver(ALIVE, b"")  # the retained copy cleared by an operator: nothing to count
    sync.step()
    assert sync.stats.hub_alive_refused == 6 and sync.stats.hub_alive_heard == 1
    assert sync.refusals.as_dict() == {"alive_malformed": 5, "alive_too_large": 1}
    assert sync.status()["sync"]["hub_alive_refused"] == 6
    sync_clock.t = 1010.1  # none of them counted as the hub storing: resent on time
    sync.step()
    assert len(copies(link, 1)) == 2


def test_a_batch_held_back_by_liveness_is_resent_at_once_on_reconnect(tmp_path: Path, sync_clock: SyncClock) -> None:
    sync, link, _ = make(tmp_path, 10)
    alive(link, 100)
    sync.step()
    run_alive_hub(sync, link, sync_clock, 1012.0)
    assert len(copies(link, 1)) == 1 and sync.stats.hub_resends_deferred_alive == 1
    link.drop()
    sync.step()
    link.connect()
    sync.step()
    assert len(copies(link, 1)) == 2 and sync.stats.resent_after_reconnect == 10
