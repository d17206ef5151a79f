"""One settle rule for every app that weighs (agent/apps/settle.py), and the scale and ore apps using it.

Before it, the scale app took a reading without a weight (MT-SICS 'S I', busy) as a still 0 kg, so with
`command: S` a load was never reported, and it reported an over-range weight as a weighing; the ore
station's bench reset on both. These tests pin one behaviour for both."""

from __future__ import annotations

from typing import Any

import pytest

from customs_edge.agent.apps.ore import OreAppConfig, OreStationApp
from customs_edge.agent.apps.scale import ScaleApp, ScaleAppConfig
from customs_edge.agent.apps.settle import Settle
from customs_edge.core.readings import Weight


def w(value: float | None, *, stable: bool = True, unit: str = "g", **kw: Any) -> Weight:
    return Weight(source="scale", value=value, unit=unit, stable=stable, **kw)


BUSY = w(None, stable=False)  # MT-SICS 'S I': no stable value in time
OVER = w(None, overload=True)  # MT-SICS 'S +'
TOLEDO_OVER = w(1500.0, overload=True)  # Toledo SWB bit 2: the digits are there, the weight is not valid


def settled(readings: list[Weight], n: int = 3, min_weight: float = 50.0, deadband: float = 1.0) -> list[float | None]:
    s = Settle(n, min_weight, deadband)
    return [r.value for r in (s.feed(x) for x in readings) if r is not None]


def test_a_weighing_needs_n_stable_readings_in_a_row_and_is_reported_once() -> None:
    assert settled([w(812.4, stable=False)] * 2 + [w(812.5)] * 6) == [812.5]
    assert settled([w(812.5)] * 2 + [w(812.5, stable=False)] + [w(812.5)] * 2) == []


def test_a_missing_weight_breaks_the_run_and_is_never_a_still_zero() -> None:
    # command S: busy while the load settles, then stable replies: one weighing, not none
    assert settled([BUSY] * 3 + [w(1204.0)] * 3) == [1204.0]
    assert settled([w(1204.0), w(1204.0), BUSY, w(1204.0), w(1204.0)]) == []
    assert settled([w(1204.0), w(1204.0), BUSY, w(1204.0), w(1204.0), w(1204.0)]) == [1204.0]


@pytest.mark.parametrize("out", [OVER, w(None, underload=True), TOLEDO_OVER, w(-20.0, underload=True)])
def test_out_of_range_never_settles_and_breaks_the_run(out: Weight) -> None:
    assert settled([out] * 10) == []
    assert settled([w(900.0)] * 2 + [out] + [w(900.0)] * 2) == []


def test_an_emptied_platform_reports_the_same_load_again_and_the_deadband_holds_otherwise() -> None:
    load, empty = [w(500.0)] * 3, [w(0.0)] * 3
    assert settled(load + empty + load) == [500.0, 500.0]
    assert settled(load + [w(500.5, stable=False)] + [w(500.5)] * 3) == [500.0]  # within the deadband
    assert settled(load + [w(502.0, stable=False)] + [w(502.0)] * 3) == [500.0, 502.0]


def test_a_new_load_without_motion_in_between_starts_a_new_run() -> None:
    # MT-SICS `S` replies only with stable weights: a load placed between two polls shows no motion
    assert settled([w(0.0)] * 4 + [w(500.0)] * 3 + [w(731.0)] * 3) == [500.0, 731.0]
    assert settled([w(500.0), w(500.0), w(731.0), w(731.0)]) == []


def test_a_change_of_unit_restarts_the_run_and_forgets_the_last_weighing() -> None:
    assert settled([w(500.0)] * 2 + [w(500.0, unit="kg")] * 2) == []
    assert settled([w(500.0)] * 3 + [w(500.0, unit="kg")] * 3, min_weight=0.1) == [500.0, 500.0]


def test_not_zeroed_weighings_are_reported_and_flagged_by_the_apps() -> None:
    app = ScaleApp("s", ScaleAppConfig(settle_frames=2, min_weight=1.0))
    out = [rec for r in [w(70.0, not_zeroed=True, unit="kg")] * 2 for rec in app.feed(r)]
    assert [(r.payload["weight"], r.payload["zeroed"]) for r in out] == [(70.0, False)]


STREAM = ([BUSY] * 3 + [w(812.5)] * 4 + [OVER] * 3 + [TOLEDO_OVER] * 4 + [w(812.5)] * 3 + [w(1.0)] * 3
          + [BUSY, w(1204.0), BUSY] + [w(1204.0)] * 3 + [w(1204.0, underload=True)] * 5)


def test_the_scale_and_ore_apps_report_the_same_weighings_for_the_same_stream() -> None:
    scale = ScaleApp("s", ScaleAppConfig(settle_frames=3, min_weight=50.0, deadband=1.0))
    ore = OreStationApp("o", OreAppConfig(bench_settle_readings=3, bench_min_g=50.0, bench_deadband_g=1.0))
    got_scale = [r.payload["weight"] for x in STREAM for r in scale.feed(x) if r.type == "weighing"]
    got_ore = [r.payload["weight"] for x in STREAM for r in ore.feed(x) if r.type == "bench_weighing"]
    # 812.5 once (the overloads in between break the run, the deadband keeps the same load from
    # repeating), the empty platform, then 1204.0 once
    assert got_scale == got_ore == [812.5, 1204.0]


def test_an_over_range_toledo_frame_is_not_a_weighing() -> None:
    app = ScaleApp("s", ScaleAppConfig(settle_frames=3, min_weight=50.0))
    assert [r for x in [TOLEDO_OVER] * 5 for r in app.feed(x) if r.type == "weighing"] == []


def test_the_scale_summary_averages_weights_only() -> None:
    app = ScaleApp("s", ScaleAppConfig(summary_interval_s=1.0))
    for x in [BUSY, BUSY, w(100.0), w(102.0), OVER, TOLEDO_OVER]:
        app.feed(x)
    (rec,) = app.close()
    p = rec.payload
    assert (p["frames"], p["mean"], p["min"], p["max"]) == (6, 101.0, 100.0, 102.0)
    assert (p["no_weight"], p["out_of_range"]) == (2, 2)
    empty = ScaleApp("s", ScaleAppConfig())
    empty.feed(BUSY)
    (rec,) = empty.close()
    assert (rec.payload["mean"], rec.payload["min"], rec.payload["max"], rec.payload["no_weight"]) == (None,) * 3 + (1,)
