"""The sync during a hub backlog (agent/sync.py, module docstring): a PUBACKed batch the hub has not acked yet
waits while the hub's acks for this unit keep coming, is resent when they stop, and is resent anyway when the hub
passed it over. Against a scripted link (tests/fakes.py) and the sync module's clock, driven by the test
(fixture sync_clock)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from customs_edge.agent.config import SyncConfig
from customs_edge.agent.sync import Sync
from customs_edge.core.records import Priority, RecordIn
from tests.fakes import FakeLink, MemOutbox, Published, SyncClock

T_ACK = "customs-edge/v1/dev/ack"


def make(tmp_path: Path, records: list[RecordIn], **cfg: Any) -> tuple[Sync, FakeLink, MemOutbox]:
    ob = MemOutbox()
    ob.put(records)
    link = FakeLink()
    conf = SyncConfig(**{"batch_max_records": 10, "window_batches": 4, "ack_timeout_s": 10, **cfg})
    sync = Sync("dev", ob, conf, outbox_path=tmp_path / "outbox.db", link=link)
    link.connect()
    sync.step()
    for p in link.published:  # the broker has them all
        link.puback(p.mid)
    sync.step()
    return sync, link, ob


def bulk(n: int) -> list[RecordIn]:
    return [RecordIn(type="t", payload={"i": i}) for i in range(n)]


def seqs(p: Published) -> list[int]:
    return [r["seq"] for r in p.json()["records"]]


def hub_ack(link: FakeLink, p: Published) -> None:
    s = seqs(p)
    link.deliver(T_ACK, json.dumps({"v": 1, "batch": p.json()["batch"], "ranges": [(min(s), max(s))]}))


def batches_with(link: FakeLink, seq: int) -> list[Published]:
    return [p for p in link.batches() if seq in seqs(p)]


def step_at(sync: Sync, sync_clock: SyncClock, t: float) -> None:
    sync_clock.t = t
    sync.step()


def test_a_batch_waits_while_the_hub_keeps_acking_the_units_earlier_ones(tmp_path: Path, sync_clock: SyncClock) -> None:
    """A backlog burst: the hub drains the queue in order, acking one of this unit's batches every 6 s (under
    ack_timeout_s, 10), so the 4th batch's ack comes 24 s after its send. It is not published again meanwhile."""
    sync, link, ob = make(tmp_path, bulk(40))
    first = link.batches()
    assert [seqs(p)[0] for p in first] == [1, 11, 21, 31]
    for i, p in enumerate(first):
        step_at(sync, sync_clock, 1000.0 + 6 * (i + 1) - 0.5)
        assert len(link.batches()) == 4, f"republished before the hub reached batch {i + 1}"
        hub_ack(link, p)
        step_at(sync, sync_clock, 1000.0 + 6 * (i + 1))
    assert not ob.records and sync.stats.hub_resends == 0 and sync.stats.records_acked == 40
    assert sync.stats.hub_resends_deferred == 3  # the 2nd to 4th batches passed their 10 s wait
    assert len(link.batches()) == 4


def test_with_no_hub_ack_at_all_a_batch_is_resent_after_ack_timeout_doubling(tmp_path: Path,
                                                                             sync_clock: SyncClock) -> None:
    sync, link, _ = make(tmp_path, bulk(10))
    assert [seqs(p) for p in link.batches()] == [list(range(1, 11))]
    step_at(sync, sync_clock, 1009.9)
    assert len(link.batches()) == 1
    step_at(sync, sync_clock, 1010.1)
    assert [seqs(q) for q in link.batches()] == [list(range(1, 11))] * 2 and sync.stats.hub_resends == 1
    link.puback(link.batches()[-1].mid)
    step_at(sync, sync_clock, 1030.0)  # the second wait: 20 s from the resend
    assert len(link.batches()) == 2
    step_at(sync, sync_clock, 1030.2)
    assert len(link.batches()) == 3 and sync.stats.hub_resends_deferred == 0


def test_acks_that_stop_let_the_resend_timer_run_from_the_last_one(tmp_path: Path, sync_clock: SyncClock) -> None:
    """The hub acks one batch and then dies: the rest are resent ack_timeout_s after that last ack."""
    sync, link, _ = make(tmp_path, bulk(20), window_batches=2)
    a, b = link.batches()
    step_at(sync, sync_clock, 1008.0)
    hub_ack(link, a)
    step_at(sync, sync_clock, 1008.0)
    step_at(sync, sync_clock, 1017.9)  # b: 17.9 s after its send, 9.9 s after the hub's last ack
    assert batches_with(link, 11) == [b]
    step_at(sync, sync_clock, 1018.1)
    assert len(batches_with(link, 11)) == 2 and sync.stats.hub_resends == 1
    assert sync.stats.hub_resends_skipped == 0  # b was sent after a: not passed over


