"""Radiometric cameras beyond the MLX90640: the raw Y16 frame driver (thermal-raw) against a hand-built
fixture and the simulator over a loopback socket; per-optics models, and the gate app refusing a model
trained for other optics."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from customs_edge.agent.apps.gate import GateApp, GateAppConfig
from customs_edge.agent.apps.gate_tracker import Tracker
from customs_edge.core.errors import ConfigError, DriverFault
from customs_edge.core.readings import ThermalFrame
from customs_edge.drivers.thermal_raw import RawFrameParser, ThermalRaw, ThermalRawConfig
from customs_edge.models import default_manifest
from customs_edge.simulators.base import Endpoints
from customs_edge.simulators.gate import GateSim
from customs_edge.simulators.gate_world import IR384, LEPTON35, GateWorld, WorldParams
from customs_edge.simulators.wire import thermal_raw as wire

FIXTURE = Path(__file__).parent / "fixtures" / "gate" / "raw_frame_4x3.hex"
LEPTON_MODEL = default_manifest("fever_lepton35")


def fixture_bytes() -> bytes:
    return bytes.fromhex(" ".join(line for line in FIXTURE.read_text().splitlines() if not line.startswith("#")))


def test_fixture_frame_decodes_as_the_docs_table_says() -> None:
    p = RawFrameParser()
    p.feed(fixture_bytes())
    f = p.next()
    assert f is not None and p.frames == 1 and p.corrupt == 0
    assert f.pixels.shape == (3, 4) and f.counter == 7 and f.uptime_us == 1_000_000
    assert f.housing_c == pytest.approx(29.5) and not f.ffc
    assert f.pixels[0].tolist() == pytest.approx([37.0, 37.01, 37.02, 37.03], abs=1e-3)
    assert f.pixels[1].tolist() == pytest.approx([36.0] * 4, abs=1e-3)
    assert f.dead == 1 and f.pixels[2, 0] == pytest.approx((36.0 + 37.0) / 2, abs=1e-3)  # its neighbours


def test_simulator_encodes_the_fixture_byte_for_byte() -> None:
    """The simulator's encoder (written from the docs too) gives the hand-built bytes."""
    c = np.array([[37.0, 37.01, 37.02, 37.03], [36.0] * 4, [-273.15, 37.0, 37.0, 37.0]])
    assert wire.frame(c, 7, 1_000_000, 29.5) == fixture_bytes()


def test_corrupt_bytes_are_counted_and_the_stream_resynchronises() -> None:
    good = fixture_bytes()
    bad = bytearray(good)
    bad[40] ^= 0x10  # a flipped bit in the payload: the CRC fails
    p = RawFrameParser()
    p.feed(b"\x00garbage" + bytes(bad) + good[:20])
    assert p.next() is None
    p.feed(good[20:] + good)
    frames = [p.next(), p.next(), p.next()]
    assert frames[0] is not None and frames[1] is not None and frames[2] is None
    assert p.frames == 2 and p.corrupt == 1 and p.resyncs >= 1


def _pump(drv: ThermalRaw, out: queue.Queue, stop: threading.Event) -> None:
    drv.open()
    try:
        while not stop.is_set():
            try:
                r = drv.read()
            except DriverFault as exc:
                out.put(exc)
                stop.wait(0.2)
                continue
            if r is not None:
                out.put(r)
    finally:
        drv.close()


def test_driver_reads_the_lepton_simulator_over_a_socket_and_the_app_screens() -> None:
    params = WorldParams(rate_per_h=2000, febrile_share=0.3, sun_share=0, hot_drink_share=0, child_share=0,
                         optics=LEPTON35)
    sim = GateSim(5, params, speed=3.0, ffc_every_s=2.0)
    with Endpoints(sim.thermal, use_pty=False, tcp_port=0) as urls:
        drv = ThermalRaw("thermal", ThermalRawConfig(port=urls["socket"], width=160, height=120))
        q: queue.Queue = queue.Queue()
        stop = threading.Event()
        t = threading.Thread(target=_pump, args=(drv, q, stop), daemon=True)
        t.start()
        app = GateApp("lepton", GateAppConfig(summary_interval_s=1e9, model=LEPTON_MODEL, warmup_s=0,
                                              frame_size=(160, 120)))
        recs, frames, faults = [], 0, []
        deadline = time.monotonic() + 6.0

        def enough() -> bool:  # what the asserts below need: no more waiting once it is all there
            screened = sum(r.type == "screening" for r in recs)
            return frames >= 30 and drv.stats.extra.get("ffc", 0) >= 1 and screened >= 3

        while time.monotonic() < deadline and not enough():
            try:
                item = q.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(item, DriverFault):
                faults.append(item)
                continue
            assert isinstance(item, ThermalFrame) and item.pixels.shape == (120, 160)
            frames += 1
            recs += app.feed(item)
        stop.set()
        t.join(5)
    recs += app.close()
    assert not faults
    assert frames >= 30 and drv.stats.corrupt == 0
    assert drv.stats.extra["ffc"] >= 1  # shutter frames were flagged and not delivered
    screenings = [r for r in recs if r.type == "screening"]
    assert len(screenings) >= 3
    assert all(r.payload["model"] for r in screenings) and not [r for r in recs if r.type == "app_error"]


