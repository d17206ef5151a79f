"""ElementalAnalyser: the result-block parser (round trip, every kind of damage, resync) and the
driver against the station simulator's analyser on a loopback socket (results, damaged blocks,
silence, a dropped connection)."""

from __future__ import annotations

import time
import zlib

import numpy as np
import pytest

from customs_edge.core.errors import DriverFault, DriverSilent
from customs_edge.drivers.analyser import (
    AnalyserConfig,
    AnalyserParser,
    AnalyserResult,
    AnalyserStatus,
    ElementalAnalyser,
    encode_result,
    encode_status,
)
from customs_edge.simulators.base import Endpoints
from customs_edge.simulators.ore_devices import AnalyserSim
from customs_edge.simulators.ore_world import OreWorld, WorldConfig


def result(seq: int = 7, channels: int = 1024) -> AnalyserResult:
    rng = np.random.default_rng(seq)
    return AnalyserResult(seq=seq, ts=1_700_000_040.0, interval_s=60.0, tonnes=66.25, status="OK",
                          assays={"Fe": 62.31, "SiO2": 4.12, "Al2O3": 2.05, "P": 0.071, "S": 0.012, "H2O": 7.9},
                          live_time_s=60.0, kev_per_channel=9.76563, offset_kev=0.0,
                          counts=rng.poisson(500, channels).astype(np.float32))


def parse_all(data: bytes, chunk: int = 97) -> tuple[list, AnalyserParser]:
    p = AnalyserParser()
    out = []
    for i in range(0, len(data), chunk):
        p.feed(data[i:i + chunk])
        while (item := p.next()) is not None:
            out.append(item)
    return out, p


def test_round_trip_in_small_chunks() -> None:
    r = result()
    items, p = parse_all(encode_result(r) + encode_status(1_700_000_050.0, "RUN", 31.5))
    assert len(items) == 2 and p.corrupt == 0
    got = items[0]
    assert isinstance(got, AnalyserResult)
    assert (got.seq, got.ts, got.tonnes, got.status) == (7, 1_700_000_040.0, 66.25, "OK")
    assert got.assays == pytest.approx(r.assays)
    np.testing.assert_array_equal(got.counts, r.counts)
    assert got.values()["fe"] == pytest.approx(62.31)
    assert isinstance(items[1], AnalyserStatus) and items[1].state == "RUN"


def test_frame_format_is_what_the_docs_say() -> None:
    text = encode_result(result(channels=128)).decode()
    lines = text.split("\r\n")
    assert lines[0] == "$RESULT,7,2023-11-14T22:14:00Z,60.0,66.25,OK"
    assert lines[1] == "$ASSAY,Fe=62.310,SiO2=4.120,Al2O3=2.050,P=0.071,S=0.012,H2O=7.900"
    assert lines[2] == "$SPEC,128,60.00,9.76563,0.000"
    assert lines[3].startswith("$CH,0,") and len(lines[3].split(",")) == 66
    assert lines[4].startswith("$CH,64,")
    body = "".join(line + "\r\n" for line in lines[:5]).encode()
    assert lines[5] == f"$END,{zlib.crc32(body):08X}" and lines[6] == ""