def test_a_batch_the_hub_passed_over_is_resent_a_wait_after_a_later_one_was_acked(tmp_path: Path,
                                                                                  sync_clock: SyncClock) -> None:
    """The hub lost the 1st batch (crashed before committing it, or the store refused it) and keeps acking the
    others: the 1st is resent ack_timeout_s after the first later batch was acked, though acks keep coming."""
    sync, link, ob = make(tmp_path, bulk(80))
    lost = link.batches()[0]
    acked: set[str] = set()
    t = 1000.0
    while len(batches_with(link, 1)) == 1 and t < 1100:
        t += 2.0
        sync_clock.t = t
        nxt = next(p for p in link.batches() if p.json()["batch"] not in acked and p is not lost)
        acked.add(nxt.json()["batch"])
        for q in link.published:
            link.puback(q.mid)
        hub_ack(link, nxt)
        sync.step()
    assert len(batches_with(link, 1)) == 2, "the passed-over batch was never resent"
    assert t == 1014.0  # the 2nd batch acked at 1002: 12 s later, past its 10 s wait (the 1st step after)
    assert sync.stats.hub_resends == sync.stats.hub_resends_skipped == 1
    assert sync.stats.hub_resends_deferred == 1  # at 1012: passed over 10 s before, not more
    hub_ack(link, batches_with(link, 1)[-1])
    sync.step()
    assert 1 not in ob.records


def test_an_alert_acked_on_its_lane_does_not_pass_over_older_bulk_batches(tmp_path: Path,
                                                                          sync_clock: SyncClock) -> None:
    """The hub reads /alerts ahead of the /records backlog: a bulk batch sent before an alert that was acked at
    once still waits its turn while bulk acks come; an alert batch the hub does not ack is resent on time."""
    sync, link, _ = make(tmp_path, bulk(20), window_batches=8)
    b1, b2 = link.batches()
    sync.outbox.put([RecordIn(type="alarm", priority=Priority.ALERT)])
    step_at(sync, sync_clock, 1001.0)
    (alert,) = [p for p in link.batches() if p.topic.endswith("/alerts")]
    link.puback(alert.mid)
    hub_ack(link, alert)
    step_at(sync, sync_clock, 1001.5)
    step_at(sync, sync_clock, 1009.0)
    hub_ack(link, b1)  # the backlog reaches b1
    step_at(sync, sync_clock, 1009.0)
    step_at(sync, sync_clock, 1018.0)  # b2: 18 s after its send, not passed over on /records, bulk acked 9 s ago
    assert batches_with(link, 11) == [b2] and sync.stats.hub_resends == 0
    step_at(sync, sync_clock, 1019.1)  # and when the bulk acks stop, resent
    assert len(batches_with(link, 11)) == 2


def test_a_batch_waits_no_longer_than_max_resend_interval_s_whatever_the_acks(tmp_path: Path,
                                                                              sync_clock: SyncClock) -> None:
    """The cap: older batches' acks trickling in (and none sent after it acked) never hold one back past
    max_resend_interval_s."""
    sync, link, _ = make(tmp_path, bulk(40), max_resend_interval_s=25)
    last = link.batches()[-1]
    for i, p in enumerate(link.batches()[:3]):  # the three before it, acked 8 s apart
        step_at(sync, sync_clock, 1000.0 + 8 * (i + 1))
        hub_ack(link, p)
        step_at(sync, sync_clock, 1000.0 + 8 * (i + 1))
        for q in link.published:
            link.puback(q.mid)
        step_at(sync, sync_clock, 1000.0 + 8 * (i + 1))
    assert batches_with(link, 31) == [last]  # at 1024: 24 s after its send, the last ack 0 s ago
    step_at(sync, sync_clock, 1025.1)
    assert len(batches_with(link, 31)) == 2 and sync.stats.hub_resends_skipped == 0


def test_the_ack_of_an_alert_sent_on_both_lanes_passes_over_nothing(tmp_path: Path, sync_clock: SyncClock) -> None:
    """An alert batch resent on /records (its lane unanswered) and then acked: the ack may be for the /alerts copy,
    so it says nothing of the /records backlog, and the bulk batches sent before the resend keep waiting."""
    sync, link, _ = make(tmp_path, [RecordIn(type="alarm", priority=Priority.ALERT), *bulk(19)], window_batches=8)
    alert, b1, b2 = link.batches()
    assert alert.topic.endswith("/alerts") and seqs(b1)[0] == 2
    step_at(sync, sync_clock, 1005.0)
    hub_ack(link, b1)
    step_at(sync, sync_clock, 1005.0)
    step_at(sync, sync_clock, 1010.1)  # the alert lane silent: the alert goes again, on /records
    assert [p.topic.rsplit("/", 1)[1] for p in batches_with(link, 1)] == ["alerts", "records"]
    link.puback(batches_with(link, 1)[-1].mid)
    step_at(sync, sync_clock, 1011.0)
    hub_ack(link, alert)  # the hub's alert session was only slow: the first copy is acked
    step_at(sync, sync_clock, 1011.0)
    step_at(sync, sync_clock, 1014.0)  # b2: 14 s after its send, the last /records ack 9 s ago
    assert batches_with(link, 12) == [b2] and sync._inflight[b2.json()["batch"]].passed_at is None
