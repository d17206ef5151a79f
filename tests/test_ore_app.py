"""OreStationApp: each assessment path, alerts, increments, sub-lots and summaries, fed with Readings
as the drivers produce them and spectra simulated for known compositions (the real model runs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from customs_edge.agent.apps.ore import OreAppConfig, OreStationApp
from customs_edge.agent.config import parse_unit_config
from customs_edge.core.errors import ConfigError, ModelError
from customs_edge.core.readings import PointValue, Reading, Registers, SlaveError, Weight
from customs_edge.core.records import Priority, RecordIn
from customs_edge.models import default_manifest
from customs_edge.simulators.ore_world import Composition, spectrum
from tests.conftest import analysis_reading

REPO = Path(__file__).resolve().parent.parent
GOOD = Composition(fe=63.0, sio2=4.0, al2o3=2.0, h2o=7.5)


class Station:
    """Feeds the app the readings a belt produces, minute by minute."""

    def __init__(self, **cfg: Any) -> None:
        self.app = OreStationApp("ore-test", OreAppConfig(**{"increment_t": 25, "min_increments_lot": 40,
                                                            "min_increments_sublot": 12, **cfg}))
        self.total = 5000.0
        self.mono = 0.0
        self.rng = np.random.default_rng(0)
        self.records: list[RecordIn] = []
        self.seq = 0
        self.regs("belt_weigher", "weigher", rate_tph=0.0, total_t=self.total)

    def at(self) -> float:
        """The next reading's monotonic time."""
        self.mono += 0.5
        return self.mono

    def feed(self, reading: Reading) -> list[RecordIn]:
        out = self.app.feed(reading)
        self.records += out
        return out

    def regs(self, source: str, slave: str, **values: PointValue) -> list[RecordIn]:
        return self.feed(Registers.of(values, source=source, slave=slave, slave_id=1, mono=self.at()))

    def belt(self, lot_no: int, hold_no: int = 1, metal: bool = False) -> list[RecordIn]:
        return self.regs("belt_portal", "belt", running=True, lot_no=lot_no, hold_no=hold_no, metal_detected=metal)

    def portal(self, alarm: bool = False, cps: float = 110.0) -> list[RecordIn]:
        return self.regs("belt_portal", "portal", gamma_cps=cps, gamma_alarm=alarm)

    def minutes(self, n: int, comp: Composition = GOOD, lot_no: int = 1, hold_no: int = 1,
                moisture: float | None = None, rate: float = 4000.0, analyser_fe: float | None = None) -> None:
        for _ in range(n):
            self.belt(lot_no, hold_no)
            self.portal()
            for _ in range(4):
                self.total += rate / 60 / 4
                self.regs("belt_weigher", "weigher", rate_tph=rate, total_t=self.total)
                if moisture is not None:
                    self.regs("moisture", "moisture", moisture_pct=moisture)
            self.seq += 1
            counts = spectrum(comp, self.rng, load=rate / 4000.0)
            self.feed(analysis_reading(counts, seq=self.seq, tonnes=rate / 60, mono=self.at(),
                                       fe=comp.fe if analyser_fe is None else analyser_fe, sio2=comp.sio2,
                                       h2o=comp.h2o))

    def close_lot(self, next_lot: int = 2) -> dict[str, Any]:
        out = self.belt(next_lot)
        reports = [r for r in out if r.type == "lot_report"]
        assert len(reports) == 1, [r.type for r in out]
        assert reports[0].priority == Priority.REPORT
        return reports[0].payload

    def of(self, type_: str) -> list[RecordIn]:
        return [r for r in self.records if r.type == type_]


