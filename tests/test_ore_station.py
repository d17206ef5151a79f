"""The whole station: `customs-edge simulate ore-station` as the demo runs it, and the production
runtime (agent.runtime.Unit) with configs/ore-station.yaml reading every instrument from the simulator
over ptys and loopback sockets, with faults injected on every wire, until a lot report is committed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from customs_edge.agent.config import parse_unit_config
from customs_edge.agent.outbox import SqliteOutbox
from customs_edge.agent.runtime import Unit
from customs_edge.core.records import Priority, RecordIn
from customs_edge.simulators.ore_station import OreStation
from customs_edge.simulators.ore_world import OreWorld, WorldConfig
from tests.conftest import analysis_reading, wait_for

REPO = Path(__file__).resolve().parent.parent


def test_simulate_prints_a_url_for_every_configured_role() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "customs_edge", "simulate", "ore-station", "--seed", "3"],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        urls = json.loads(proc.stdout.readline())["urls"]
        roles = set(yaml.safe_load((REPO / "configs" / "ore-station.yaml").read_text())["drivers"])
        assert set(urls) == roles
        assert set(urls["analyser"]) == {"socket"}
        for role in roles - {"analyser"}:
            assert Path(urls[role]["pty"]).exists() and urls[role]["socket"].startswith("socket://127.0.0.1:")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def test_simulate_refuses_an_unknown_instrument() -> None:
    res = subprocess.run([sys.executable, "-m", "customs_edge", "simulate", "ore-station", "--dead", "wiegher"],
                         capture_output=True, text=True, cwd=REPO, timeout=30)
    assert res.returncode == 2 and "--dead wiegher" in res.stderr


def test_world_is_coherent_and_deterministic() -> None:
    def run(seed: int) -> tuple[list[Any], dict[str, float]]:
        clock = [0.0]
        w = OreWorld(WorldConfig(seed=seed, speed=1.0, lot_t=1200, holds=3), clock=lambda: clock[0])
        seen = []
        for _ in range(40):
            clock[0] += 60
            b = w.belt()
            seen.append((b.lot_no, b.hold_no, round(b.total_t, 3)))
        return seen, w.lot_mean(1)

    a, truth = run(5)
    assert a == run(5)[0] and a != run(6)[0]
    lots = [x[0] for x in a]
    holds = [x[1] for x in a if x[0] == 1]
    assert lots == sorted(lots) and lots[-1] >= 2  # the first lot closed
    assert holds == sorted(holds) and set(holds) == {1, 2, 3}
    assert truth["tonnes"] == pytest.approx(1200, abs=30)
    assert 55 < truth["fe"] < 67


class Capture(SqliteOutbox):
    """The real outbox, also keeping what was put, for the test to look at."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, synchronous="NORMAL")
        self.seen: list[RecordIn] = []

    def put(self, records: Any, state: Any = None) -> range:
        self.seen.extend(records)
        return super().put(records, state)

    def of(self, type_: str) -> list[RecordIn]:
        return [r for r in list(self.seen) if r.type == type_]


def unit_config(urls: dict[str, dict[str, str]], tmp: Path, prefer: dict[str, str]) -> Any:
    raw = yaml.safe_load((REPO / "configs" / "ore-station.yaml").read_text())
    for role, eps in urls.items():
        raw["drivers"][role]["port"] = eps[prefer.get(role, "socket")]
    raw["drivers"]["moisture"].update(fail_after=2, retries=0)
    raw["app"].update(increment_t=10, min_increments_lot=20, min_increments_sublot=8, summary_interval_s=2)
    raw["outbox"] = {"path": str(tmp / "outbox.db")}
    raw["sync"] = {"port": 9, "backoff_min_s": 5, "backoff_max_s": 5}  # no broker: records stay in the outbox
    return parse_unit_config(raw)


def until_counted(what: str, counted: Callable[[], int], injected: Callable[[], int],
                  inject: Callable[[], None]) -> None:
    """Inject one fault at a time until the driver has counted one. Only a fault already applied is
    followed by another: a flipped bit can leave a reply that still parses (a 5 become a 7), and no
    driver can notice that one."""
    armed = [injected()]

    def check() -> bool:
        if counted() >= 1:
            return True
        if injected() >= armed[0]:
            inject()
            armed[0] = injected() + 1
        return False

    wait_for(check, 30, what, interval=0.2)


