"""Lane signals: the gate's stack light on a Modbus RTU relay module (drivers/relay.py) against the
relay simulator (simulators/relay.py), through the production runtime."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from customs_edge.agent.config import parse_unit_config
from customs_edge.agent.runtime import Unit
from customs_edge.core.errors import DriverFault
from customs_edge.core.outputs import SetOutputs
from customs_edge.core.records import Priority
from customs_edge.drivers.relay import ModbusRelay, RelayConfig
from customs_edge.simulators.base import Endpoints
from customs_edge.simulators.gate_world import GateWorld
from customs_edge.simulators.relay import RelaySim
from tests.conftest import script_driver, wait_for
from tests.test_gate_app import QUIET, frames, thermal

COILS = {"green": 0, "amber": 1, "red": 2, "buzzer": 3}
LIGHTS = ("green", "amber", "red")


@pytest.fixture
def relay() -> Iterator[tuple[RelaySim, str]]:
    sim = RelaySim(coils=8)
    with Endpoints(sim, tcp_port=None) as urls:
        yield sim, urls["pty"]


def records(outbox: Path, type_: str) -> list[tuple[int, dict[str, Any]]]:
    db = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=5)
    try:
        return [(p, json.loads(x)) for p, x in db.execute(
            "SELECT priority, payload FROM records WHERE type=? ORDER BY seq", (type_,))]
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


def colour(screening: dict[str, Any], below: float = 0.8) -> str:
    """The light the spec asks for: red for a fever, amber to re-screen (invalid or unsure), else green."""
    if screening["decision"] == "fever":
        return "red"
    return "amber" if not screening["valid"] or screening["confidence"] < below else "green"


def shown(coils: tuple[int, ...]) -> str:
    lit = [name for name in LIGHTS if coils[COILS[name]]]
    return lit[0] if len(lit) == 1 else "+".join(lit) or "off"


def gate_unit(tmp_path: Path, port: str, seconds: float, **relay: Any) -> Unit:
    """A gate unit: the simulated lane's frames (half of them in a hall too warm: invalid, amber) through
    a script driver, the stack light on the relay simulator; buzzer 0.2 s."""
    cfg = parse_unit_config({
        "device_id": "gate-l1", "type": "gate",
        "drivers": {"thermal": {"driver": "mlx90640-serial", "port": "/dev/null"},
                    "signal": {"driver": "modbus-relay", "port": port, "coils": COILS, **relay}},
        "app": {"warmup_s": 0, "summary_interval_s": 1e6, "signal": {"buzzer_s": 0.2}},
        "outbox": {"path": str(tmp_path / "outbox.db")}, "sync": {"port": 9, "connect_timeout_s": 1}})
    world = GateWorld(21, replace(QUIET, febrile_share=0.3))
    steps = [thermal(t, f, ambient=25.0 if t < seconds / 2 else 30.0) for t, f in frames(world, seconds)]
    return Unit(cfg, drivers={"thermal": script_driver("thermal", steps),
                              "signal": ModbusRelay("signal", cfg.drivers["signal"])})  # type: ignore[arg-type]


def settled(unit: Unit) -> list[tuple[int, dict[str, Any]]]:
    """The screenings, once every frame was read and processed, the last tracks closed (no frame for
    stale_after_s) and their records committed."""
    app: Any = unit.app
    wait_for(lambda: unit.drivers["thermal"].done.is_set(), 60, "every frame read")  # type: ignore[attr-defined]
    wait_for(lambda: unit.queue.empty() and not app.tracker.tracks, 20, "the last tracks closed")
    return wait_for(lambda: len(s := records(unit.cfg.outbox.path, "screening")) == app.totals["screened"] and s,
                    20, "the screenings committed")


def test_the_stack_light_follows_each_screening(tmp_path: Path, relay: tuple[RelaySim, str]) -> None:
    sim, port = relay
    unit = gate_unit(tmp_path, port, 90.0)
    unit.start()
    try:
        screenings = settled(unit)
        wait_for(lambda: shown(sim.coils_now()) == colour(screenings[-1][1]), 10, "the last traveller's light")
        wait_for(lambda: not sim.coils_now()[COILS["buzzer"]], 10, "the buzzer off after buzzer_s")
    finally:
        unit.stop()
    wanted = [colour(s) for _, s in screenings]
    assert {"red", "amber", "green"} <= set(wanted), wanted  # the run covers every light
    lights = [shown(c) for _, c in sim.history]
    # the driver's first write sets every coil (a known state): all off, or, when travellers' commands were queued
    # before the port's first write (a loaded machine), the newest of them over all off
    assert lights[0] == "off" or lights[0] in wanted[:8], (lights[0], wanted[:8])
    changes = [x for i, x in enumerate(lights[1:]) if x != lights[i]]
    # every light shown was some traveller's, in the travellers' order (newer commands may replace an
    # older one still queued), and the buzzer sounded with each red light and only then
    it = iter(wanted)
    assert all(any(x == w for w in it) for x in changes), (changes, wanted)
    assert all(c[COILS["red"]] for _, c in sim.history if c[COILS["buzzer"]])
    # a red light carries the buzzer (a red command a newer one replaced while queued was never written)
    assert any(c[COILS["buzzer"]] for _, c in sim.history) == ("red" in lights), sim.history
    ((_, summary),) = records(unit.cfg.outbox.path, "lane_summary")  # the one at stop
    assert summary["signals"] >= len(changes) and summary["signal_missed"] == 0
    assert 0 < summary["signal_max_ms"] < 1000
    assert not records(unit.cfg.outbox.path, "signal_missed") and not records(unit.cfg.outbox.path, "driver_fault")


def test_a_dead_relay_module_is_a_driver_fault_and_each_unset_light_is_reported(
        tmp_path: Path, relay: tuple[RelaySim, str]) -> None:
    sim, port = relay
    sim.relay.faults.dead = True
    unit = gate_unit(tmp_path, port, 40.0, read_timeout_s=0.1, retries=0)
    ob = unit.cfg.outbox.path
    unit.start()
    try:
        screenings = settled(unit)
        missed = wait_for(lambda: len(records(ob, "signal_missed")) >= len(screenings) and records(ob, "signal_missed"),
                          10, "one signal_missed per screening")
        faults = [p for _, p in records(ob, "driver_fault") if p["driver"] == "signal"]
        assert faults and "slave 1" in faults[0]["error"] and "timeout" in faults[0]["error"]
        assert [m["screening"] for _, m in missed] == [s["screening"] for _, s in screenings]
        assert [m["signal"] for _, m in missed] == [colour(s) for _, s in screenings]
        assert {prio for prio, m in missed if m["signal"] == "red"} == {int(Priority.ALERT)}
        assert sim.history == []  # nothing was ever set
        sim.relay.faults.dead = False  # the module is back: the newest light is set
        wait_for(lambda: records(ob, "driver_recovered"), 20, "the relay driver recovered")
        wait_for(lambda: shown(sim.coils_now()) == colour(screenings[-1][1]), 10, "the last traveller's light")
    finally:
        unit.stop()


def test_a_coil_that_reads_back_wrong_is_a_driver_fault(relay: tuple[RelaySim, str]) -> None:
    sim, port = relay
    drv = ModbusRelay("signal", RelayConfig(port=port, coils=COILS))
    drv.open()
    try:
        first = wait_for(drv.read, 5, "the first write")
        assert first.values == dict.fromkeys(COILS, False)
        drv.submit(SetOutputs(values={"red": True, "buzzer": True}, ref="t1"))
        done = drv.read()
        assert done is not None and done.ref == "t1" and done.values["red"] and 0 <= done.latency_s < 1
        assert sim.coils_now()[:4] == (0, 0, 1, 1)
        sim.stuck[COILS["red"]] = 0  # a relay that no longer follows its coil
        drv.submit(SetOutputs(values={"red": True, "buzzer": False}, ref="t2"))
        with pytest.raises(DriverFault, match=r"read back .*red=off.*set .*red=on"):
            drv.read()
        assert drv.stats.extra["mismatches"] == 1
        with pytest.raises(ValueError, match="no coil configured for \\['horn'\\]"):
            drv.submit(SetOutputs(values={"horn": True}))
    finally:
        drv.close()


def test_scattered_coils_are_written_one_by_one_and_the_config_is_checked(relay: tuple[RelaySim, str]) -> None:
    sim, port = relay
    drv = ModbusRelay("signal", RelayConfig(port=port, coils={"green": 0, "red": 5}))
    drv.open()
    try:
        wait_for(drv.read, 5, "the first write")
        drv.submit(SetOutputs(values={"red": True}, ref="x"))
        assert drv.read() is not None
    finally:
        drv.close()
    assert sim.history[-1][1] == (0, 0, 0, 0, 0, 1, 0, 0) and len(sim.history) == 4  # 2 coils x fc 05, twice
    with pytest.raises(ValueError, match="slave_id` and `coils`, not `slaves`"):
        RelayConfig.model_validate({"port": port, "coils": COILS, "slaves": []})
    with pytest.raises(ValueError, match="two outputs on one coil"):
        RelayConfig(port=port, coils={"red": 1, "buzzer": 1})


def test_a_module_that_lost_its_coils_while_idle_is_found_and_restored(relay: tuple[RelaySim, str]) -> None:
    sim, port = relay
    drv = ModbusRelay("signal", RelayConfig(port=port, coils=COILS, check_interval_s=0.2))
    drv.open()
    try:
        wait_for(drv.read, 5, "the first write")
        drv.submit(SetOutputs(values={"amber": True}, ref="t1"))
        assert drv.read() is not None and sim.coils_now()[:4] == (0, 1, 0, 0)
        with sim.changed:
            sim.coils[:] = [0] * 8  # a power cut: the relays fall off
        with pytest.raises(DriverFault, match=r"read back .*amber=off.*set .*amber=on"):
            wait_for(lambda: drv.read() and False, 5, "the idle read-back")
        drv.close()
        drv.open()  # what the runtime does after a fault
        restored = wait_for(drv.read, 5, "the light restored")
        assert restored.ref == "restore" and sim.coils_now()[:4] == (0, 1, 0, 0)
    finally:
        drv.close()
