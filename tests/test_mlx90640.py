"""GY-MCU90640 frame parser and driver: captured bytes, corrupt frames, a property, and the real link."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from customs_edge.core.errors import DriverFault, DriverSilent
from customs_edge.core.readings import ThermalFrame
from customs_edge.drivers.mlx90640 import (
    BAUD_ARGS,
    CMD_MODE,
    CMD_RATE,
    COLS,
    FRAME_LEN,
    MODE_AUTO,
    MODE_QUERY,
    RATE_ARGS,
    ROWS,
    DeadPixels,
    Mlx90640Config,
    Mlx90640Parser,
    Mlx90640Serial,
    ThermalSource,
    checksum,
    command,
    encode,
)
from customs_edge.simulators.base import Endpoints
from customs_edge.simulators.gate import GateSim
from customs_edge.simulators.gate_world import WorldParams
from customs_edge.simulators.wire import gymcu90640 as module

FIX = Path(__file__).resolve().parent / "fixtures" / "gate"


def frame_of(value: float, ambient: float = 25.0) -> np.ndarray:
    return np.full((ROWS, COLS), value, dtype=np.float32)


def parse_all(p: Mlx90640Parser, data: bytes, chunk: int = 0) -> list:
    out = []
    if chunk:
        for i in range(0, len(data), chunk):
            p.feed(data[i:i + chunk])
            while (f := p.next()) is not None:
                out.append(f)
    else:
        p.feed(data)
        while (f := p.next()) is not None:
            out.append(f)
    return out


# --- wire format -------------------------------------------------------------------------------
def test_commands_match_the_module_manual_bytes() -> None:
    assert command(0x35, 0x02) == bytes.fromhex("A53502DC")  # automatic output
    assert command(0x35, 0x01) == bytes.fromhex("A53501DB")  # query one frame
    assert command(0x25, 0x01) == bytes.fromhex("A52501CB")  # 1 Hz (the manual; see commands.txt)
    assert module.commands(bytearray.fromhex("A53502DC")) == [(0x35, 0x02)]  # the simulator reads them back
    assert module.commands(bytearray.fromhex("A53502DD")) == []  # a wrong sum is ignored


def test_frame_layout_and_checksum_rule_by_hand() -> None:
    pixels = np.arange(ROWS * COLS, dtype=np.float64).reshape(ROWS, COLS) * 0.01 + 20.0
    pixels[0, 0] = -5.0  # negative values are two's complement on the wire
    raw = encode(pixels, 31.25)
    assert len(raw) == FRAME_LEN == 1544
    assert raw[:4] == bytes.fromhex("5A5A0206")
    words = [int.from_bytes(raw[i:i + 2], "little") for i in range(0, 1542, 2)]
    # the STM32 firmware's rule written out: 0x5A5A + 0x0602 + every pixel + Ta, kept to 16 bits
    expected = (0x5A5A + 0x0602 + sum(words[2:770]) + words[770]) & 0xFFFF
    assert int.from_bytes(raw[1542:], "little") == expected == checksum(raw[:1542])
    assert int.from_bytes(raw[4:6], "little", signed=True) == -500
    assert int.from_bytes(raw[1540:1542], "little", signed=True) == 3125


def test_roundtrip_values_and_orientation() -> None:
    pixels = np.zeros((ROWS, COLS))
    pixels[2, 30] = 36.61  # row-major: row 2, column 30
    frames = parse_all(Mlx90640Parser(), encode(pixels + 21.0, 24.5))
    assert len(frames) == 1
    f = frames[0]
    assert f.pixels.shape == (24, 32) and f.pixels.dtype == np.float32
    assert f.pixels[2, 30] == pytest.approx(57.61, abs=1e-4)
    assert f.pixels[0, 0] == pytest.approx(21.0)
    assert f.ambient_c == pytest.approx(24.5)


# --- captured stream ---------------------------------------------------------------------------
def test_captured_stream_with_corrupt_and_short_frames() -> None:
    meta = json.loads((FIX / "capture.json").read_text())
    data = (FIX / "capture.bin").read_bytes()
    for chunk in (0, 1, 97, 1544):
        p = Mlx90640Parser()
        frames = parse_all(p, data, chunk)
        assert p.frames == len(frames) == meta["frames"]
        assert p.corrupt == meta["corrupt"], chunk
        assert p.resyncs >= 2  # the leading tail and the remains of the damaged frames
        for got, want in zip(frames, meta["good"], strict=True):
            assert got.ambient_c == pytest.approx(want["ambient_c"], abs=0.006)
            assert float(got.pixels.max()) == pytest.approx(want["max_c"], abs=0.006)
            assert hashlib.sha256(got.raw).hexdigest() == want["wire_sha256"]
            assert got.dead == want["dead_pixels"]


def test_capture_without_checksum_check_accepts_the_flipped_frame() -> None:
    """With checksum 'none' only the size is checked: the bit flip goes through, the short frame not."""
    meta = json.loads((FIX / "capture.json").read_text())
    p = Mlx90640Parser("none")
    frames = parse_all(p, (FIX / "capture.bin").read_bytes())
    assert len(frames) == meta["frames"] + 1
    assert p.corrupt == 1


def test_bad_checksum_resyncs_on_the_next_header() -> None:
    good = encode(frame_of(30.0), 25.0)
    bad = encode(frame_of(31.0), 25.0, good_checksum=False)
    p = Mlx90640Parser()
    frames = parse_all(p, bad + good + bad + good)
    assert [float(f.pixels[0, 0]) for f in frames] == [30.0, 30.0]
    assert p.corrupt == 2 and p.frames == 2


def test_wrong_size_field_is_corrupt() -> None:
    raw = bytearray(encode(frame_of(30.0), 25.0))
    raw[2:4] = (1000).to_bytes(2, "little")
    p = Mlx90640Parser()
    assert parse_all(p, bytes(raw) + encode(frame_of(29.0), 25.0))[0].pixels[0, 0] == pytest.approx(29.0)
    assert p.corrupt == 1


def test_damaged_header_after_sync_counts_as_corrupt() -> None:
    first, second = encode(frame_of(30.0), 25.0), bytearray(encode(frame_of(31.0), 25.0))
    second[1] = 0x00  # header destroyed: the frame can only be skipped
    p = Mlx90640Parser()
    frames = parse_all(p, first + bytes(second) + first)
    assert len(frames) == 2 and p.corrupt == 1


def test_dead_pixels_are_replaced_by_neighbours_and_counted() -> None:
    px = frame_of(30.0)
    px[5, 5] = 34.0
    px[5, 6] = -273.15  # stuck far outside the sensor's range
    px[0, 0] = 400.0
    frames = parse_all(p := Mlx90640Parser(), encode(px, 25.0))
    f = frames[0]
    assert f.dead == 2 and p.dead_pixels == 2
    assert f.pixels[5, 6] == pytest.approx((34.0 + 30 + 30 + 30) / 4)
    assert f.pixels[0, 0] == pytest.approx(30.0)
    dp = DeadPixels()
    again = px.copy()
    assert dp.repair(again) == 2 and dp.repair(px.copy()) == 2  # the cached plan gives the same answer
    assert np.all(again > 0)


frames_st = st.lists(st.floats(min_value=-20, max_value=120, allow_nan=False), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(values=frames_st, garbage=st.lists(st.binary(max_size=40), min_size=5, max_size=5),
       chunk=st.integers(min_value=1, max_value=2000), flip=st.integers(min_value=4 * 8, max_value=1544 * 8 - 1),
       damaged=st.integers(min_value=0, max_value=4))
def test_property_valid_frames_survive_garbage_and_any_single_bit_flip_is_caught(
        values: list[float], garbage: list[bytes], chunk: int, flip: int, damaged: int) -> None:
    """Whatever noise sits between frames and however the bytes are split, every intact frame comes
    out, in order; a frame with any one bit flipped after its header never does."""
    stream = bytearray()
    want = []
    for i, v in enumerate(values):
        g = garbage[i].replace(b"\x5a", b"\x00")  # noise that cannot fake a header
        stream += g
        raw = bytearray(encode(frame_of(v), 20.0 + i))
        if i == damaged:
            raw[flip // 8] ^= 1 << (flip % 8)
        else:
            want.append(round(float(np.rint(np.float64(np.float32(v)) * 100)) / 100, 2))  # what the frame carries
        stream += raw
    p = Mlx90640Parser()
    got = [round(float(f.pixels[0, 0]), 2) for f in parse_all(p, bytes(stream), chunk)]
    assert got == want
    assert p.frames == len(want)
    assert p.corrupt >= (1 if damaged < len(values) else 0)


# --- the driver on a real link --------------------------------------------------------------------
def test_driver_satisfies_the_thermal_source_interface() -> None:
    drv = Mlx90640Serial("thermal", Mlx90640Config(port="loop://"))
    assert isinstance(drv, ThermalSource)


def test_config_refuses_unknown_rate_and_keys() -> None:
    with pytest.raises(ValueError, match="rate_hz"):
        Mlx90640Config(port="/dev/ttyUSB0", rate_hz=3)
    with pytest.raises(ValueError, match="extra"):
        Mlx90640Config.model_validate({"driver": "mlx90640-serial", "port": "x", "rate": 8})


def read_until(drv: Mlx90640Serial, n: int, timeout: float = 10.0) -> list:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        r = drv.read()
        if r is not None:
            out.append(r)
    return out


@pytest.mark.parametrize("kind", ["pty", "socket"])
def test_driver_starts_the_module_and_reads_frames(kind: str) -> None:
    sim = GateSim(3, WorldParams(rate_per_h=2000), speed=2.0)
    with Endpoints(sim.thermal, use_pty=kind == "pty", tcp_port=0 if kind == "socket" else None) as urls:
        drv = Mlx90640Serial("thermal", Mlx90640Config(port=urls[kind], rate_hz=4))
        drv.open()
        try:
            readings = read_until(drv, 5)
        finally:
            drv.close()
    assert len(readings) == 5
    assert (0x25, 0x03) in sim.thermal.commands and (0x35, 0x02) in sim.thermal.commands  # 4 Hz
    r = readings[0]
    assert isinstance(r, ThermalFrame) and r.source == "thermal"
    assert r.pixels.shape == (24, 32)
    assert 10 < float(np.median(r.pixels)) < 35
    assert isinstance(r.ambient_c, float)
    assert r.dead_pixels == 2  # the world's two dead pixels, replaced
    assert float(r.pixels.min()) > -40


def test_module_sends_nothing_until_told() -> None:
    sim = GateSim(3, speed=1.0)
    with Endpoints(sim.thermal, use_pty=True, tcp_port=None) as urls:
        drv = Mlx90640Serial("thermal", Mlx90640Config(port=urls["pty"], send_commands=False, silent_after_s=0.6))
        drv.open()
        try:
            with pytest.raises(DriverSilent):
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    assert drv.read() is None
        finally:
            drv.close()
    assert sim.thermal.sent == 0


def test_corrupt_frames_on_the_wire_are_counted_and_skipped() -> None:
    sim = GateSim(4, speed=4.0, corrupt_rate=0.3)
    with Endpoints(sim.thermal, use_pty=True, tcp_port=None) as urls:
        drv = Mlx90640Serial("thermal", Mlx90640Config(port=urls["pty"]))
        drv.open()
        try:
            readings = read_until(drv, 20, timeout=15)
        finally:
            drv.close()
    assert len(readings) == 20
    assert drv.stats.corrupt >= 2
    assert sim.faults.corrupted >= drv.stats.corrupt - 1  # nothing counted that was not damaged (+ a tail)
    assert all(float(r.pixels.min()) > -40 for r in readings)


def test_frozen_sensor_faults_and_silence_faults() -> None:
    sim = GateSim(5, speed=4.0)
    with Endpoints(sim.thermal, use_pty=True, tcp_port=None) as urls:
        drv = Mlx90640Serial("thermal", Mlx90640Config(port=urls["pty"], frozen_after=5, silent_after_s=0.5))
        drv.open()
        try:
            assert len(read_until(drv, 3)) == 3
            sim.faults.stall(30)
            with pytest.raises(DriverFault, match="frozen"):
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    drv.read()
            assert drv.stats.extra["frozen"] == 1
            sim.faults.stall(0)
            sim.faults.pause(30)
            with pytest.raises(DriverSilent):
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    drv.read()
            sim.faults.resume()
            drv.close()
            drv.open()  # what the runtime does after a fault: reopen, and frames flow again
            assert len(read_until(drv, 2)) == 2
        finally:
            drv.close()


def test_a_flood_of_false_headers_is_one_corrupt_frame_not_one_per_byte() -> None:
    good = encode(np.full((24, 32), 30.0, np.float32), 22.0)
    p = Mlx90640Parser()
    p.feed(good + b"\x5a" * 100 + good + good)
    frames = 0
    while p.next() is not None:
        frames += 1
    assert frames == 3 and p.corrupt == 1


# --- the module's command table, read from its manual, and the frame rate it really runs at -------------
def manual_commands() -> list[tuple[bytes, str, str]]:
    rows = [line.split("\t") for line in (FIX / "commands.txt").read_text().splitlines() if not line.startswith("#")]
    return [(bytes.fromhex(b), setting, value) for b, setting, value in rows]


@pytest.mark.parametrize(("raw", "setting", "value"), manual_commands())
def test_commands_are_the_manual_bytes_in_the_driver_and_in_the_simulator(raw: bytes, setting: str,
                                                                            value: str) -> None:
    code, arg = raw[1], raw[2]
    assert module.command(code, arg) == raw and module.commands(bytearray(raw)) == [(code, arg)]
    if setting == "rate_hz":
        assert command(CMD_RATE, RATE_ARGS[float(value)]) == raw
        assert module.RATE_HZ[arg] == float(value)
    elif setting == "baudrate":
        assert command(0x15, BAUD_ARGS[int(value)]) == raw and module.BAUD_RATES[arg] == int(value)
    else:
        assert command(CMD_MODE, {"query": MODE_QUERY, "automatic": MODE_AUTO}[value]) == raw


def count_frames(drv: Mlx90640Serial, seconds: float) -> list[DriverFault]:
    """Read for `seconds`; the DriverFaults raised on the way."""
    faults: list[DriverFault] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            drv.read()
        except DriverFault as exc:
            faults.append(exc)
    return faults


def test_configured_8_hz_makes_the_module_send_8_frames_a_second() -> None:
    sim = GateSim(6, speed=1.0, rate_hz=1.0)
    with Endpoints(sim.thermal, use_pty=True, tcp_port=None) as urls:
        drv = Mlx90640Serial("thermal", Mlx90640Config(port=urls["pty"], rate_hz=8, rate_window_s=2.0))
        drv.open()
        try:
            faults = count_frames(drv, 4.5)
        finally:
            drv.close()
    assert (CMD_RATE, 0x04) in sim.thermal.commands and sim.thermal.rate_hz == 8.0
    assert faults == [] and drv.stats.extra["rate_low"] == 0
    assert 6000 <= drv.stats.extra["frame_rate_mhz"] <= 10000  # measured over the last 2 s window


def test_a_module_slower_than_rate_hz_is_reported_once() -> None:
    """A module left at 2 Hz (commands not sent) while 8 Hz is configured: one DriverFault that says so
    after the first window, then only a counter."""
    sim = GateSim(6, speed=1.0, rate_hz=2.0, autostart=True)
    with Endpoints(sim.thermal, use_pty=True, tcp_port=None) as urls:
        drv = Mlx90640Serial("thermal", Mlx90640Config(port=urls["pty"], rate_hz=8, send_commands=False,
                                                       rate_window_s=1.5))
        drv.open()
        try:
            faults = count_frames(drv, 5.5)
        finally:
            drv.close()
    assert len(faults) == 1 and "frames/s" in str(faults[0]) and "rate_hz 8" in str(faults[0])
    assert drv.stats.extra["rate_low"] >= 2 and 1500 <= drv.stats.extra["frame_rate_mhz"] <= 2500
