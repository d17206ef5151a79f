"""Review of the sync's burst deferral (agent/sync.py, module docstring): against a scripted hub that drains each
lane in order, slower than ack_timeout_s per window (a backlog), and loses some messages (received, never
committed), no batch waits longer than max_resend_interval_s between two copies and every record is acked in
the end, across reconnects. The sync module's clock is driven by the test (fixture sync_clock)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from customs_edge.agent.config import SyncConfig
from customs_edge.agent.sync import Sync
from customs_edge.core.records import Priority, RecordIn
from tests.fakes import FakeLink, MemOutbox, Published, SyncClock

T_ACK = "customs-edge/v1/dev/ack"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_lossy_backlogged_hub_gets_every_record_and_no_batch_waits_past_the_cap(tmp_path: Path, sync_clock: SyncClock,
                                                                                   seed: int) -> None:
    rng = random.Random(seed)
    ob = MemOutbox()
    ob.put([RecordIn(type="t", payload={"i": i}) for i in range(300)])
    link = FakeLink()
    cap = 60.0
    sync = Sync("dev", ob, SyncConfig(batch_max_records=10, window_batches=4, ack_timeout_s=10,
                                      max_resend_interval_s=cap), outbox_path=tmp_path / "outbox.db", link=link)
    link.connect()
    queues: dict[str, list[Published]] = {"records": [], "alerts": []}
    service = {"records": 4.0, "alerts": 0.5}  # s per message: 4 batches a window take 16 s > ack_timeout_s
    busy_until = {"records": 0.0, "alerts": 0.0}
    seen = 0
    last_copy: dict[str, float] = {}  # batch id -> when its latest copy was published
    gaps: list[float] = []
    acked = False
    while sync_clock.t < 1000.0 + 3600 and (ob.records or sync._inflight):
        sync_clock.t += 0.5
        if rng.random() < 0.01:
            ob.put([RecordIn(type="alarm", priority=Priority.ALERT, payload={"t": sync_clock.t})])
        if rng.random() < 0.003 and link.connected:  # the broker goes away now and then
            link.drop()
            link.connect()
        for p in link.published[seen:]:
            lane = p.topic.rsplit("/", 1)[1]
            if lane in queues:
                bid = p.json()["batch"]
                last_copy[bid] = sync_clock.t
                link.puback(p.mid)
                queues[lane].append(p)
        seen = len(link.published)
        for lane, q in queues.items():
            if q and sync_clock.t >= busy_until[lane]:
                busy_until[lane] = sync_clock.t + service[lane]
                p = q.pop(0)
                if rng.random() < 0.15:
                    continue  # received, never committed: the hub crashed, or its store refused the batch
                s = [r["seq"] for r in p.json()["records"]]
                link.deliver(T_ACK, json.dumps({"v": 1, "batch": p.json()["batch"], "ranges": [(min(s), max(s))]}))
                acked = True
        sync.step()
        for bid, f in sync._inflight.items():
            if f.pubacked and bid in last_copy:
                gaps.append(sync_clock.t - last_copy[bid])
    assert acked and not ob.records and not sync._inflight, f"stuck at {sync_clock.t}: {len(ob.records)} records left"
    assert max(gaps) <= cap + 1.0  # a copy at most max_resend_interval_s after the last one (and a step)
    assert sync.stats.hub_resends_deferred > 0  # the deferral did take part
