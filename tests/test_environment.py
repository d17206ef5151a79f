"""The environment sensor (modbus-th: an XY-MD02-class RS-485 temperature / humidity transmitter) against
its simulator on a pty, and the gate's validity tags from its air temperature and humidity."""

from __future__ import annotations

import time

import numpy as np
import pytest

from customs_edge.agent.apps.gate import GateApp, GateAppConfig
from customs_edge.core.errors import DriverFault
from customs_edge.core.readings import Ambient, ThermalFrame
from customs_edge.drivers.environment import EnvironmentConfig, EnvironmentSensor
from customs_edge.simulators.base import Endpoints
from customs_edge.simulators.environment import EnvironmentSim
from customs_edge.simulators.gate_world import GateWorld, WorldParams
from customs_edge.simulators.wire import modbus as rtu

# XY-MD02 map (t-teja/Sensors SHT20/XY-MD02-Modbus.py: function 04, input registers 1 and 2, one decimal).
# Reading both in one request: slave 1, function 04, address 0x0001, quantity 2, CRC low byte first.
REQUEST = bytes.fromhex("01 04 00 01 00 02 20 0b")


def first(drv: EnvironmentSensor, timeout: float = 5.0) -> Ambient:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = drv.read()
        if r is not None:
            return r
    raise AssertionError("no reading")


def test_request_bytes_match_the_modbus_spec() -> None:
    assert rtu.frame(REQUEST[:6]) == REQUEST  # the simulator's CRC, written from the spec, agrees


@pytest.mark.parametrize(("temp", "rh"), [(21.3, 45.6), (-5.2, 98.0)])
def test_driver_reads_temperature_and_humidity(temp: float, rh: float) -> None:
    sim = EnvironmentSim(temperature_c=temp, humidity_pct=rh)
    with Endpoints(sim, tcp_port=None) as urls:
        drv = EnvironmentSensor("environment", EnvironmentConfig(port=urls["pty"], poll_interval_s=0.05))
        drv.open()
        try:
            r = first(drv)
        finally:
            drv.close()
    assert isinstance(r, Ambient) and r.temperature_c == pytest.approx(temp) and r.humidity_pct == pytest.approx(rh)
    assert sim.sensor.requests >= 1


def test_a_dead_transmitter_is_a_driver_fault() -> None:
    sim = EnvironmentSim()
    sim.sensor.faults.dead = True
    with Endpoints(sim, tcp_port=None) as urls:
        drv = EnvironmentSensor("environment", EnvironmentConfig(port=urls["pty"], poll_interval_s=0.01,
                                                                 read_timeout_s=0.05, retries=0, fail_after=2))
        drv.open()
        try:
            deadline = time.monotonic() + 5.0
            with pytest.raises(DriverFault, match="no slave answers"):
                while time.monotonic() < deadline:
                    assert drv.read() is None
        finally:
            drv.close()
    assert drv.stats.extra["slave_errors"] >= 2


def test_config_builds_the_register_map_and_refuses_slaves() -> None:
    c = EnvironmentConfig(port="/dev/null", humidity_register=None, table="holding", temperature_register=0)
    assert [(p.name, p.table, p.address) for p in c.slaves[0].points] == [("temperature", "holding", 0)]
    with pytest.raises(ValueError, match="not `slaves`"):
        EnvironmentConfig(port="/dev/null", slaves=[])


def _screen(air: list[Ambient], frames_until: float = 40.0) -> list[dict]:
    world = GateWorld(7, WorldParams(rate_per_h=900, hot_drink_share=0, sun_share=0, child_share=0))
    app = GateApp("g", GateAppConfig(summary_interval_s=1e9, warmup_s=0))
    recs = []
    for a in air:
        recs += app.feed(a)
    for t in np.arange(0.0, frames_until, 0.125):
        f = world.render(np.array([t]), dead=False)[0]
        recs += app.feed(ThermalFrame(source="thermal", pixels=f, ambient_c=40.0, mono=float(t), ts=1.7e9 + t))
    recs += app.tick(frames_until + 5)
    return [r.payload for r in recs if r.type == "screening"]


def test_screenings_take_air_and_humidity_from_the_environment_sensor() -> None:
    ok = _screen([Ambient(source="environment", temperature_c=21.0, humidity_pct=45.0, mono=0.0)])
    assert ok and all(p["ambient_c"] == 21.0 and p["humidity_pct"] == 45.0 for p in ok)
    # the die reads 40 °C: without the environment sensor its air (36.5 °C) would tag every screening
    assert all("ambient_high" not in p["tags"] and p["ambient_source"] == "environment" for p in ok)
    humid = _screen([Ambient(source="environment", temperature_c=21.0, humidity_pct=80.0, mono=0.0)])
    assert humid and all("humidity_high" in p["tags"] and not p["valid"] for p in humid)
    dry_warm = _screen([Ambient(source="environment", temperature_c=26.0, humidity_pct=5.0, mono=0.0)])
    assert all({"humidity_low", "ambient_high"} <= set(p["tags"]) for p in dry_warm)


def test_an_environment_sensor_gone_quiet_tags_environment_stale() -> None:
    p = _screen([Ambient(source="environment", temperature_c=21.0, humidity_pct=45.0, mono=-200.0)])
    assert p and all("environment_stale" in x["tags"] for x in p)
