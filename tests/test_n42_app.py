"""The ore station with an N42.42 radiation portal (role radiation_portal, driver n42-portal): an
occupancy with a gamma or neutron alarm is an immediate ALERT and holds the lot, with the occupancy's
evidence (id, counts, background, thresholds) in the alert and in the lot report."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from customs_edge.agent.apps.ore import OreAppConfig, OreStationApp
from customs_edge.agent.config import parse_unit_config
from customs_edge.core.errors import ConfigError
from customs_edge.core.readings import PortalOccupancy, ReadingError
from customs_edge.core.records import Priority
from customs_edge.drivers.n42 import N42Reader
from tests.test_ore_app import Station

REPO = Path(__file__).resolve().parent.parent
GAMMA_DOC = (REPO / "tests" / "fixtures" / "n42" / "rpm_gamma_alarm_group.n42").read_bytes()
OCC_ID = "0f8e2a6c-3b4d-4e5f-8a9b-1c2d3e4f5a6b/Occupancy-42"


def occupancy(st: Station, **kw: object) -> PortalOccupancy:
    values: dict[str, object] = {"occupancy_id": "occ-1", "start": 1000.0, "end": 1060.0, "gamma_counts": 6600.0,
                                 "gamma_cps": 110.0, "neutron_counts": 180.0, "neutron_cps": 3.0,
                                 "gamma_background_cps": 108.0, "neutron_background_cps": 3.1, **kw}
    return PortalOccupancy(source="radiation_portal", mono=st.at(), **values)  # type: ignore[arg-type]


def test_an_n42_gamma_alarm_holds_the_lot_at_once_with_the_occupancys_evidence() -> None:
    st = Station()
    st.minutes(10, moisture=7.0)
    [occ] = N42Reader("radiation_portal").parse(GAMMA_DOC)
    out = st.feed(occ)
    assert [r.type for r in out] == ["radiation_alarm"]
    alert = out[0]
    assert alert.priority == Priority.ALERT and alert.payload["decision"] == "hold"
    assert alert.payload["lot_id"].startswith("ore-test-L1-") and alert.payload["channels"] == ["gamma"]
    ev = alert.payload["occupancy"]
    assert ev["occupancy_id"] == OCC_ID and ev["instrument"] == "RPM-0003"
    assert ev["gamma_counts"] == 1700 and ev["gamma_background_cps"] == pytest.approx(410.0)
    assert (ev["gamma_threshold_cps"], ev["neutron_threshold_cps"]) == (500.0, 12.0)
    assert ev["alarms"] == ["Gamma alarm, side A"]
    st.minutes(12, moisture=7.0)
    report = st.close_lot()
    assert report["decision"] == "hold"
    assert report["gamma_alarms"] == 1 and report["neutron_alarms"] == 0
    assert [e["occupancy_id"] for e in report["radiation_evidence"]] == [OCC_ID]
    assert any(r.startswith("radiation: 1 gamma alarm(s)") and OCC_ID in r for r in report["reasons"])
    assert report["sublots"][0]["decision"] == "hold"
    assert [r.type for r in st.of("lot_hold")] == ["lot_hold"]


def test_a_neutron_alarm_alone_holds_the_lot() -> None:
    st = Station()
    st.minutes(10, moisture=7.0)
    out = st.feed(occupancy(st, occupancy_id="occ-n", neutron_cps=45.0, neutron_alarm=True,
                            neutron_threshold_cps=9.0, alarms=("Neutron alarm",)))
    assert [r.type for r in out] == ["radiation_alarm"] and out[0].payload["channels"] == ["neutron"]
    assert out[0].payload["occupancy"]["neutron_threshold_cps"] == 9.0
    st.minutes(12, moisture=7.0)
    report = st.close_lot()
    assert report["decision"] == "hold" and report["neutron_alarms"] == 1 and report["gamma_alarms"] == 0
    assert any("1 neutron alarm(s)" in r for r in report["reasons"])


def test_quiet_occupancies_raise_nothing_and_their_gamma_rate_is_reported() -> None:
    st = Station()
    st.minutes(22, moisture=7.0)
    assert st.feed(occupancy(st, gamma_cps=180.0)) == []
    [summary] = st.app.tick(st.mono + 3600)
    assert summary.type == "ore_interval" and summary.payload["gamma_cps"]["max"] == 180.0
    report = st.close_lot()
    assert report["decision"] != "hold" and report["radiation_evidence"] == []


def test_the_evidence_survives_a_restart() -> None:
    st = Station()
    st.minutes(10, moisture=7.0)
    st.feed(occupancy(st, occupancy_id="occ-g", gamma_cps=700.0, gamma_alarm=True))
    blob = st.app.snapshot()
    assert blob is not None
    st.app = OreStationApp("ore-test", OreAppConfig(increment_t=25, min_increments_lot=40, min_increments_sublot=12))
    st.app.restore(blob)
    st.minutes(12, moisture=7.0)
    report = st.close_lot()
    assert report["decision"] == "hold" and report["radiation_evidence"][0]["occupancy_id"] == "occ-g"


def test_config_takes_an_n42_portal_role_and_refuses_a_driver_that_gives_no_occupancies() -> None:
    raw = yaml.safe_load((REPO / "configs" / "ore-station.yaml").read_text())
    raw["drivers"]["radiation_portal"] = {"driver": "n42-portal", "port": "socket://127.0.0.1:5042"}
    assert "radiation_portal" in parse_unit_config(raw).drivers
    raw["drivers"]["radiation_portal"] = raw["drivers"]["belt_portal"]
    with pytest.raises(ConfigError, match=r"radiation_portal.*needs PortalOccupancy here.*n42-portal"):
        parse_unit_config(raw)


@pytest.mark.parametrize("bad", [{"gamma_counts": float("nan")}, {"end": 999.0}, {"occupancy_id": ""},
                                 {"neutron_cps": -1.0}, {"gamma_alarm": 1}, {"detectors": ["a"]}])
def test_a_portal_occupancy_is_checked_when_made(bad: dict[str, object]) -> None:
    values: dict[str, object] = {"occupancy_id": "o", "start": 1000.0, "end": 1060.0, **bad}
    with pytest.raises(ReadingError, match="PortalOccupancy"):
        PortalOccupancy(source="p", **values)  # type: ignore[arg-type]