def test_pass_with_estimates_close_to_the_truth() -> None:
    st = Station()
    st.minutes(20, moisture=7.5)  # 20 min at 4000 t/h = 1333 t -> 53 increments
    report = st.close_lot()
    assert report["decision"] == "pass", report["reasons"]
    assert report["reasons"] == ["within limits"] and report["flags"] == []
    assert report["increments"] == int(20 * 4000 / 60 // 25)
    assert report["fe"]["value"] == pytest.approx(GOOD.fe, abs=0.4)
    assert 0 < report["fe"]["u95"] < 0.6
    assert report["sio2"]["value"] == pytest.approx(GOOD.sio2, abs=0.3)
    assert report["moisture"]["source"] == "microwave" and report["moisture"]["value"] == pytest.approx(7.5)
    assert report["h2o_model"]["value"] == pytest.approx(GOOD.h2o, abs=0.3)
    assert report["tonnes"] == pytest.approx(20 * 4000 / 60, abs=0.05)
    assert len(st.of("increment")) == report["increments"]
    assert len(st.of("ore_analysis")) == 20
    assert not st.of("lot_hold") and not [r for r in st.records if r.priority == Priority.ALERT]


def test_moisture_above_fraction_of_tml_holds_the_lot() -> None:
    st = Station(tml_pct=10.0, moisture_hold_fraction=0.9)
    st.minutes(20, moisture=9.4)
    report = st.close_lot()
    assert report["decision"] == "hold"
    assert any("moisture 9.40 % > 0.9 x TML 10 % = 9 %" in r for r in report["reasons"])
    holds = st.of("lot_hold")
    assert len(holds) == 1 and holds[0].priority == Priority.ALERT


def test_moisture_within_uncertainty_of_the_limit_is_flagged() -> None:
    st = Station(tml_pct=10.0, moisture_hold_fraction=0.9)
    st.minutes(10, moisture=7.0)
    st.minutes(10, moisture=10.7)  # mean 8.85 % < 9 %, but a wide spread: U95 ~ 0.4
    report = st.close_lot()
    m = report["moisture"]
    assert m["value"] == pytest.approx(8.85) and m["value"] + m["u95"] > 9.0
    assert report["decision"] == "pass" and "moisture_near_limit" in report["flags"]


def test_moisture_from_the_model_without_a_microwave_analyser() -> None:
    st = Station()
    st.minutes(20, comp=Composition(fe=63.0, sio2=4.0, al2o3=2.0, h2o=6.0))
    report = st.close_lot()
    assert report["moisture"]["source"] == "ore-grade model"
    assert report["moisture"]["value"] == pytest.approx(6.0, abs=0.3)
    assert report["decision"] == "pass"


def test_fe_below_contract_minimum_is_flagged_not_held() -> None:
    st = Station(fe_min_pct=62.0)
    st.minutes(20, comp=Composition(fe=59.5, sio2=7.0, al2o3=2.5, h2o=7.0), moisture=7.0)
    report = st.close_lot()
    assert report["decision"] == "pass"
    assert "fe_below_contract" in report["flags"]
    assert any("< contract minimum 62 %" in r for r in report["reasons"])


def test_too_few_increments_means_resample() -> None:
    st = Station(min_increments_lot=40)
    st.minutes(10, moisture=7.0)  # 667 t -> 26 increments
    report = st.close_lot()
    assert report["decision"] == "resample"
    assert "26 primary increments < minimum 40" in report["reasons"]


def test_no_grade_estimate_means_resample() -> None:
    st = Station(min_increments_lot=1)
    for _ in range(30):
        st.belt(1)
        st.total += 50
        st.regs("belt_weigher", "weigher", rate_tph=4000.0, total_t=st.total)
    report = st.close_lot()
    assert report["decision"] == "resample" and "no grade or moisture estimate" in report["reasons"]


def test_gamma_alarm_is_an_immediate_alert_and_holds_the_lot() -> None:
    st = Station()
    st.minutes(10, moisture=7.0)
    out = st.portal(alarm=True, cps=950.0)
    assert [r.type for r in out] == ["radiation_alarm"]
    alert = out[0]
    assert alert.priority == Priority.ALERT and alert.payload["decision"] == "hold"
    assert alert.payload["lot_id"].startswith("ore-test-L1-") and alert.payload["gamma_cps"] == 950.0
    assert st.portal(alarm=True) == []  # one alert per alarm, not per poll
    st.portal(alarm=False)
    assert len(st.portal(alarm=True)) == 1  # a new alarm
    st.minutes(12, moisture=7.0)
    report = st.close_lot()
    assert report["decision"] == "hold"
    assert report["gamma_alarms"] == 2 and report["gamma_max_cps"] == 950.0
    assert any(r.startswith("radiation: 2 gamma alarm(s)") for r in report["reasons"])


def test_foreign_matter_alerts_and_flags() -> None:
    st = Station()
    st.minutes(5, moisture=7.0)
    out = st.belt(1, metal=True)
    assert [r.type for r in out] == ["foreign_matter"] and out[0].priority == Priority.ALERT
    assert st.belt(1, metal=True) == []
    st.minutes(20, moisture=7.0)
    report = st.close_lot()
    assert "foreign_matter" in report["flags"] and report["foreign_matter"] == 1
    assert report["decision"] == "pass"


def test_sublots_are_assessed_on_their_own() -> None:
    st = Station()
    st.minutes(12, hold_no=1, moisture=7.0)
    st.minutes(12, hold_no=2, moisture=9.8, comp=Composition(fe=61.0, sio2=6.0, al2o3=2.2, h2o=9.8))
    report = st.close_lot()
    subs = {s["sublot"]: s for s in report["sublots"]}
    assert subs[1]["decision"] == "pass" and subs[2]["decision"] == "hold"
    assert subs[1]["increments"] + subs[2]["increments"] == report["increments"]
    assert subs[1]["fe"]["value"] > subs[2]["fe"]["value"] + 1.0
    assert "fe_below_contract" in subs[2]["flags"]
    assert report["moisture"]["value"] == pytest.approx((7.0 + 9.8) / 2, abs=0.05)


def test_increments_follow_tonnage_and_ignore_a_totaliser_reset() -> None:
    st = Station(increment_t=100)
    st.belt(1)
    # 5000 -> 1000 and 1350 -> 3: totaliser resets, the drops count nothing; the rest is 350 + 117 t
    for total in (1000.0, 1099.0, 1100.0, 1350.0, 3.0, 120.0):
        st.regs("belt_weigher", "weigher", rate_tph=4000.0, total_t=total)
    incs = st.of("increment")
    assert [i.payload["at_t"] for i in incs] == [100.0, 200.0, 300.0, 400.0]
    assert [i.payload["number"] for i in incs] == [1, 2, 3, 4]


def test_interval_summary_instead_of_every_poll() -> None:
    st = Station(summary_interval_s=60)
    st.minutes(3, moisture=7.0)
    assert not st.of("ore_interval")
    out = st.app.tick(st.mono + 61)
    assert [r.type for r in out] == ["ore_interval"] and out[0].priority == Priority.TELEMETRY
    p = out[0].payload
    assert p["tonnes"] == pytest.approx(3 * 4000 / 60) and p["analyses"] == 3
    assert p["moisture_pct"]["mean"] == pytest.approx(7.0) and p["rate_tph"]["max"] == 4000.0
    assert st.app.tick(st.mono + 62) == []


def test_analyser_disagreement_after_results_in_a_row() -> None:
    st = Station(check_fe_pct=1.0, check_count=3)
    st.minutes(2, analyser_fe=GOOD.fe + 2.0)
    assert not st.of("analyser_disagreement")
    st.minutes(1, analyser_fe=GOOD.fe + 2.0)
    ev = st.of("analyser_disagreement")
    assert len(ev) == 1 and ev[0].payload["results_in_a_row"] == 3
    st.minutes(3, analyser_fe=GOOD.fe + 2.0)
    assert len(st.of("analyser_disagreement")) == 1  # once per episode


def test_slave_fault_and_recovery_are_reported_once() -> None:
    st = Station()
    def err(n: int) -> SlaveError:
        return SlaveError(source="moisture", slave="moisture", slave_id=1, error="timeout: no reply", consecutive=n,
                          mono=st.at())

    assert [r.type for r in st.feed(err(1))] == ["instrument_fault"]
    assert st.feed(err(2)) == []
    out = st.regs("moisture", "moisture", moisture_pct=7.0)
    assert [r.type for r in out] == ["instrument_recovered"]


def test_bench_weighing_reported_once_when_settled() -> None:
    st = Station(bench_settle_readings=3)
    seq = [(0.0, False)] * 3 + [(812.4, True)] * 2 + [(812.5, False)] * 6 + [(812.5, True), (1204.0, False),
                                                                             (1204.0, False), (1204.0, False)]
    for w, motion in seq:
        st.feed(Weight(source="scale", mono=st.at(), value=w, unit="g", stable=not motion))
    weighings = st.of("bench_weighing")
    assert [w.payload["weight"] for w in weighings] == [812.5, 1204.0]


def test_close_emits_interim_report_of_the_open_lot() -> None:
    st = Station()
    st.minutes(4, moisture=7.0)
    out = st.app.close()
    types = [r.type for r in out]
    assert types == ["ore_interval", "lot_interim"]
    assert out[1].payload["decision"] == "open" and out[1].payload["increments"] == 10


def test_app_refuses_a_tampered_model(tmp_path: Path) -> None:
    src = default_manifest("ore_grade").parent
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    doc["sha256"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError):
        OreStationApp("x", OreAppConfig(model_manifest=tmp_path / "manifest.json"))


def test_station_config_validates_and_needs_its_instruments() -> None:
    import yaml

    raw = yaml.safe_load((REPO / "configs" / "ore-station.yaml").read_text())
    cfg = parse_unit_config(raw)
    assert set(cfg.drivers) == {"belt_weigher", "moisture", "belt_portal", "scale", "analyser"}
    del raw["drivers"]["analyser"]
    with pytest.raises(ConfigError, match="needs a driver named 'analyser'"):
        parse_unit_config(raw)
    raw = yaml.safe_load((REPO / "configs" / "ore-station.yaml").read_text())
    raw["app"]["tml_pc"] = 9
    with pytest.raises(ConfigError, match="did you mean 'tml_pct'"):
        parse_unit_config(raw)


def test_non_finite_register_values_are_ignored_not_poisoning_the_lot() -> None:
    st = Station(tml_pct=10.0, moisture_hold_fraction=0.9)
    st.minutes(5, moisture=12.0)
    st.regs("belt_weigher", "weigher", rate_tph=float("inf"), total_t=float("nan"))
    st.regs("moisture", "moisture", moisture_pct=12.0)
    st.regs("belt_portal", "belt", lot_no=float("nan"), hold_no=float("inf"))
    st.minutes(15, moisture=12.0)
    report = st.close_lot()
    assert report["decision"] == "hold"  # the moisture hold survives the glitches
    assert 1300 < report["tonnes"] < 1400  # 20 minutes at 4000 t/h; the NaN totaliser read added nothing


def test_a_totaliser_misread_makes_no_burst_of_increments() -> None:
    st = Station()
    st.minutes(5)
    n = len(st.of("increment"))
    st.regs("belt_weigher", "weigher", rate_tph=4000.0, total_t=0.0)  # misread
    st.regs("belt_weigher", "weigher", rate_tph=4000.0, total_t=st.total)
    st.regs("belt_weigher", "weigher", rate_tph=4000.0, total_t=5e7)  # garbage
    assert len(st.of("increment")) == n
    st.total = 5e7
    st.minutes(1)
    assert len(st.of("increment")) > n  # counting resumes from the new reading


def test_a_flapping_hold_register_cannot_grow_the_lot_without_bound() -> None:
    st = Station(max_sublots=4)
    for hold in range(1, 50):
        st.minutes(1, hold_no=hold)
    report = st.close_lot()
    assert isinstance(report["sublots"], (list, dict)) and len(report["sublots"]) == 4


def test_a_spectrum_that_does_not_fit_the_model_is_counted_and_skipped() -> None:
    st = Station()
    st.minutes(2)
    analyses = len(st.of("ore_analysis"))
    assert analyses == 2
    out = st.feed(analysis_reading(np.ones(512, np.float32), seq=99, tonnes=60.0, mono=st.at()))
    assert out == [] and len(st.of("ore_analysis")) == analyses
