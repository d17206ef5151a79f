"""The gate app fed Readings directly: one record per traveller, alerts, thresholds, privacy, counters."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from customs_edge.agent.apps.gate import GateApp, GateAppConfig
from customs_edge.agent.apps.gate_tracker import Tracker
from customs_edge.agent.config import load_unit_config, parse_unit_config
from customs_edge.core.errors import ConfigError, DriverSilent
from customs_edge.core.readings import Passage, ReadingError, ThermalFrame
from customs_edge.core.records import Priority, RecordIn
from customs_edge.drivers.mlx90640 import DeadPixels
from customs_edge.simulators.gate_world import GateWorld, WorldParams

ROOT = Path(__file__).resolve().parent.parent
T0 = 1.7e9  # wall clock of world time 0
QUIET = WorldParams(rate_per_h=900, hot_drink_share=0, sun_share=0, child_share=0, ambient_drift_k=0.3)


def frames(world: GateWorld, t_end: float, rate_hz: float = 8.0, scale: int = 1):
    """(world time, frame) at rate_hz, as the driver delivers them (dead pixels repaired)."""
    dead = DeadPixels()
    times = np.arange(0.0, t_end, 1.0 / rate_hz)
    for i in range(0, len(times), 256):
        chunk = world.render(times[i:i + 256])
        for t, f in zip(times[i:i + 256].tolist(), chunk, strict=True):
            f = np.round(f, 2)
            dead.repair(f)
            yield t, (np.kron(f, np.ones((scale, scale), np.float32)) if scale > 1 else f)


def thermal(t: float, f: np.ndarray, ambient: float = 25.0) -> ThermalFrame:
    return ThermalFrame(source="thermal", ts=T0 + t, mono=t, pixels=f, ambient_c=ambient, dead_pixels=2)


def run(app: GateApp, world: GateWorld, t_end: float, **kw: int) -> list[RecordIn]:
    out: list[RecordIn] = []
    for t, f in frames(world, t_end, **kw):
        out += app.feed(thermal(t, f))
    out += app.tick(t_end + 5.0)  # frames stopped: open tracks close
    return out


def passed(world: GateWorld, t_end: float) -> list:
    return [tr for tr in world.truth if tr.t_out_view < t_end - 0.5]


@pytest.fixture(scope="module")
def febrile_run() -> tuple[GateWorld, list[RecordIn]]:
    world = GateWorld(21, replace(QUIET, febrile_share=0.5))
    app = GateApp("gate-t", GateAppConfig(summary_interval_s=1e9))
    return world, run(app, world, 90.0)


def test_one_screening_per_traveller(febrile_run) -> None:
    world, recs = febrile_run
    screenings = [r for r in recs if r.type == "screening"]
    n = len(passed(world, 90.0))
    assert n >= 15
    assert len(screenings) == n
    assert len({r.payload["traveller"] for r in screenings}) == n
    assert all(r.priority == Priority.EVENT for r in screenings)


def test_fever_alerts_are_highest_priority_and_follow_the_truth(febrile_run) -> None:
    world, recs = febrile_run
    truth = passed(world, 90.0)
    screenings = sorted((r for r in recs if r.type == "screening"), key=lambda r: r.ts)
    alerts = [r for r in recs if r.type == "fever_alert"]
    # travellers pass in queue order: the i-th screening is the i-th traveller
    truth.sort(key=lambda tr: tr.t_exit)
    for tr, rec in zip(truth, screenings, strict=True):
        assert abs(rec.payload["estimate_c"] - tr.core_c) < 0.6
        assert rec.payload["decision"] == ("fever" if tr.febrile else "normal")
        assert 0.5 <= rec.payload["confidence"] <= 1.0
    assert len(alerts) == sum(tr.febrile for tr in truth) >= 4
    for a in alerts:
        assert a.priority == Priority.ALERT
        assert a.payload["estimate_c"] >= 37.3 and a.payload["threshold_c"] == 37.3
        assert 0.5 <= a.payload["confidence"] <= 1.0
        assert "thumbnail" not in a.payload  # off by default


def test_raw_frames_never_leave_in_records(febrile_run) -> None:
    _, recs = febrile_run
    for r in recs:
        text = json.dumps(r.payload)  # plain JSON, nothing array-like slipped in
        assert len(text) < 800, r.type


def test_threshold_is_configurable() -> None:
    world = GateWorld(22, replace(QUIET, febrile_share=0.6))
    by_thr = {}
    for thr in (37.3, 38.0, 38.8):
        w = GateWorld(22, replace(QUIET, febrile_share=0.6))
        recs = run(GateApp("gate-t", GateAppConfig(threshold_c=thr)), w, 60.0)
        sc = [r for r in recs if r.type == "screening"]
        assert all((r.payload["estimate_c"] >= thr) == (r.payload["decision"] == "fever") for r in sc)
        assert all(r.payload["threshold_c"] == thr for r in sc)
        by_thr[thr] = sum(r.type == "fever_alert" for r in recs)
        world = w
    febrile = [tr.core_c for tr in passed(world, 60.0) if tr.febrile]
    assert by_thr[37.3] == len(febrile) > by_thr[38.0] > by_thr[38.8] >= 0
    assert by_thr[38.8] <= sum(c > 38.5 for c in febrile)


def test_thumbnail_on_alert_when_enabled() -> None:
    world = GateWorld(23, replace(QUIET, febrile_share=1.0))
    recs = run(GateApp("gate-t", GateAppConfig(thumbnail_on_alert=True, thumbnail_width_px=16)), world, 20.0)
    alerts = [r for r in recs if r.type == "fever_alert"]
    assert alerts
    th = alerts[0].payload["thumbnail"]
    assert (th["w"], th["h"]) == (16, 12) and len(th["data"]) == 192
    assert max(th["data"]) * th["scale"] > 30  # the traveller is in it


def test_frames_of_another_resolution_are_refused_by_a_model_for_other_optics() -> None:
    """The tracker follows the same scene at twice the resolution, one track per traveller; the app, whose
    model was trained for 32x24, refuses those frames with one app_error naming the fix (a model per optics:
    tests/test_thermal_cameras.py)."""
    world = GateWorld(24, QUIET)
    tracker = Tracker()
    found = [x for t, f in frames(world, 40.0, scale=2) for x in tracker.process(f, t, t)] + tracker.flush()
    assert len(found) == len(passed(world, 40.0)) >= 5
    app = GateApp("gate-t", GateAppConfig(fg_delta_k=2.0))
    recs = run(app, GateWorld(24, QUIET), 10.0, scale=2)
    assert [r.type for r in recs] == ["app_error"] and "the camera is 64x48" in recs[0].payload["error"]


def test_lane_summary_counts_passages_and_screenings() -> None:
    world = GateWorld(25, QUIET)
    app = GateApp("gate-t", GateAppConfig(summary_interval_s=30.0))
    recs: list[RecordIn] = []
    events = world.passage_events(0.0, 61.0)
    k = 0
    n_in = 0
    for t, f in frames(world, 61.0):
        while k < len(events) and events[k][0] <= t:
            _, kind, _ = events[k]
            n_in += kind == "entry"
            lost = 2 if k == 3 else 0  # the controller's counter jumped: two lines were lost
            recs += app.feed(Passage(source="passage", ts=T0 + t, mono=t, event=kind, count=k + 1, lost=lost))
            k += 1
        recs += app.feed(thermal(t, f))
        recs += app.tick(t)
    summaries = [r for r in recs if r.type == "lane_summary"]
    assert len(summaries) == 2 and all(s.priority == Priority.TELEMETRY for s in summaries)
    total = summaries[-1].payload["totals"]
    assert total["entries"] + total["exits"] == len(events) + 2
    assert sum(s.payload["screened"] for s in summaries) == sum(r.type == "screening" for r in recs) > 0
    assert sum(s.payload["frames"] for s in summaries) >= 30 * 8
    assert summaries[0].payload["dead_pixels"] == 2
    assert summaries[0].payload["passage_lost"] + summaries[1].payload["passage_lost"] == 2
    assert n_in >= 5


def test_a_dead_sensor_closes_open_tracks() -> None:
    world = GateWorld(26, QUIET)
    world.ensure(30)
    tr = world.truth[0]
    app = GateApp("gate-t", GateAppConfig())
    recs: list[RecordIn] = []
    for t, f in frames(world, (tr.t_entry + tr.t_exit) / 2 + 0.3):
        recs += app.feed(thermal(t, f))
    assert not any(r.type == "screening" for r in recs)  # still walking when the sensor died
    out = app.on_fault("thermal", DriverSilent("thermal: no valid frame for 3.0 s"))
    assert [r.type for r in out][:1] == ["driver_fault"]
    assert sum(r.type == "screening" for r in out) == 1


def test_a_warm_fixture_is_not_a_traveller() -> None:
    app = GateApp("gate-t", GateAppConfig())
    rng = np.random.default_rng(0)
    recs: list[RecordIn] = []
    for i in range(600):
        f = (22.0 + 0.1 * rng.standard_normal((24, 32))).astype(np.float32)
        f[10:14, 3:6] = 34.0  # a warm screen in view, skin-warm
        recs += app.feed(thermal(i / 8, f))
    recs += app.close()
    assert not any(r.type in ("screening", "fever_alert") for r in recs)
    assert app.tracker.fixtures >= 1


def test_config_file_and_refusals() -> None:
    cfg = load_unit_config(ROOT / "configs" / "gate.yaml")
    assert isinstance(cfg.app, GateAppConfig) and cfg.app.threshold_c == 37.3
    raw = {"device_id": "g", "type": "gate", "drivers": {"thermal": {"driver": "mlx90640-serial", "port": "x"}},
           "app": {"treshold_c": 37.5}}
    with pytest.raises(ConfigError, match="did you mean 'threshold_c'"):
        parse_unit_config(raw)
    raw["app"] = {"threshold_c": 45}
    with pytest.raises(ConfigError, match="threshold_c"):
        parse_unit_config(raw)
    raw["app"] = {}
    raw["drivers"] = {"passage": {"driver": "passage", "port": "x"}}
    with pytest.raises(ConfigError, match="needs a driver named 'thermal'"):
        parse_unit_config(raw)
    raw["drivers"] = {"thermal": {"driver": "mlx90640-serial", "port": "x"},
                      "passage": {"driver": "mlx90640-serial", "port": "y"}}
    with pytest.raises(ConfigError, match="passage"):
        parse_unit_config(raw)


def test_malformed_frames_and_values_are_refused_where_the_reading_is_made() -> None:
    ok = np.full((24, 32), 22.0, np.float32)
    bad_pixels = ok.copy()
    bad_pixels[3, 4] = np.nan
    for arr in (np.zeros(768, np.float32), np.zeros((0, 0), np.float32), np.zeros((24, 32, 3), np.float32),
                bad_pixels):
        with pytest.raises(ReadingError, match=r"ThermalFrame\.pixels"):
            ThermalFrame(source="thermal", pixels=arr)
    with pytest.raises(ReadingError, match=r"ThermalFrame\.ambient_c"):
        ThermalFrame(source="thermal", pixels=ok, ambient_c=float("inf"))
    with pytest.raises(ReadingError, match=r"ThermalFrame\.dead_pixels"):
        ThermalFrame(source="thermal", pixels=ok, dead_pixels=-1)
    with pytest.raises(ReadingError, match=r"Passage\.lost"):
        Passage(source="passage", event="entry", count=1, lost=float("nan"))  # type: ignore[arg-type]
    app = GateApp("g", GateAppConfig())
    assert app.feed(ThermalFrame(source="thermal", pixels=np.zeros((2, 2), np.float32))) == []  # no head fits
    assert app.feed(ThermalFrame(source="thermal", pixels=ok)) == []
    assert app.feed(Passage(source="passage", event="entry", count=1)) == []
    assert app.totals["entries"] == 1
    assert app._w["bad_frames"] == 1 and app._w["frames"] == 1
