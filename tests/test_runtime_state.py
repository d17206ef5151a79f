"""App state that survives: an ore lot through a stop, a power cut (SIGKILL) and two kinds of reload;
gate and scale aggregates through a restart; a snapshot of another app or version is ignored and
counted, never a crash. The production runtime (Unit) runs with exact inputs in place of instruments."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import yaml

from customs_edge.agent.apps.gate import GateApp, GateAppConfig
from customs_edge.agent.apps.ore import OreStationApp
from customs_edge.agent.apps.scale import ScaleApp, ScaleAppConfig
from customs_edge.agent.config import parse_unit_config
from customs_edge.agent.runtime import Unit
from customs_edge.core.jsonfast import dumps
from customs_edge.core.readings import (
    Analysis,
    Assay,
    Passage,
    PointValue,
    Reading,
    Registers,
    Spectrum,
    Weight,
)
from customs_edge.simulators.ore_world import Composition, spectrum
from tests.conftest import script_driver, unit_dict, wait_for

REPO = Path(__file__).resolve().parent.parent
T0 = 1.75e9
STEPS_PER_MINUTE = 11  # belt, portal, 4 x (weigher, moisture), analyser


def lot_steps() -> list[Reading]:
    """Lot 1 as the instruments report it: 24 minutes at 4,000 t/h (1,600 t) over two ship's holds
    (10 and 14 minutes), one metal detector trip, one analysis a minute; then the belt PLC's next lot
    number, which closes lot 1."""
    rng = np.random.default_rng(11)
    comp = Composition(fe=63.0, sio2=4.0, al2o3=2.0, h2o=7.5)
    steps: list[Reading] = []

    def regs(source: str, slave: str, **values: PointValue) -> None:
        steps.append(Registers.of(values, source=source, slave=slave, slave_id=1, ts=T0 + len(steps)))

    total, rate = 5000.0, 4000.0
    regs("belt_weigher", "weigher", rate_tph=0.0, total_t=total)
    for minute in range(24):
        regs("belt_portal", "belt", running=True, lot_no=1, hold_no=1 if minute < 10 else 2,
             metal_detected=minute == 4)
        regs("belt_portal", "portal", gamma_cps=110.0, gamma_alarm=False)
        for _ in range(4):
            total += rate / 60 / 4
            regs("belt_weigher", "weigher", rate_tph=rate, total_t=total)
            regs("moisture", "moisture", moisture_pct=7.5)
        ts = T0 + len(steps)
        steps.append(Analysis(source="analyser", ts=ts, seq=minute + 1, status="OK", analysed_at=ts, interval_s=60.0,
                              tonnes=rate / 60, assay=Assay(fe=63.0, sio2=4.0, h2o=7.5),
                              spectrum=Spectrum(spectrum(comp, rng, load=1.0), 60.0, 3.0)))
    regs("belt_portal", "belt", running=True, lot_no=2, hold_no=1)
    return steps


def minutes(n: int) -> int:
    """Index of the step after the first n minutes of the lot."""
    return 1 + n * STEPS_PER_MINUTE


def ore_cfg(outbox: Path, app: dict[str, Any] | None = None, scale: dict[str, Any] | None = None) -> Any:
    raw = yaml.safe_load((REPO / "configs" / "ore-station.yaml").read_text())
    raw["app"].update(app or {})
    raw["drivers"]["scale"].update(scale or {})
    raw["outbox"] = {"path": str(outbox)}
    raw["sync"] = {"port": 9, "backoff_min_s": 5, "backoff_max_s": 5}  # no broker: records stay in the outbox
    return parse_unit_config(raw)


def stored(outbox: Path, type_: str) -> list[dict[str, Any]]:
    """Payloads of the records of one type in an outbox file, in seq order (read-only)."""
    if not outbox.exists():
        return []
    db = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=5)
    try:
        return [json.loads(p) for (p,) in db.execute("SELECT payload FROM records WHERE type=? ORDER BY seq",
                                                     (type_,))]
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        db.close()


def run_steps(cfg: Any, steps: list[Reading]) -> Unit:
    unit = Unit(cfg, drivers={"script": script_driver("script", steps)})
    unit.start()
    return unit


def wait_analyses(outbox: Path, n: int) -> None:
    wait_for(lambda: len(stored(outbox, "ore_analysis")) >= n, 60, f"{n} analyses committed")


def assert_whole_lot(outbox: Path) -> None:
    """The lot report covers all 24 minutes, equal to one from an app that never stopped."""
    reports = [r for r in stored(outbox, "lot_report") if r["lot_no"] == 1]
    assert len(reports) == 1
    report = reports[0]
    assert report["tonnes"] == pytest.approx(1600.0, abs=0.1)
    assert report["increments"] == 64 and report["analyses"] == 24 and report["foreign_matter"] == 1
    assert [(s["sublot"], s["tonnes"]) for s in report["sublots"]] == [(1, pytest.approx(666.7, abs=0.1)),
                                                                        (2, pytest.approx(933.3, abs=0.1))]
    assert [i["number"] for i in stored(outbox, "increment")] == list(range(1, 65))  # none twice, none missing

    app = OreStationApp("ore-01", ore_cfg(outbox).app)
    out = [r for s in lot_steps() for r in app.feed(s)]
    want = json.loads(dumps(next(r.payload for r in out if r.type == "lot_report")))
    assert {k: v for k, v in report.items() if k != "closed"} == {k: v for k, v in want.items() if k != "closed"}


def finish_the_lot(ob: Path) -> Unit:
    """The rest of the lot (from minute 13) in a new unit on the same outbox, until the lot report."""
    unit = run_steps(ore_cfg(ob), lot_steps()[minutes(13):])
    try:
        wait_for(lambda: stored(ob, "lot_report"), 60, "the lot report")
    finally:
        unit.stop()
    return unit


def test_an_ore_lot_half_done_survives_a_stop_and_a_restart(tmp_path: Path) -> None:
    ob = tmp_path / "outbox.db"
    unit = run_steps(ore_cfg(ob), lot_steps()[:minutes(13)])
    wait_analyses(ob, 13)
    unit.stop()
    assert [r["lot_no"] for r in stored(ob, "lot_interim")] == [1]  # the stop reported the open lot
    unit = finish_the_lot(ob)
    assert_whole_lot(ob)
    assert unit.counters["state_restored"] == 1


def test_an_ore_lot_half_done_survives_a_power_cut(tmp_path: Path) -> None:
    ob = tmp_path / "outbox.db"
    with (tmp_path / "child.log").open("wb") as log:
        child = subprocess.Popen([sys.executable, "-m", "tests.test_runtime_state", str(ob)], cwd=REPO,
                                 env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=log)
    try:
        wait_analyses(ob, 13)
    finally:
        child.send_signal(signal.SIGKILL)  # a power cut: no stop, no close, no final commit
        child.wait(10)
    assert stored(ob, "lot_interim") == []
    unit = finish_the_lot(ob)
    assert_whole_lot(ob)
    assert unit.counters["state_restored"] == 1


def test_a_reload_keeps_the_live_app_or_resumes_from_its_snapshot(tmp_path: Path) -> None:
    from customs_edge.agent.runtime import replace_unit

    steps, ob = lot_steps(), tmp_path / "outbox.db"
    unit = run_steps(ore_cfg(ob), steps[:minutes(8)])
    wait_analyses(ob, 8)
    app = unit.app
    # the bench scale's polling changes, the app section does not: the live app goes on, unclosed
    unit = replace_unit(unit, ore_cfg(ob, scale={"poll_interval_s": 0.5}),
                        drivers={"script": script_driver("script", steps[minutes(8):minutes(16)])})
    try:
        assert unit.app is app and unit.counters["state_restored"] == 0
        assert stored(ob, "lot_interim") == []
        wait_analyses(ob, 16)
        # the app section changes: the old app is closed, the new one resumes from its snapshot
        unit = replace_unit(unit, ore_cfg(ob, app={"check_count": 5}, scale={"poll_interval_s": 0.5}),
                            drivers={"script": script_driver("script", steps[minutes(16):])})
        assert unit.app is not app and unit.app.config.check_count == 5  # type: ignore[attr-defined]
        assert unit.counters["state_restored"] == 1
        wait_for(lambda: stored(ob, "lot_report"), 60, "the lot report")
    finally:
        unit.stop()
    assert [r["lot_no"] for r in stored(ob, "lot_interim")] == [1, 2]  # the second reload, the final stop
    assert_whole_lot(ob)


def test_a_reload_by_sighup_that_leaves_the_app_alone_keeps_its_open_aggregates(tmp_path: Path) -> None:
    from customs_edge.simulators.base import Endpoints
    from customs_edge.simulators.scale import ScaleSim, ScaleWorld
    from tests.fleet import AgentProc

    with Endpoints(ScaleSim(ScaleWorld(seed=2, cycle_s=1.0), rate_hz=50)) as urls:
        cfg = unit_dict(tmp_path, urls["socket"], 9, app={"summary_interval_s": 3})
        agent = AgentProc(cfg, tmp_path).start()
        ob = Path(cfg["outbox"]["path"])
        try:
            wait_for(lambda: stored(ob, "weight_summary"), 20, "a first interval summary")
            n = len(stored(ob, "weight_summary"))
            wait_for(lambda: len(stored(ob, "weight_summary")) > n, 10, "the next summary")
            agent.path.write_text(yaml.safe_dump({**cfg, "drivers": {"scale": {**cfg["drivers"]["scale"],
                                                                               "silent_after_s": 4}}}))
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGHUP)  # just after a summary: a closed app would add a short one
            wait_for(lambda: "config reloaded" in agent.log_text(), 10, "the reload")
            n = len(stored(ob, "weight_summary"))
            wait_for(lambda: len(stored(ob, "weight_summary")) >= n + 2, 15, "two summaries after the reload")
        finally:
            agent.terminate()
    summaries = stored(ob, "weight_summary")[:-1]  # the last one is the stop's partial interval
    assert len(summaries) >= 4
    assert all(s["interval_s"] >= 3.0 for s in summaries), [s["interval_s"] for s in summaries]
    assert "app_kept=True" in agent.log_text()


def gate_cfg(outbox: Path) -> Any:
    raw = yaml.safe_load((REPO / "configs" / "gate.yaml").read_text())
    raw["outbox"] = {"path": str(outbox)}
    raw["sync"] = {"port": 9, "backoff_min_s": 5, "backoff_max_s": 5}
    return parse_unit_config(raw)


def passages(entries: int, exits: int) -> list[Passage]:
    events: list[Literal["entry", "exit"]] = ["entry"] * entries + ["exit"] * exits
    return [Passage(source="passage", event=e, count=i + 1) for i, e in enumerate(events)]


def test_gate_lane_counters_continue_across_a_restart(tmp_path: Path) -> None:
    ob = tmp_path / "outbox.db"
    for entries, exits in ((5, 4), (3, 3)):
        unit = Unit(gate_cfg(ob), drivers={"passage": (d := script_driver("passage", passages(entries, exits)))})
        unit.start()
        wait_for(d.done.is_set, 10, "the passages read")
        unit.stop()
    totals = [s["totals"] for s in stored(ob, "lane_summary")]
    assert [(t["entries"], t["exits"]) for t in totals] == [(5, 4), (8, 7)]


def test_gate_window_and_scale_interval_survive_a_snapshot_round_trip() -> None:
    def gate() -> GateApp:
        return GateApp("gate-t", GateAppConfig(summary_interval_s=1e9))

    first = gate()
    for p in passages(3, 1):
        first.feed(p)
    second = gate()
    second.restore(first.snapshot() or b"")
    for p in passages(2, 2):
        second.feed(p)
    (summary,) = [r.payload for r in second.close() if r.type == "lane_summary"]
    assert (summary["entries"], summary["exits"]) == (5, 3)
    assert (summary["totals"]["entries"], summary["totals"]["exits"]) == (5, 3)

    def weights(n: int, w: float) -> list[Reading]:
        return [Weight(source="scale", value=w, unit="kg", stable=True) for _ in range(n)]

    cfg = ScaleAppConfig(summary_interval_s=1e9, settle_frames=5)
    a = ScaleApp("scale-t", cfg)
    made = [r for x in weights(7, 12.5) for r in a.feed(x)]
    b = ScaleApp("scale-t", cfg)
    b.restore(a.snapshot() or b"")
    made += [r for x in weights(3, 12.5) + weights(2, 20.0) for r in b.feed(x)]
    assert [r.payload["weight"] for r in made if r.type == "weighing"] == [12.5]  # not reported again
    (summary,) = [r.payload for r in b.close()]
    assert summary["frames"] == 12 and summary["weighings"] == 1
    assert (summary["min"], summary["max"]) == (12.5, 20.0)
    assert summary["mean"] == pytest.approx((10 * 12.5 + 2 * 20.0) / 12, abs=1e-4)


@pytest.mark.parametrize("blob", [
    b'{"app":"OreStationApp","version":999,"state":{}}',  # a newer agent's snapshot
    b'{"app":"GateApp","version":1,"state":{"totals":{}}}',  # the unit was a gate before
    b'{"app":"OreStationApp","version":1,"state":{"lot":null}}',  # right version, content missing
    b"\x00 not json",
])
def test_a_snapshot_that_does_not_fit_is_ignored_counted_and_logged(tmp_path: Path, blob: bytes,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    from customs_edge.agent.runtime import STATE_KEY, open_outbox

    cfg = ore_cfg(tmp_path / "outbox.db")
    ob = open_outbox(cfg)
    ob.put([], state=(STATE_KEY, blob))
    unit = Unit(cfg, outbox=ob, drivers={"script": script_driver("script", lot_steps()[:minutes(2)])})
    unit.start()
    try:
        wait_analyses(cfg.outbox.path, 2)  # the app starts fresh and works
    finally:
        unit.stop()
    assert unit.counters["state_refused"] == 1 and unit.counters["state_restored"] == 0
    assert "saved app state ignored; the app starts fresh" in caplog.text
    assert [i["number"] for i in stored(cfg.outbox.path, "increment")] == list(range(1, 6))


if __name__ == "__main__":  # the first half of the lot in a process the power-cut test kills
    Unit(ore_cfg(Path(sys.argv[1])), drivers={"script": script_driver("script", lot_steps()[:minutes(13)])}).start()
    threading.Event().wait()


def test_tune_gc_takes_what_startup_made_out_of_the_collectors_walks() -> None:
    """The agent process calls tune_gc() at start (cli `run`): the objects alive then are frozen, so a full
    collection under load walks only what was made since, and the young generation is larger. In a process of
    its own: the test's heap stays as is."""
    code = ("import gc; from customs_edge.agent.runtime import GC_YOUNG, tune_gc; n = gc.get_freeze_count(); tune_gc();"
            " print(gc.get_freeze_count() - n, gc.get_count()[2], gc.get_threshold()[0] == GC_YOUNG)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == [out.stdout.split()[0], "0", "True"]
    assert int(out.stdout.split()[0]) > 10_000  # the modules' objects (tens of thousands), none left to walk