def damage_kinds() -> dict[str, bytes]:
    good = encode_result(result(1))
    body = good.decode()
    return {
        "flipped count": body.replace("$CH,0,", "$CH,0,9", 1).encode(),  # CRC no longer matches
        "truncated": good[: len(good) // 2],
        "missing line": body.replace(body[body.index("$CH,64,"):body.index("$CH,128,")], "").encode(),
        "bad crc": good[:-4] + b"00\r\n",
        "garbage": b"\x00\xff#noise\r\n",
    }


@pytest.mark.parametrize("kind", list(damage_kinds()))
def test_damaged_block_is_counted_and_the_next_one_parsed(kind: str) -> None:
    good = encode_result(result(2))
    items, p = parse_all(damage_kinds()[kind] + good)
    assert [i.seq for i in items] == [2]
    assert p.corrupt >= 1


def test_wrong_channel_count_is_refused_by_the_driver_config() -> None:
    world = OreWorld(WorldConfig(seed=1))
    sim = AnalyserSim(world)
    with Endpoints(sim, use_pty=False):
        pass
    d = ElementalAnalyser("analyser", AnalyserConfig(port="socket://127.0.0.1:1", channels=512))
    d.parser.feed(encode_result(result(3)))
    assert d._next() is None and d.stats.extra["wrong_size"] == 1


@pytest.fixture
def analyser():
    world = OreWorld(WorldConfig(seed=4, speed=120.0, stops_per_h=0, metal_per_h=0))
    sim = AnalyserSim(world, stat_every_s=0.3)
    with Endpoints(sim, use_pty=False) as urls:
        yield world, sim, urls["socket"]


def read_until(d: ElementalAnalyser, kind: str, n: int = 1, timeout: float = 10.0) -> list:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        assert time.monotonic() < deadline, f"no {kind} within {timeout} s"
        r = d.read()
        if r is not None and kind == r.KIND:
            out.append(r)
    return out


def test_results_reach_the_driver_with_the_true_spectrum(analyser) -> None:
    world, _, url = analyser
    with ElementalAnalyser("analyser", AnalyserConfig(port=url)) as d:
        r1, r2 = read_until(d, "analysis", 2)
        assert r2.seq == r1.seq + 1
        sent = {a.seq: a for a in world.results}
        a = sent[r1.seq]
        np.testing.assert_array_equal(r1.spectrum.counts, a.counts)
        assert r1.assay.fe == pytest.approx(a.own["Fe"], abs=1e-3)
        assert r1.spectrum.counts.dtype == np.float32 and r1.spectrum.counts.shape == (1024,)
        assert d.stats.corrupt == 0


def test_damaged_blocks_are_skipped_on_the_wire(analyser) -> None:
    _, sim, url = analyser
    with ElementalAnalyser("analyser", AnalyserConfig(port=url)) as d:
        read_until(d, "analyser_status")
        sim.faults.corrupt_next(2)
        got = read_until(d, "analysis", 1)
        assert sim.faults.corrupted == 2
        assert d.stats.corrupt >= 2
        assert got[0].status in ("OK", "NOLOAD")


def test_silent_analyser_raises_driver_silent(analyser) -> None:
    _, sim, url = analyser
    with ElementalAnalyser("analyser", AnalyserConfig(port=url, silent_after_s=0.8)) as d:
        read_until(d, "analyser_status")
        sim.faults.pause(30)
        with pytest.raises(DriverSilent):
            read_until(d, "never", 1, timeout=5)


def test_dropped_connection_raises_driver_fault() -> None:
    world = OreWorld(WorldConfig(seed=4, speed=120.0))
    ep = Endpoints(AnalyserSim(world, stat_every_s=0.3), use_pty=False)
    urls = ep.start()
    try:
        with ElementalAnalyser("analyser", AnalyserConfig(port=urls["socket"])) as d:
            read_until(d, "analyser_status")
            ep.drop_clients(refuse_for=5)
            with pytest.raises(DriverFault):
                read_until(d, "never", 1, timeout=5)
            assert d.stats.faults == 1
    finally:
        ep.stop()


def _reblock(block: bytes, old: bytes, new: bytes) -> bytes:
    """Edit a block and give it a correct CRC-32 again: well-formed on the wire, hostile in content."""
    body = block[: block.rindex(b"$END,")].replace(old, new, 1)
    return body + f"$END,{zlib.crc32(body):08X}".encode() + b"\r\n"


@pytest.mark.parametrize(("old", "new"), [
    (b"$RESULT,7,", b"$RESULT," + b"9" * 5000 + b","),  # a seq int() refuses to convert
    (b"$SPEC,1024,", b"$SPEC," + b"9" * 5000 + b","),
    (b"Fe=", b"Fe=1e999"),  # an assay float() reads as infinity
    (b"$CH,0,", b"$CH,0," + b"9" * 400 + b"0"),  # a count float32 cannot hold
])
def test_well_formed_hostile_blocks_are_corrupt_not_exceptions(old: bytes, new: bytes) -> None:
    good = encode_result(result())
    hostile = _reblock(good, old, new)
    assert hostile != good
    got, p = parse_all(hostile + good)
    assert p.corrupt >= 1 and len(got) == 1 and got[0].seq == 7  # refused, counted; the next block read
