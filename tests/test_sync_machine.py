"""The sync state machine against a scripted link and an in-memory outbox: no broker, no file.

Each test plays the broker's and the hub's part step by step (tests/fakes.py) and checks what the
sync published, deleted, dead-lettered and kept.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from customs_edge.agent.config import SyncConfig
from customs_edge.agent.sync import Sync
from customs_edge.core.records import RecordIn
from tests.fakes import FakeLink, MemOutbox, Published

T_ACK = "customs-edge/v1/dev/ack"


def make(tmp_path: Path, records: int, *, outbox: MemOutbox | None = None, link: FakeLink | None = None,
         **cfg: object) -> tuple[Sync, FakeLink, MemOutbox]:
    ob = outbox or MemOutbox()
    ob.put([RecordIn(type="t", payload={"i": i}) for i in range(records)])
    link = link or FakeLink()
    conf = SyncConfig(**{"batch_max_records": 10, "window_batches": 2, **cfg})
    return Sync("dev", ob, conf, outbox_path=tmp_path / "outbox.db", link=link), link, ob


def seqs(p: Published) -> list[int]:
    return [r["seq"] for r in p.json()["records"]]


def batch_of(link: FakeLink, seq: int) -> Published:
    """The latest records message that carried `seq`."""
    return [p for p in link.batches() if seq in seqs(p)][-1]


def hub_ack(link: FakeLink, p: Published, ranges: Iterable[tuple[int, int]],
            rejected: Iterable[tuple[int, int]] = ()) -> None:
    link.deliver(T_ACK, json.dumps({"v": 1, "batch": p.json()["batch"], "ranges": list(ranges),
                                    "rejected": list(rejected)}))


def connect(sync: Sync, link: FakeLink) -> None:
    link.connect()
    sync.step()


def test_connect_fills_the_window_and_a_lost_link_sends_it_again(tmp_path: Path) -> None:
    sync, link, ob = make(tmp_path, 25)
    connect(sync, link)
    assert [seqs(p) for p in link.batches()] == [list(range(1, 11)), list(range(11, 21))]  # window of 2
    assert link.subscribed == [T_ACK, "customs-edge/v1/dev/cmd", "customs-edge/v1/fleet/hub-alive"]
    link.drop()
    sync.step()
    assert sync.stats.resent_after_reconnect == 20 and not link.connected
    connect(sync, link)
    assert [seqs(p) for p in link.batches()[2:]] == [list(range(1, 11)), list(range(11, 21))]
    assert len(ob.records) == 25  # nothing deleted without the hub


def test_a_connection_lost_in_the_step_that_made_it_is_no_error(tmp_path: Path) -> None:
    sync, link, _ = make(tmp_path, 5)
    link.connect()
    link.drop()  # CONNACK, then EOF, read in one go
    sync.step()
    assert sync.stats.connects == 1 and not link.connected and link.batches() == []
    connect(sync, link)
    assert [seqs(p) for p in link.batches()] == [[1, 2, 3, 4, 5]]


def test_a_partial_ack_deletes_what_it_covers_and_sends_the_rest_again(tmp_path: Path) -> None:
    sync, link, ob = make(tmp_path, 10, window_batches=1)
    connect(sync, link)
    (first,) = link.batches()
    link.puback(first.mid)
    hub_ack(link, first, [(1, 4), (8, 10)])
    sync.step()
    assert sorted(ob.records) == [5, 6, 7]
    rest = link.batches()[-1]
    assert seqs(rest) == [5, 6, 7] and sync.stats.partial_acks == 1
    link.puback(rest.mid)
    hub_ack(link, rest, [(5, 7)])
    sync.step()
    assert not ob.records and sync.stats.records_acked == 10


def test_an_ack_that_covers_none_of_its_batch_keeps_it_in_flight(tmp_path: Path) -> None:
    sync, link, ob = make(tmp_path, 10, window_batches=1, ack_timeout_s=5)
    connect(sync, link)
    (first,) = link.batches()
    link.puback(first.mid)
    hub_ack(link, first, [(11, 20)])  # names our batch, none of its seqs
    sync.step()
    assert len(ob.records) == 10 and sync.stats.stale_acks == 1
    sync._check_deadline(sync._inflight[first.json()["batch"]].sent_at + 6)  # the resend timer sends it again
    assert seqs(link.batches()[-1]) == list(range(1, 11)) and sync.stats.hub_resends == 1


def test_rejected_ranges_are_dead_lettered_and_counted(tmp_path: Path) -> None:
    sync, link, ob = make(tmp_path, 10)
    connect(sync, link)
    (first,) = link.batches()
    link.puback(first.mid)
    hub_ack(link, first, [(1, 3), (5, 10)], rejected=[(4, 4), (900, 999)])  # 900-999: not in this batch
    sync.step()
    assert not ob.records and list(ob.dead) == [4] and ob.dead[4][1] == "rejected by the hub"
    assert (sync.stats.records_acked, sync.stats.records_rejected, sync.stats.partial_acks) == (9, 1, 0)
    assert len(link.batches()) == 1  # nothing sent again
    assert sync.status()["sync"]["records_rejected"] == 1


def test_a_puback_frees_its_mid_so_a_reused_mid_finds_the_right_batch(tmp_path: Path) -> None:
    """Mids wrap (at 65535; here at 3). A batch the broker PUBACKed may wait for the hub's ack while its
    mid is reused: the hub's ack must not take the new batch's mid, and the new PUBACK must find it."""
    link = FakeLink(mid_max=3)
    sync, link, _ = make(tmp_path, 6, batch_max_records=1, link=link)
    connect(sync, link)  # status: mid 1, seq 1: mid 2, seq 2: mid 3
    a, b = batch_of(link, 1), batch_of(link, 2)
    for p in (1, a.mid, b.mid):
        link.puback(p)
    hub_ack(link, b, [(2, 2)])
    sync.step()  # seq 3 goes out with mid 1
    c = batch_of(link, 3)
    link.puback(c.mid)
    hub_ack(link, c, [(3, 3)])
    sync.step()  # seq 4 goes out with mid 2: the mid of seq 1's batch, still waiting for the hub
    d = batch_of(link, 4)
    assert d.mid == a.mid
    hub_ack(link, a, [(1, 1)])
    sync.step()
    link.puback(d.mid)
    sync.step()
    assert sync._inflight[d.json()["batch"]].pubacked
    for f in sync._inflight.values():
        link.puback(f.mid)
    sync.step()
    assert sync._by_mid == {} and all(f.pubacked for f in sync._inflight.values())


def test_pubacked_mids_are_forgotten_while_the_hub_has_not_acked(tmp_path: Path) -> None:
    sync, link, _ = make(tmp_path, 20)
    connect(sync, link)
    for p in link.published:
        link.puback(p.mid)
    sync.step()
    assert len(sync._inflight) == 2 and sync._by_mid == {}


class FullDisk(MemOutbox):
    full = True

    def ack(self, ranges: Iterable[tuple[int, int]]) -> int:
        if self.full:
            raise sqlite3.OperationalError("database or disk is full")
        return super().ack(ranges)


def test_a_failing_delete_keeps_the_link_and_never_sends_acked_records_again(tmp_path: Path) -> None:
    sync, link, ob = make(tmp_path, 20, outbox=FullDisk())
    sync.SETTLE_RETRY_S = 0.0
    connect(sync, link)
    first, second = link.batches()
    link.puback(first.mid)
    link.puback(second.mid)
    hub_ack(link, first, [(1, 10)])
    sync.step()
    sync.step()
    assert sync.stats.settle_failures >= 2 and link.connected and link.aborts == []
    link.drop()  # the broker goes away meanwhile: everything unacked is sent again, the acked part not
    sync.step()
    connect(sync, link)
    assert [seqs(p) for p in link.batches()[2:]] == [list(range(11, 21))]
    assert isinstance(ob, FullDisk)
    ob.full = False  # space is back
    sync.step()
    assert sorted(ob.records) == list(range(11, 21)) and sync.stats.records_acked == 10
    assert link.aborts == []


def hub_holds_1_to_10(tmp_path: Path) -> tuple[Sync, FakeLink]:
    sync, link, _ = make(tmp_path, 10)
    connect(sync, link)
    (first,) = link.batches()
    hub_ack(link, first, [(1, 10)])
    sync.step()
    assert sync.stats.hub_acked_seq == 10
    return sync, link


def test_the_hubs_high_water_mark_survives_a_restart_and_lifts_a_replaced_outbox(tmp_path: Path) -> None:
    sync, _ = hub_holds_1_to_10(tmp_path)
    sync._goodbye()  # the unit stops
    fresh = MemOutbox()  # the outbox file was replaced: it would start again at seq 1
    sync2, _, _ = make(tmp_path, 0, outbox=fresh)
    assert sync2.stats.hub_acked_seq == 10 and sync2.stats.seq_floor_raised == 1
    assert list(fresh.put([RecordIn(type="t")])) == [11]


def test_an_outbox_replaced_under_a_running_sync_is_lifted_on_reconnect(tmp_path: Path) -> None:
    sync, link = hub_holds_1_to_10(tmp_path)
    sync.outbox = fresh = MemOutbox()
    link.drop()
    sync.step()
    connect(sync, link)
    assert sync.stats.seq_floor_raised == 1 and fresh.last_seq == 10


def test_resend_backoff_does_not_overflow_after_days_of_hub_silence(tmp_path: Path) -> None:
    from customs_edge.agent.sync import _InFlight

    sync, _, _ = make(tmp_path, 0)
    sync._inflight["b"] = _InFlight([(1, 1)], 1, 0.0, 1, [], pubacked=True, attempt=5000)
    sync._check_deadline(10.0)  # sent at 0, 10 s ago: far less than the capped 300 s wait
    assert sync.stats.hub_resends == 0
