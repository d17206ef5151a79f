"""agent/simfleet.py: many units stepped by a few driver threads (not a thread each), every record delivered once,
resends on the hub's ack timeout from the driver's timers, and the simulator's outbox shortcut that keeps begin()
from querying a drained outbox."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from customs_edge.agent.outbox import MemoryOutbox, SqliteOutbox
from customs_edge.agent.simfleet import SimFleet, TimedMemoryOutbox, TimedOutbox
from customs_edge.core.records import Priority, RecordIn
from customs_edge.hub.brokers import Mosquitto
from tests.conftest import wait_for
from tests.fleet import HubThread

UNITS, RECORDS = 30, 12


def _recs(n: int, prio: Priority = Priority.EVENT) -> list[RecordIn]:
    return [RecordIn(type="sim", priority=prio, payload={"k": k}) for k in range(n)]


@pytest.mark.parametrize("cls", [TimedOutbox, TimedMemoryOutbox])
def test_begin_skips_the_query_only_while_nothing_was_put_or_released(tmp_path: Path, cls: type,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    base = SqliteOutbox if cls is TimedOutbox else MemoryOutbox  # the implementation's own begin
    queries = []
    real = base.begin

    def counted(self: Any, n: int) -> Any:
        queries.append(n)
        return real(self, n)

    monkeypatch.setattr(base, "begin", counted)
    ob = cls(tmp_path / "ob.db", device_id="u-1") if cls is TimedOutbox else cls(device_id="u-1")
    try:
        ob.put(_recs(3))
        assert [r.seq for r in ob.begin(10)] == [1, 2, 3]
        assert ob.begin(10) == [] and ob.begin(10) == []
        assert len(queries) == 1  # fewer than asked: drained, no query until something changes
        ob.put(_recs(1, Priority.ALERT))
        assert [r.seq for r in ob.begin(10)] == [4]
        ob.release()  # a reconnect: everything unacked is handed out again
        assert [r.seq for r in ob.begin(2)] == [4, 1]  # highest priority first, as the outbox orders them
        assert [r.seq for r in ob.begin(2)] == [2, 3]  # a full batch: maybe more, so the next begin asks
        assert ob.begin(2) == []
        assert len(queries) == 5
        assert ob.ack([(1, 4)]) == 4 and ob.acked == 4 and ob.pending == 0 and len(ob.latencies) == 4
    finally:
        ob.close()


@pytest.mark.broker
@pytest.mark.parametrize("outbox", ["sqlite", "memory"])
def test_units_share_one_driver_thread_and_each_delivers_its_records_once(tmp_path: Path, mosquitto: Mosquitto,
                                                                          outbox: str) -> None:
    hub = HubThread(mosquitto.port, tmp_path / "hub.db", client_id="hub-simfleet").start()
    try:
        fleet = SimFleet(UNITS, tmp_path / "units", port=mosquitto.port, rate=40, limit=RECORDS, outbox=outbox,
                         spread_s=0.2).start()
        try:
            # one driver thread, not a Sync thread per unit (nor a producer thread)
            assert [t.name for t in threading.enumerate() if t.name.startswith(("sim-", "sync-"))] == ["sim-driver"]
            wait_for(lambda: fleet.connected() == UNITS, 20, "every unit connected on its own session")
            wait_for(lambda: (f := fleet.figures()).acked == UNITS * RECORDS and f.pending == 0, 30,
                     "every record acked by the hub")
        finally:
            fleet.stop()
        f = fleet.figures()
        assert f.produced == UNITS * RECORDS and f.latency_p50_ms is not None
        stats = hub.hub.store.stats()
        assert [(s.device_id, s.stored, s.conflicts, s.gaps) for s in stats] == \
            [(f"sim-{i:04d}", RECORDS, 0, 0) for i in range(UNITS)]
        wait_for(lambda: {s.status for s in hub.hub.store.stats()} == {"offline"}, 10, "each unit's goodbye")
    finally:
        hub.stop()


@pytest.mark.broker
def test_a_silent_hub_gets_the_batches_again_on_the_drivers_timers(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """No hub at first: the broker PUBACKs the batches, nobody acks them; after ack_timeout_s each unit publishes
    them again (its driver steps it on a timer, with nothing to read), and once a hub subscribes all are stored."""
    fleet = SimFleet(4, tmp_path / "units", port=mosquitto.port, rate=0, burst=30, ack_timeout_s=0.4,
                     outbox="memory", threads=2, timed=False, sync_options={"max_resend_interval_s": 0.8}).start()
    hub = None
    try:
        wait_for(lambda: fleet.figures().hub_resends >= 4, 20, "batches published again for want of a hub ack")
        assert fleet.figures().acked == 0
        hub = HubThread(mosquitto.port, tmp_path / "hub.db", client_id="hub-late").start()
        wait_for(lambda: (f := fleet.figures()).acked == 4 * 30 and f.pending == 0, 30, "all acked once a hub is up")
    finally:
        fleet.stop()
        if hub:
            hub.stop()


def test_put_from_another_thread_wakes_the_units_driver(tmp_path: Path) -> None:
    """SimFleet.put (an alert, say) commits and hands the unit to its driver at once, without counting against the
    unit's steady rate."""
    fleet = SimFleet(3, tmp_path / "units", port=1, rate=0, outbox="memory", threads=2, tick_s=30.0, spread_s=0)
    fleet.start()  # nothing listens on port 1: each unit's first step fails to connect, the next is 30 s away
    try:
        u = fleet.units[1]
        steps = wait_for(lambda: (n := fleet.figures().extra["steps"]) >= 3 and n, 5, "the first steps")
        seqs = fleet.put(u, _recs(2, Priority.ALERT))
        assert list(seqs) == [1, 2] and u.produced == 2
        wait_for(lambda: fleet.figures().extra["steps"] > steps, 5, "the unit stepped after the put")
    finally:
        fleet.stop()


