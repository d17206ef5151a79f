"""Passage (beam) controller: the line protocol, lost-line detection, and the driver on the simulator."""

from __future__ import annotations

import time

import pytest

from customs_edge.core.errors import DriverSilent
from customs_edge.core.readings import Passage, PassageHeartbeat
from customs_edge.drivers.passage import (
    PassageConfig,
    PassageParser,
    PassageSensor,
    decode_line,
    encode_event,
    encode_heartbeat,
)
from customs_edge.simulators.base import Endpoints
from customs_edge.simulators.gate import GateSim
from customs_edge.simulators.gate_world import WorldParams
from customs_edge.simulators.wire import passage as beams


def events(p: PassageParser, data: bytes) -> list:
    p.feed(data)
    out = []
    while (e := p.next()) is not None:
        out.append(e)
    return out


def test_lines_decode() -> None:
    assert encode_event("entry", 12) == b"IN,12\r\n"
    assert encode_event("exit", 1_000_003) == b"OUT,3\r\n"  # six-digit counters wrap
    assert decode_line(b"HB,5,4\r\n") == ("HB", [5, 4])
    for bad in (b"IN\r\n", b"IN,x\r\n", b"OUT,1,2\r\n", b"HELLO,1\r\n", b"IN,1234567\r\n", b"\xff\xfe\r\n"):
        assert decode_line(bad) is None, bad


def test_events_heartbeats_and_garbage() -> None:
    p = PassageParser()
    got = events(p, b"IN,1\r\nOUT,1\r\nnoise\r\n" + encode_heartbeat(1, 1) + b"IN,2\r")
    assert [(e.kind, e.count) for e in got] == [("entry", 1), ("exit", 1), ("heartbeat", 1)]
    assert got[2].exits == 1
    assert p.corrupt == 1 and p.frames == 3
    assert [(e.kind, e.count) for e in events(p, b"\n")] == [("entry", 2)]  # the line completed later


def test_a_counter_jump_reports_lost_events() -> None:
    p = PassageParser()
    got = events(p, b"IN,7\r\nIN,8\r\nIN,11\r\nOUT,3\r\nOUT,4\r\n")
    assert [e.lost for e in got] == [0, 0, 2, 0, 0]
    assert p.lost == 2
    # a controller restart (counter back to 1) is not a loss
    assert [e.lost for e in events(p, b"IN,1\r\n")] == [0]


def test_endless_noise_without_line_ends_is_bounded() -> None:
    p = PassageParser()
    assert events(p, b"x" * 500) == []
    assert p.corrupt == 1 and len(p.buf) == 0


def read_until(drv: PassageSensor, pred, timeout: float) -> list:
    out = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not pred(out):
        r = drv.read()
        if r is not None:
            out.append(r)
    return out


def test_driver_reports_every_beam_break_the_world_makes() -> None:
    """At 2,000/h x 10 the world sends about five travellers a second: every one enters and exits."""
    sim = GateSim(11, WorldParams(rate_per_h=2000), speed=10.0)
    with Endpoints(sim.passage, use_pty=False, tcp_port=0) as urls:
        drv = PassageSensor("passage", PassageConfig(port=urls["socket"]))
        drv.open()
        try:
            got = read_until(drv, lambda out: sum(isinstance(r, Passage) for r in out) >= 12, timeout=20)
        finally:
            drv.close()
    ev = [r for r in got if isinstance(r, Passage)]
    assert len(ev) >= 12
    entries = [r.count for r in ev if r.event == "entry"]
    assert entries == list(range(entries[0], entries[0] + len(entries)))  # consecutive: nothing lost
    assert all(r.lost == 0 for r in ev)
    truth_entries = {t.id for t in sim.world.truth if t.t_entry <= sim.clock.now()}
    assert set(entries) <= truth_entries  # the counter is the traveller's place in the queue


def test_driver_heartbeat_keeps_an_empty_lane_alive_and_silence_faults() -> None:
    sim = GateSim(12, WorldParams(rate_per_h=1), speed=1.0)  # nobody comes
    with Endpoints(sim.passage, use_pty=True, tcp_port=None) as urls:
        drv = PassageSensor("passage", PassageConfig(port=urls["pty"], silent_after_s=1.5))
        drv.open()
        try:
            got = read_until(drv, lambda out: len(out) >= 2, timeout=5)
            assert [type(r) for r in got] == [PassageHeartbeat] * 2
            sim.passage.faults.pause(30)
            with pytest.raises(DriverSilent):
                deadline = time.monotonic() + 6
                while time.monotonic() < deadline:
                    drv.read()
        finally:
            drv.close()


def test_the_simulators_lines_are_the_documented_ones_and_the_driver_reads_them() -> None:
    """docs/gate.md's line format, written by simulators/wire/passage.py (which never imports the driver)."""
    assert beams.beam("entry", 12) == b"IN,12\r\n" and beams.beam("exit", 1_000_003) == b"OUT,3\r\n"
    assert beams.heartbeat(1_000_001, 7) == b"HB,1,7\r\n"
    p = PassageParser()
    got = events(p, beams.beam("entry", 1) + beams.beam("exit", 1) + beams.heartbeat(1, 1) + beams.beam("entry", 3))
    assert [(e.kind, e.count, e.lost) for e in got] == [("entry", 1, 0), ("exit", 1, 0), ("heartbeat", 1, 0),
                                                         ("entry", 3, 1)]
    assert p.corrupt == 0
