"""The gate's blackbody reference (constant-offset calibration) and the validity of every screening:
a drifting camera is cancelled, a missing, occluded or drifting reference makes screenings invalid
(never dropped, never silently accepted), and warm-up, distance, crowding and ambient are tagged."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from customs_edge.agent.apps.gate import GateApp, GateAppConfig, Screening
from customs_edge.agent.apps.gate_reference import ReferenceConfig
from customs_edge.core.readings import ThermalFrame
from customs_edge.core.records import RecordIn
from customs_edge.drivers.mlx90640 import DeadPixels
from customs_edge.simulators.gate import build_parser
from customs_edge.simulators.gate_world import GateWorld, TravellerTruth, WorldParams
from customs_edge.training.fever import _match

QUIET = WorldParams(rate_per_h=900, hot_drink_share=0, sun_share=0, child_share=0, ambient_drift_k=0.3)
BB = (20, 23, 28, 31)  # a blackbody low in the frame's right-hand corner, beside the lane
DRIFTING = replace(QUIET, rate_per_h=1500, camera_offset_c=1.5, camera_drift_k=1.0, camera_drift_period_s=7200,
                   blackbody=BB)


def ref(box: tuple[int, int, int, int] = BB, **kw: Any) -> ReferenceConfig:
    return ReferenceConfig(rows=box[:2], cols=box[2:], setpoint_c=35.0, **kw)


class Run:
    """Frames of a world fed to gate apps through `feed`, keeping their records and Screening objects."""

    def __init__(self, world: GateWorld, t_end: float, *apps: GateApp, ambient: float = 25.0,
                 merge: GateWorld | None = None) -> None:
        self.world, self.apps = world, apps
        self.records: list[list[RecordIn]] = [[] for _ in apps]
        self.screenings: list[list[Screening]] = [[] for _ in apps]
        self.offsets: list[tuple[float, float | None]] = []  # (world time, the first app's applied offset)
        for k, app in enumerate(apps):
            screen = app.screen

            def spy(tracks: list, k: int = k, screen: Any = screen) -> list[Screening]:
                out: list[Screening] = screen(tracks)
                self.screenings[k] += out
                return out

            app.screen = spy  # type: ignore[method-assign]
        dead = DeadPixels()
        times = np.arange(0.0, t_end, 0.125)
        for i in range(0, len(times), 512):
            chunk = world.render(times[i:i + 512])
            if merge is not None:  # a second lane's travellers in the same view
                chunk = np.maximum(chunk, merge.render(times[i:i + 512]))
            np.round(chunk, 2, out=chunk)
            for t, f in zip(times[i:i + 512].tolist(), chunk, strict=True):
                dead.repair(f)
                for k, app in enumerate(apps):
                    self.records[k] += app.feed(ThermalFrame(source="thermal", ts=1.7e9 + t, mono=t, pixels=f,
                                                             ambient_c=ambient, dead_pixels=2))
                if apps[0].reference is not None:
                    self.offsets.append((t, apps[0].reference.offset_c))
        for k, app in enumerate(apps):
            self.records[k] += app.close()

    def matched(self, k: int = 0) -> list[tuple[Screening, TravellerTruth]]:
        out = []
        for s in self.screenings[k]:
            tr = _match(self.world, s.track, self.world.truth)
            if tr is not None:
                out.append((s, tr))
        return out

    def of_type(self, kind: str, k: int = 0) -> list[RecordIn]:
        return [r for r in self.records[k] if r.type == kind]


def app(**kw: Any) -> GateApp:
    return GateApp("gate-ref", GateAppConfig(**{"warmup_s": 0.0, "summary_interval_s": 1e9, **kw}))


def test_the_reference_cancels_a_drifting_camera() -> None:
    """The camera reads 1.5 K high, drifting by a further 0.7 K over the 15 minutes: corrected estimates stay
    with the truth, uncorrected ones do not (the correction is what keeps them there)."""
    world = GateWorld(41, DRIFTING)
    run = Run(world, 900.0, app(reference=ref()), app())
    cam = world.camera_offset(np.array([0.0, 900.0]))
    assert cam[1] - cam[0] > 0.6  # the camera really drifted
    corrected = np.array([s.estimate_c - tr.core_c for s, tr in run.matched(0)])
    uncorrected = np.array([s.estimate_c - tr.core_c for s, tr in run.matched(1)])
    assert len(corrected) >= 150 and len(uncorrected) >= 150
    assert np.median(np.abs(corrected)) < 0.15 and np.percentile(np.abs(corrected), 90) < 0.35, corrected
    assert np.median(np.abs(uncorrected)) > 1.2, uncorrected
    # the applied offset follows the camera's error (once the reference has been read for 2 s); the median of
    # the hottest half of 9 noisy pixels reads ~0.7 sigma (0.07 K) high: the method's bias, documented
    late = [(t, o) for t, o in run.offsets if t > 2.0]
    err = np.array([o + float(world.camera_offset(t)) for t, o in late if o is not None])
    assert len(err) == len(late) and np.abs(err).max() < 0.15 and abs(err.mean()) < 0.1
    screenings = run.of_type("screening")
    assert screenings and all(r.payload["reference"] == "ok" for r in screenings)
    assert not any(t.startswith("reference") for r in screenings for t in r.payload["tags"])
    assert all(set(r.payload["tags"]) <= {"too_near", "too_far", "multiple_faces"} for r in screenings)
    assert all(r.payload["reference"] == "none" for r in run.of_type("screening", 1))
    summary = run.of_type("lane_summary")[-1].payload["reference"]
    assert abs(summary["offset_c"] + float(world.camera_offset(900.0))) < 0.15
    assert summary["drift_c"] < 0.3 and summary["missing"] == summary["occluded"] == summary["drift"] == 0
    assert run.of_type("lane_summary", 1)[-1].payload["reference"] == "none"


def test_travellers_in_front_of_the_reference_make_their_screenings_invalid() -> None:
    """A blackbody across the lane, at torso height mid-frame: travellers measured while walking in front
    of it are screened (counted) but invalid; the same blackbody beside them, never in the way, leaves all valid."""
    box = (16, 22, 12, 20)
    world = GateWorld(43, replace(QUIET, blackbody=box, blackbody_behind=True, camera_offset_c=1.0,
                                  febrile_share=0.3))
    clear = GateWorld(43, replace(QUIET, blackbody=box, camera_offset_c=1.0, febrile_share=0.3))
    occluded, unoccluded = Run(world, 120.0, app(reference=ref(box))), Run(clear, 120.0, app(reference=ref(box)))
    sc = occluded.of_type("screening")
    assert len(sc) == len(unoccluded.of_type("screening")) >= 20  # nobody dropped
    bad = [r for r in sc if "reference_occluded" in r.payload["tags"]]
    assert len(bad) >= len(sc) // 2
    assert all(not r.payload["valid"] and r.payload["reference"] == "occluded" for r in bad)
    assert all(not any(t.startswith("reference") for t in r.payload["tags"]) for r in unoccluded.of_type("screening"))
    alerts = occluded.of_type("fever_alert")
    assert alerts and all(a.payload["rescreen"] == (not a.payload["valid"]) for a in alerts)
    assert any(a.payload["rescreen"] and "reference_occluded" in a.payload["tags"] for a in alerts)
    assert occluded.of_type("lane_summary")[-1].payload["reference"]["occluded"] > 50


def test_a_missing_reference_makes_screenings_invalid_and_alerts_ask_for_rescreening() -> None:
    """The blackbody is switched off at 60 s: travellers measured after it are invalid ('missing'), those before
    are valid; a fever alert from an invalid screening still alerts, with rescreen."""
    world = GateWorld(44, replace(QUIET, blackbody=BB, blackbody_off=(60.0, 1e9), febrile_share=0.4))
    a = app(reference=ref())
    run = Run(world, 180.0, a)
    after = [s for s in run.screenings[0] if s.track.first_mono > 60.0 + a.config.reference.occlusion_s]  # type: ignore[union-attr]
    before = [s for s in run.screenings[0] if s.track.last_mono < 60.0]
    assert len(after) >= 15 and len(before) >= 8
    assert all(s.tags[0] == "reference_missing" and not s.valid for s in after)
    assert not any(t.startswith("reference") for s in before for t in s.tags)
    late_alerts = [r for r in run.of_type("fever_alert") if r.ts > 1.7e9 + 75.0]
    assert late_alerts and all(r.payload["rescreen"] and "reference_missing" in r.payload["tags"] for r in late_alerts)
    summary = run.of_type("lane_summary")[-1].payload
    assert summary["reference"]["missing"] > 0 and summary["invalid"] >= len(after)


def test_no_blackbody_where_configured_or_a_region_outside_the_frame_is_missing() -> None:
    world = GateWorld(45, QUIET)  # no blackbody rendered
    run = Run(world, 60.0, app(reference=ref()), app(reference=ref((30, 33, 2, 5))))
    for k in (0, 1):
        sc = run.of_type("screening", k)
        assert sc and all(r.payload["reference"] == "missing" and not r.payload["valid"] for r in sc)
    err = run.of_type("lane_summary", 1)[-1].payload["reference"]["error"]
    assert "outside the 24x32 frame" in err and "app.reference" in err
    with pytest.raises(ValidationError, match=r"reference\.rows"):
        ReferenceConfig(rows=(5, 5), cols=(0, 3), setpoint_c=35.0)


def test_a_drifting_blackbody_is_detected() -> None:
    """The blackbody itself warms by 6 K/h (the camera holds still): the offset's drift across the window
    passes max_drift_c, and travellers measured from then on are invalid."""
    world = GateWorld(46, replace(QUIET, rate_per_h=1500, blackbody=BB, blackbody_drift_k_per_h=6.0,
                                  camera_offset_c=1.0))
    run = Run(world, 600.0, app(reference=ref(max_drift_c=0.3, window_s=300)))
    early = [s for s in run.screenings[0] if s.track.last_mono < 150.0]
    late = [s for s in run.screenings[0] if s.track.first_mono > 300.0]
    assert len(early) >= 30 and len(late) >= 60
    assert not any(t.startswith("reference") for s in early for t in s.tags)
    assert all(s.tags and s.tags[0] in ("reference_drift", "reference_missing") for s in late)
    assert any(s.tags[0] == "reference_drift" for s in late)
    assert run.of_type("lane_summary")[-1].payload["reference"]["drift_c"] > 0.3


def test_warm_up_is_tagged() -> None:
    world = GateWorld(47, QUIET)
    run = Run(world, 150.0, app(warmup_s=60.0))
    warm = [s for s in run.screenings[0] if s.track.best_mono < 60.0]
    ready = [s for s in run.screenings[0] if s.track.best_mono >= 60.0]
    assert len(warm) >= 8 and len(ready) >= 15
    assert all("warm_up" in s.tags and not s.valid for s in warm)
    assert not any("warm_up" in s.tags for s in ready)
    assert GateAppConfig().warmup_s == 30 * 60  # the default lockout the docs state


def test_working_distance_is_estimated_from_head_size_and_tagged() -> None:
    """Adults walk 0.9-1.6 m from the sensor: with limits 1.1-1.4 m, the ones clearly nearer or farther are
    tagged, those clearly between are not."""
    world = GateWorld(48, replace(QUIET, rate_per_h=1800))
    run = Run(world, 300.0, app(min_distance_m=1.1, max_distance_m=1.4))
    m = run.matched()
    near = [s for s, tr in m if tr.distance_m < 0.95]
    far = [s for s, tr in m if tr.distance_m > 1.55]
    mid = [s for s, tr in m if 1.2 <= tr.distance_m <= 1.3]
    assert min(len(near), len(far), len(mid)) >= 5, (len(near), len(far), len(mid))
    assert sum("too_near" in s.tags for s in near) >= 0.9 * len(near)
    assert sum("too_far" in s.tags for s in far) >= 0.9 * len(far)
    assert sum(bool({"too_near", "too_far"} & set(s.tags)) for s in mid) <= 0.15 * len(mid)
    err = np.array([s.distance_m - tr.distance_m for s, tr in m if s.distance_m is not None])
    assert len(err) == len(m) and np.median(np.abs(err)) < 0.1


def test_more_than_one_face_in_view_is_tagged() -> None:
    """Two queues in one view (a second lane's travellers walking beside the first): most screenings are
    tagged; one queue alone, almost none."""
    crowded = Run(GateWorld(49, QUIET), 180.0, app(), merge=GateWorld(50, replace(QUIET, rate_per_h=3000)))
    alone = Run(GateWorld(49, QUIET), 180.0, app())
    share = [sum("multiple_faces" in s.tags for s in r.screenings[0]) / len(r.screenings[0]) for r in (crowded, alone)]
    assert share[0] > 0.3 and share[1] < 0.05, share


def test_ambient_outside_the_limits_is_tagged() -> None:
    """The sensor's ambient (die) reading minus its offset above the air: 21.5 °C is in 18-24 °C, 31.5 is not."""
    world = GateWorld(51, QUIET)
    inside = Run(world, 40.0, app(), ambient=25.0)
    hot = Run(GateWorld(51, QUIET), 40.0, app(), ambient=35.0)
    cold = Run(GateWorld(51, QUIET), 40.0, app(), ambient=20.0)
    assert inside.screenings[0] and all(s.ambient_c == 21.5 and not {"ambient_low", "ambient_high"} & set(s.tags)
                                        for s in inside.screenings[0])
    assert hot.screenings[0] and all("ambient_high" in s.tags for s in hot.screenings[0])
    assert cold.screenings[0] and all("ambient_low" in s.tags for s in cold.screenings[0])
    assert all(r.payload["ambient_c"] == 31.5 for r in hot.of_type("screening"))


def test_simulator_cli_takes_the_reference_and_its_faults() -> None:
    a = build_parser().parse_args(["--blackbody", "20,23,28,31", "--blackbody-off", "10,20", "--blackbody-behind",
                                   "--camera-offset", "1.5", "--camera-drift", "0.5"])
    assert a.blackbody == (20, 23, 28, 31) and a.blackbody_off == (10.0, 20.0) and a.blackbody_behind
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--blackbody", "20,23"])


def test_counting_at_2000_per_hour_with_the_reference() -> None:
    """The blackbody's region is blanked before tracking and flagged frames are still tracked: one screening per
    traveller, as without a reference (tests/test_gate_model.py), none lost to the reference."""
    world = GateWorld(31, replace(DRIFTING, rate_per_h=2000, hot_drink_share=0.01, child_share=0.03, sun_share=0.005,
                                  blackbody_behind=True))
    run = Run(world, 1800.0, app(reference=ref()))
    simulated = sum(1 for tr in world.truth if tr.t_in_view < 1800.0)
    screened = len(run.of_type("screening"))
    assert simulated >= 900 and abs(screened - simulated) <= 0.005 * simulated, (screened, simulated)
    assert run.of_type("lane_summary")[-1].payload["reference"]["occluded"] > 0  # travellers did pass in front