@pytest.mark.broker
def test_units_reconnect_after_a_broker_crash_and_nothing_is_lost(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """kill -9 of the broker: every unit's socket closes under the driver (its epoll forgets them), each reconnects on
    its timer with a new socket the driver then watches, and what was in flight is sent again (what the broker took
    before the hub had subscribed again is published again after ack_timeout_s)."""
    hub = HubThread(mosquitto.port, tmp_path / "hub.db", client_id="hub-crash").start()
    fleet = SimFleet(8, tmp_path / "units", port=mosquitto.port, rate=20, limit=60, outbox="memory", spread_s=0.2,
                     ack_timeout_s=1.0,
                     sync_options={"backoff_min_s": 0.1, "backoff_max_s": 0.5}).start()
    try:
        wait_for(lambda: fleet.figures().acked >= 8 * 10, 20, "records flowing")
        connects = sum(u.sync.stats.connects for u in fleet.units)
        mosquitto.kill9()
        mosquitto.start()
        wait_for(lambda: sum(u.sync.stats.connects for u in fleet.units) >= connects + 8, 30,
                 "every unit connected again")
        wait_for(lambda: (f := fleet.figures()).acked == 8 * 60 and f.pending == 0, 30, "every record acked")
        assert [(s.stored, s.conflicts, s.gaps) for s in hub.hub.store.stats()] == [(60, 0, 0)] * 8
    finally:
        fleet.stop()
        hub.stop()


@pytest.mark.broker
def test_a_unit_whose_socket_is_full_waits_for_it_instead_of_spinning(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """A broker that stops reading (behind, or here SIGSTOPped) leaves paho with data the socket will not take. The
    driver used to step such a unit again at once, in a loop at 100 % of a core; now it waits for the socket to
    become writable (or the unit's timer, every tick_s)."""
    import signal
    import time

    tick = 0.1
    fleet = SimFleet(1, tmp_path / "units", port=mosquitto.port, rate=0, outbox="memory", batch_max_records=1000,
                     window_batches=40,  # 40 MB in flight: more than the loopback socket buffers take
                     tick_s=tick, spread_s=0.0).start()
    assert mosquitto.proc is not None
    unit, driver = fleet.units[0], fleet._drivers[0]
    try:
        wait_for(lambda: fleet.connected() == 1, 10, "the unit connected")
        mosquitto.proc.send_signal(signal.SIGSTOP)
        fleet.put(unit, [RecordIn(type="sim", payload={"x": "y" * 4000}) for _ in range(10000)])  # 40 MB to send
        wait_for(unit.link.wants_write, 20, "paho holding what the socket will not take")
        t0, s0 = time.monotonic(), driver.steps
        wait_for(lambda: driver.steps - s0 >= 10, 20, "ten more steps of the unit")
        assert time.monotonic() - t0 >= 5 * tick, "ten steps without the socket or the timer: a spin"
    finally:
        mosquitto.proc.send_signal(signal.SIGCONT)
        fleet.stop()
