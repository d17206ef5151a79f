"""Typed readings check their values where they are made and cannot be changed afterwards."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from customs_edge.core.readings import (
    Analysis,
    Assay,
    Point,
    ReadingError,
    Registers,
    SlaveError,
    Spectrum,
    ThermalFrame,
    Weight,
)

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field", ["ts", "mono"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF, None, "1.0"])
def test_every_reading_has_a_finite_time(field: str, bad: object) -> None:
    with pytest.raises(ReadingError, match=rf"Weight\.{field}: must be a finite number"):
        Weight(source="scale", value=1.0, **{field: bad})  # type: ignore[arg-type]


@pytest.mark.parametrize("kw", [{"value": NAN}, {"value": INF}, {"value": True}, {"value": 1.0, "tare": -INF},
                                {"value": 1.0, "unit": None}])
def test_a_weight_refuses_what_is_not_a_weight(kw: dict[str, object]) -> None:
    with pytest.raises(ReadingError, match=r"Weight\."):
        Weight(source="scale", **kw)  # type: ignore[arg-type]


def test_a_weight_says_what_it_is() -> None:
    assert Weight(source="s", value=None, unit="g").in_range is False  # busy
    assert Weight(source="s", value=999.0, overload=True).in_range is False
    assert Weight(source="s", value=12.0, unit="kg", net=True, tare=1.5).gross == 13.5
    assert Weight(source="s", value=12.0, net=False).gross == 12.0
    assert Weight(source="s", value=12.0).gross is None  # the instrument did not say net or gross


def test_non_finite_register_values_become_flagged_points() -> None:
    r = Registers.of({"rate_tph": NAN, "total_t": INF, "lot_no": 7, "running": True, "moisture_pct": 8.25},
                     units={"moisture_pct": "%"}, source="belt", slave="weigher", slave_id=1)
    assert r.points["rate_tph"] == Point(None, None, "not finite (nan)")
    assert r.number("rate_tph") is None and r.number("total_t") is None and r.number("absent") is None
    assert r.number("lot_no") == 7.0 and r.flag("running") is True and r.points["moisture_pct"].unit == "%"
    with pytest.raises(ReadingError, match=r"Point\.value"):
        Point(NAN)
    with pytest.raises(ReadingError, match=r"Point\.error"):
        Point(None)  # no value and no reason
    with pytest.raises(TypeError):
        r.points["lot_no"] = Point(8)  # type: ignore[index]


def test_readings_and_their_arrays_are_read_only() -> None:
    px = np.full((24, 32), 30.0, np.float32)
    f = ThermalFrame(source="thermal", pixels=px, ambient_c=24.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.ambient_c = 25.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        f.pixels[0, 0] = 99.0
    assert px.flags.writeable  # the driver's own buffer is left alone
    assert ThermalFrame(source="t", pixels=np.ones((4, 4), np.float64)).pixels.dtype == np.float32


def test_an_analysis_checks_its_spectrum_and_assay() -> None:
    counts = np.arange(1024, dtype=np.float32)
    with pytest.raises(ReadingError, match=r"Spectrum\.counts"):
        Spectrum(np.full(1024, np.inf, np.float32), 60.0, 3.0)
    with pytest.raises(ReadingError, match=r"Assay\.fe"):
        Assay(fe=NAN)
    kw = dict(source="analyser", seq=1, analysed_at=1.7e9, interval_s=60.0, tonnes=66.0,
              assay=Assay(fe=62.3), spectrum=Spectrum(counts, 60.0, 3.0))
    with pytest.raises(ReadingError, match=r"Analysis\.status"):
        Analysis(status="GOOD", **kw)  # type: ignore[arg-type]
    a = Analysis(status="OK", **kw)  # type: ignore[arg-type]
    assert a.assay.as_dict() == {"fe": 62.3, "sio2": None, "al2o3": None, "p": None, "s": None, "h2o": None}


def test_summary_is_json_for_probe() -> None:
    r = SlaveError(source="line", slave="weigher", slave_id=1, error="timeout: no reply", consecutive=2)
    assert json.loads(json.dumps(r.summary())) == {"slave": "weigher", "slave_id": 1, "error": "timeout: no reply",
                                                   "consecutive": 2}
    f = ThermalFrame(source="thermal", pixels=np.zeros((24, 32), np.float32))
    assert f.summary()["pixels"] == {"shape": [24, 32], "dtype": "float32"}
    assert Weight.KIND == "weight" and f.KIND == "thermal_frame"