def test_driver_faults_on_a_camera_in_another_resolution() -> None:
    sim = GateSim(5, WorldParams(optics=LEPTON35), speed=1.0)
    with Endpoints(sim.thermal, use_pty=False, tcp_port=0) as urls:
        drv = ThermalRaw("thermal", ThermalRawConfig(port=urls["socket"], width=384, height=288))
        drv.open()
        try:
            deadline = time.monotonic() + 5.0
            with pytest.raises(DriverFault, match="sends 160x120 frames, the config says 384x288"):
                while time.monotonic() < deadline:
                    drv.read()
        finally:
            drv.close()


def test_app_refuses_a_model_trained_for_other_optics() -> None:
    with pytest.raises(ConfigError) as exc:
        GateApp("g", GateAppConfig(frame_size=(160, 120)))  # the default model: the MLX90640's
    text = "; ".join(exc.value.problems)
    assert "mlx90640-bab (32x24" in text and "160x120" in text and "fever_lepton35" in text
    with pytest.raises(ConfigError, match="57° wide"):
        GateApp("g", GateAppConfig(hfov_deg=57.0))
    app = GateApp("g", GateAppConfig(model=LEPTON_MODEL))
    assert app.optics["cols"] == 160 and app.hfov_deg == 57.0
    # frames of another size reach it anyway: refused, counted, said once
    f = ThermalFrame(source="thermal", pixels=np.full((24, 32), 22.0, dtype=np.float32))
    out = app.feed(f) + app.feed(f)
    assert [r.type for r in out] == ["app_error"] and "32x24" in out[0].payload["error"]
    assert app._w["bad_frames"] == 2 and app._w["wrong_optics"] == 2


@pytest.mark.parametrize("optics", [LEPTON35, IR384], ids=lambda o: o.name)
def test_tracker_counts_travellers_at_each_resolution(optics: object) -> None:
    world = GateWorld(3, WorldParams(rate_per_h=2000, optics=optics))  # type: ignore[arg-type]
    tracker = Tracker()
    rate = world.optics.rate_hz
    span = 40.0 if optics is LEPTON35 else 14.0  # 384 x 288 costs ~6x more per frame
    times = np.arange(0.0, span, 1.0 / rate)
    found = []
    for i in range(0, len(times), 32):
        for t, frame in zip(times[i:i + 32], world.render(times[i:i + 32], dead=False), strict=True):
            found += tracker.process(frame, float(t), float(t))
    found += tracker.flush()
    inside = [tr for tr in world.truth if tr.t_out_view < span]
    seen = [tr for tr in world.truth if tr.t_in_view < span - 0.5]  # a traveller still in view is flushed
    assert len(inside) <= len(found) <= len(seen) and len(inside) >= 5
    assert world.render(np.array([0.0])).shape == (1, optics.rows, optics.cols)  # type: ignore[attr-defined]


def test_manifests_state_their_optics() -> None:
    import json

    for name, cols in (("fever", 32), ("fever_lepton35", 160), ("fever_ir384", 384)):
        o = json.loads(default_manifest(name).read_text())["training"]["optics"]
        assert o["cols"] == cols and o["hfov_deg"] > 0


def test_world_keeps_the_mlx90640_unchanged() -> None:
    """The default optics render exactly as before optics existed (the shipped model and its figures
    depend on it): the digest was taken from main before this change."""
    import hashlib

    a = GateWorld(1, WorldParams(rate_per_h=2000)).render(np.arange(0, 30, 0.125))
    assert hashlib.sha256(a.tobytes()).hexdigest() == \
        "52acf39484598fa4d967e3f3de900f117d387a0be06dfd324c843baaac06623a"


def test_simulate_gate_cli_serves_a_lepton_an_environment_sensor_and_a_relay() -> None:
    import json
    import subprocess
    import sys

    from customs_edge.drivers.environment import EnvironmentConfig, EnvironmentSensor

    proc = subprocess.Popen([sys.executable, "-m", "customs_edge", "simulate", "gate", "--seed", "2", "--camera",
                             "lepton35", "--environment", "--humidity", "55", "--relay", "--no-pty", "--tcp-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        urls = json.loads(proc.stdout.readline())["urls"]
        assert set(urls) == {"thermal", "passage", "environment", "signal"}
        cam = ThermalRaw("thermal", ThermalRawConfig(port=urls["thermal"]["socket"], width=160, height=120))
        env = EnvironmentSensor("environment", EnvironmentConfig(port=urls["environment"]["socket"],
                                                                 poll_interval_s=0.05))
        cam.open()
        env.open()
        try:
            deadline = time.monotonic() + 10.0
            frame = air = None
            while time.monotonic() < deadline and (frame is None or air is None):
                frame = frame or cam.read()
                air = air or env.read()
        finally:
            cam.close()
            env.close()
        assert isinstance(frame, ThermalFrame) and frame.pixels.shape == (120, 160)
        assert air is not None and air.humidity_pct == 55.0 and 18.0 < air.temperature_c < 26.0  # the hall's air
    finally:
        proc.terminate()
        proc.wait(10)
