"""Drivers and apps meet by reading type: a third-party driver written only against the public driver
API (customs_edge.drivers.api) and installed as an entry point is accepted wherever an app consumes
what it produces, and refused, with the role, driver and both types named, where it does not fit."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from customs_edge.agent import registry
from customs_edge.agent.apps.scale import ScaleApp
from customs_edge.agent.config import parse_unit_config
from customs_edge.core.errors import ConfigError

ACME = '''
from typing import Literal

from customs_edge.drivers.api import Driver, DriverConfig, Passage, Weight


class AcmeConfig(DriverConfig):
    driver: Literal["acme-scale"] = "acme-scale"
    grams: float = 1000.0


class AcmeScale(Driver):
    """Always the same load: enough to show the plumbing."""

    Config = AcmeConfig
    PRODUCES = (Weight,)

    def open(self) -> None:
        self.stats.opened += 1

    def read(self) -> Weight:
        self.stats.frames += 1
        return Weight(source=self.role, value=self.config.grams, unit="g", stable=True)

    def close(self) -> None:
        pass


class BeamConfig(DriverConfig):
    driver: Literal["acme-beam"] = "acme-beam"


class AcmeBeam(Driver):
    Config = BeamConfig
    PRODUCES = (Passage,)

    def open(self) -> None:
        pass

    def read(self) -> Passage:
        return Passage(source=self.role, event="entry", count=1)

    def close(self) -> None:
        pass
'''


@pytest.fixture
def acme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed third-party distribution: a module and its entry points, as `pip install` leaves them."""
    (tmp_path / "acme_drivers.py").write_text(ACME)
    info = tmp_path / "acme_drivers-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-drivers\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [customs_edge.drivers]
        acme-scale = acme_drivers:AcmeScale
        acme-beam = acme_drivers:AcmeBeam
        """))
    monkeypatch.syspath_prepend(str(tmp_path))


def unit(drivers: dict[str, Any], type_: str = "scale") -> dict[str, Any]:
    return {"device_id": "u1", "type": type_, "drivers": drivers}


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_unit_config(raw)
    return exc.value.problems


def test_a_third_party_driver_from_the_public_api_runs_a_scale_unit(acme: None) -> None:
    assert {"acme-scale", "acme-beam"} <= set(registry.driver_names())
    cfg = parse_unit_config(unit({"scale": {"driver": "acme-scale", "grams": 812.5}}))
    dc = cfg.drivers["scale"]
    driver = registry.lookup("driver", dc.driver)("scale", dc)
    app = ScaleApp(cfg.device_id, cfg.app)
    with driver:
        out = [rec for _ in range(5) for rec in app.feed(driver.read())]
    assert [(r.type, r.payload["weight"], r.payload["unit"]) for r in out] == [("weighing", 812.5, "g")]
    assert problems(unit({"scale": {"driver": "acme-scale", "gram": 1}})) == [
        "drivers.scale.gram: unknown key (did you mean 'grams'?)"]


def test_a_driver_that_produces_the_wrong_type_is_refused_by_type(acme: None) -> None:
    (line,) = problems(unit({"scale": {"driver": "acme-beam"}}))
    assert line.startswith("drivers.scale: driver 'acme-beam' as configured produces Passage; "
                           "this unit type needs Weight here (drivers that do: ")
    assert "acme-scale" in line and "mt-sics" in line and "toledo-continuous" in line
    # and the same third-party driver fits a role that consumes what it produces
    cfg = parse_unit_config(unit({"thermal": {"driver": "mlx90640-serial", "port": "x"},
                                  "passage": {"driver": "acme-beam"}}, "gate"))
    assert set(cfg.drivers) == {"thermal", "passage"}


def test_the_camera_fits_the_gate_as_a_thermal_source_only_with_y16() -> None:
    raw = unit({"thermal": {"driver": "camera-opencv", "url": "/dev/video0", "y16": True}}, "gate")
    assert set(parse_unit_config(raw).drivers) == {"thermal"}
    raw["drivers"]["thermal"]["y16"] = False
    (line,) = problems(raw)
    assert line.startswith("drivers.thermal: driver 'camera-opencv' as configured produces Image; "
                           "this unit type needs ThermalFrame here")


def test_optional_roles_may_be_absent_but_not_wrong() -> None:
    raw = unit({"thermal": {"driver": "mlx90640-serial", "port": "x"},
                "passage": {"driver": "toledo-continuous", "port": "y"}}, "gate")
    (line,) = problems(raw)
    assert line.startswith("drivers.passage: driver 'toledo-continuous' as configured produces Weight; "
                           "this unit type needs Passage or PassageHeartbeat here (drivers that do: passage)")
    del raw["drivers"]["passage"]
    parse_unit_config(raw)
    (line,) = problems(unit({}, "gate"))
    assert line.startswith("drivers.thermal: this unit type needs a driver named 'thermal' producing ThermalFrame")