def test_unit_assesses_a_lot_through_every_wire_with_faults(tmp_path: Path) -> None:
    st = OreStation(WorldConfig(seed=7, speed=120.0, lot_t=500, holds=2, lot_gap_s=60, stops_per_h=0,
                                gamma_alarms_per_h=0, metal_per_h=0), bench_cycle_s=2.0, analyser_stat_s=0.5)
    st.weigher.faults.crc_rate = 0.05
    st.belt.faults.timeout_rate = 0.05
    st.scale.faults.corrupt_rate = 0.1
    st.analyser.faults.corrupt_rate = 0.15
    st.kill("moisture")  # a dead sensor: its line never answers
    eps = st.endpoints()
    urls = {role: ep.start() for role, ep in eps.items()}
    unit = None
    try:
        # Modbus lines and the balance on ptys, the analyser on its socket
        cfg = unit_config(urls, tmp_path, {"belt_weigher": "pty", "belt_portal": "pty", "scale": "pty"})
        outbox = Capture(tmp_path / "outbox.db")
        unit = Unit(cfg, outbox=outbox)
        unit.start()
        wait_for(lambda: outbox.of("ore_analysis"), 20, "a first analysis")
        st.world.trigger_gamma()
        st.world.trigger_metal()
        # besides the random faults, one of each kind for sure, each waited for until its driver counted it
        drivers = unit.drivers
        weigher, belt, scale, analyser = st.weigher.faults, st.belt.faults, st.scale.faults, st.analyser.faults
        until_counted("a CRC error", lambda: drivers["belt_weigher"].stats.extra["crc_errors"],
                      lambda: weigher.damaged, lambda: setattr(weigher, "crc_next", weigher.crc_next + 1))
        until_counted("a timeout", lambda: drivers["belt_portal"].stats.extra["timeouts"],
                      lambda: belt.withheld, lambda: setattr(belt, "timeout_next", belt.timeout_next + 1))
        until_counted("a garbled MT-SICS reply", lambda: drivers["scale"].stats.corrupt,
                      lambda: scale.corrupted, scale.corrupt_next)
        until_counted("a damaged result block", lambda: drivers["analyser"].stats.corrupt,
                      lambda: analyser.corrupted, analyser.corrupt_next)
        wait_for(lambda: outbox.of("lot_report"), 40, "a lot report")
        report = outbox.of("lot_report")[0].payload
        truth = st.world.lot_mean(report["lot_no"])
        stats = {role: d.stats.as_dict() for role, d in unit.drivers.items()}
    finally:
        if unit is not None:
            unit.stop()
        for ep in eps.values():
            ep.stop()

    # the assessment: estimates near the truth, the radiation alarm holds the lot
    assert report["fe"]["value"] == pytest.approx(truth["fe"], abs=0.5)
    assert report["sio2"]["value"] == pytest.approx(truth["sio2"], abs=0.5)
    assert report["moisture"]["source"] == "ore-grade model"  # the microwave analyser is dead
    assert report["moisture"]["value"] == pytest.approx(truth["h2o"], abs=0.4)
    assert report["decision"] == "hold" and report["gamma_alarms"] >= 1
    assert "foreign_matter" in report["flags"]
    assert report["increments"] >= 20 and len(report["sublots"]) == 2
    assert report["tonnes"] == pytest.approx(truth["tonnes"], rel=0.25)

    alerts = {r.type for r in outbox.seen if r.priority == Priority.ALERT}
    assert {"radiation_alarm", "foreign_matter", "lot_hold"} <= alerts
    faults = outbox.of("driver_fault")
    assert any(f.payload["driver"] == "moisture" for f in faults)
    assert outbox.of("ore_interval") and outbox.of("increment") and outbox.of("bench_weighing")
    # no per-poll records: a few hundred polls became a few dozen records
    assert len(outbox.seen) < 400

    # every injected fault was counted (waited for above) and survived
    assert stats["moisture"]["faults"] >= 1


def test_analyser_drift_is_caught_by_the_local_model() -> None:
    """An analyser whose own Fe calibration drifts (+6 % Fe per simulated hour) while its spectra stay
    true: the app's check against the local model raises analyser_disagreement, and the lot's Fe
    estimate (from the model) stays near the truth while the analyser's own does not."""
    from customs_edge.agent.apps.ore import OreAppConfig, OreStationApp
    from customs_edge.core.readings import Registers
    from customs_edge.simulators.ore_world import simulate_lot

    results = [r for r in simulate_lot(4, analyser_drift_pct_per_h=6.0) if r.truth is not None]
    app = OreStationApp("drift", OreAppConfig(check_fe_pct=1.0, check_count=3))
    out = app.feed(Registers.of({"lot_no": 1}, source="belt_portal", slave="belt", slave_id=1))
    for r in results:
        out += app.feed(analysis_reading(r.counts, seq=r.seq, tonnes=r.tonnes, fe=r.own["Fe"]))
    events = [x for x in out if x.type == "analyser_disagreement"]
    assert len(events) >= 1
    first = events[0].payload
    assert first["analyser_fe"] - first["model_fe"] > 1.0
    report = app.feed(Registers.of({"lot_no": 2}, source="belt_portal", slave="belt", slave_id=1))
    lot = next(x for x in report if x.type == "lot_report").payload
    true_fe = float(np.average([r.truth.fe for r in results], weights=[r.tonnes for r in results]))
    assert abs(lot["fe"]["value"] - true_fe) < 0.3
    assert lot["fe_analyser"]["value"] - true_fe > 0.5
    assert "analyser_disagreement" in lot["flags"]
