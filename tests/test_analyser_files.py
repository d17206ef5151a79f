"""Analyser result files (port dir:///path): the vendor-shaped fixtures (tests/fixtures/analyser,
sources in its README.txt) read through the configurable column mapping; rows refused with a reason;
the directory drop (settled files only, each once, appended files without repeats, remembered across
restarts); the ore app taking a result without a spectrum; the simulator's result files."""

from __future__ import annotations

import calendar
import os
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from customs_edge.core.readings import Analysis
from customs_edge.drivers.analyser import AnalyserConfig, ElementalAnalyser, ResultFileError, ResultFileReader
from customs_edge.simulators.ore_devices import AnalyserFileSim
from customs_edge.simulators.ore_world import OreWorld, WorldConfig
from tests.test_ore_app import Station

FIX = Path(__file__).parent / "fixtures" / "analyser"
PERTH_0601 = calendar.timegm((2024, 2, 29, 22, 1, 0))  # 2024-03-01 06:01 in Perth (+08:00), in UTC


def read(name: str, **kw: object) -> tuple[list[Analysis], ResultFileReader]:
    r = ResultFileReader("analyser", kw.pop("columns", {}), **kw)  # type: ignore[arg-type]
    return r.parse(name, (FIX / name).read_bytes()), r


def test_thermo_eca_tag_columns_with_rate_and_extra_oxides() -> None:
    got, r = read("eca_current_analysis.csv")
    assert r.refused == 0 and len(got) == 2
    a = got[0]
    assert a.analysed_at == calendar.timegm((2024, 5, 6, 2, 31, 0))  # 08:01 +05:30
    assert a.tonnes == pytest.approx(812.4 / 60)  # tph over the 60 s interval
    assert (a.assay.fe, a.assay.sio2, a.assay.al2o3, a.assay.s, a.assay.h2o, a.assay.p) == \
        (None, 6.02, 3.11, 0.61, 9.87, None)
    assert dict(a.assay.extra) == {"Fe2O3": 0.84, "CaO": 0.95, "Na2O": 0.21, "K2O": 0.18, "TiO2": 0.16,
                                   "N": 1.42, "Cl": 0.03}  # Ash and Value1 are not elements
    assert (a.status, a.seq, a.sample_id, a.spectrum) == ("OK", 1, None, None)
    assert got[1].seq == 2 and got[1].assay.sio2 == 6.10


def test_semicolon_decimal_comma_local_time_units_and_a_preamble() -> None:
    got, r = read("iron_ore_semicolon_local_time.csv", timezone="Australia/Perth", decimal_comma=True)
    assert r.refused == 0, r.last_error
    assert [a.status for a in got] == ["OK", "NOLOAD", "OK"]  # the totals line is not a result
    a = got[0]
    assert (a.seq, a.sample_id, a.analysed_at, a.tonnes) == (24030106010, "24030106010", PERTH_0601, 66.25)
    assert (a.assay.fe, a.assay.sio2, a.assay.al2o3, a.assay.p, a.assay.s, a.assay.h2o) == \
        (62.31, 4.12, 2.05, 0.071, 0.012, 7.90)
    assert dict(a.assay.extra) == {"Mn": pytest.approx(0.21), "CaO": 0.05}  # 2100 ppm
    assert got[1].tonnes == 0 and got[1].assay.as_dict() == dict.fromkeys(("fe", "sio2", "al2o3", "p", "s", "h2o"))
    assert dict(got[2].assay.extra) == {"CaO": 0.06}  # "<LOD" in Mn: not reported


def test_local_times_without_a_configured_zone_are_refused_with_the_fix() -> None:
    got, r = read("iron_ore_semicolon_local_time.csv", decimal_comma=True)
    assert got == [] and r.refused == 3
    assert "has no zone: set `timezone`" in (r.last_error or "")


def test_xml_results_with_element_children_and_attributes() -> None:
    got, r = read("result_elements.xml")
    assert r.refused == 0 and len(got) == 2
    a = got[0]
    assert (a.sample_id, a.analysed_at, a.tonnes, a.status) == ("A-000731", PERTH_0601 + 0.5, 66.25, "OK")
    assert (a.assay.fe, a.assay.sio2, a.assay.h2o) == (62.31, 4.12, 7.90)
    assert dict(a.assay.extra) == {"Mn": pytest.approx(0.21)}
    assert (got[1].sample_id, got[1].status, got[1].tonnes) == ("A-000732", "NOLOAD", 0.0)


def test_vendor_names_are_configurable() -> None:
    data = b"Zeit;Masse [kg];Eisen;Kieselsaeure;Mn\n2024-03-01T06:01:00+08:00;66250;62,31;4,12;0,2\n"
    r = ResultFileReader("analyser", {"Zeit": "timestamp", "Masse": "tonnes", "Eisen": "fe",
                                      "Kieselsaeure": "sio2", "Mn": ""}, decimal_comma=True)
    (a,) = r.parse("x.csv", data)
    assert (a.analysed_at, a.tonnes, a.assay.fe, a.assay.sio2, dict(a.assay.extra)) == \
        (PERTH_0601, 66.25, 62.31, 4.12, {})


@pytest.mark.parametrize(("row", "why"), [
    ("2024-03-01T06:01:00Z,66.2,abc,OK", "Fe = 'abc' is not a number"),
    ("2024-03-01T06:01:00Z,66.2,1e999,OK", "is not a number"),
    ("2024-03-01T06:01:00Z,,62.3,OK", "map the vendor's interval tonnes column"),
    ("2024-03-01T06:01:00Z,66.2,62.3,VALID", "status 'VALID'"),
    ("01/03/2024 06:01,66.2,62.3,OK", "set `time_format`"),
])
def test_a_row_that_cannot_be_a_result_is_refused_and_the_next_one_read(row: str, why: str) -> None:
    r = ResultFileReader("analyser", {})
    got = r.parse("x.csv", f"Time,Tonnes,Fe,Status\n{row}\n2024-03-01T06:02:00Z,66.2,62.3,OK\n".encode())
    assert r.refused == 1 and why in (r.last_error or "") and [a.assay.fe for a in got] == [62.3]


def test_whole_files_that_are_not_results_raise() -> None:
    r = ResultFileReader("analyser", {})
    with pytest.raises(ResultFileError, match="'timestamp'"):
        r.parse("x.csv", b"When,Fe\n2024-03-01T06:01:00Z,62\n")
    xxe = (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
           b'<r><Result time="2024-03-01T06:01:00Z" tonnes="1">&x;</Result></r>')
    with pytest.raises(ResultFileError, match="refused XML"):
        r.parse("x.xml", xxe)


def test_config_names_the_fix() -> None:
    with pytest.raises(ValidationError, match="map each vendor name"):
        AnalyserConfig(port="dir:///tmp", columns={"Fe %": "iron"})
    with pytest.raises(ValidationError, match="IANA zone"):
        AnalyserConfig(port="dir:///tmp", timezone="Perth")


# --- the directory drop ----------------------------------------------------------------------------
def driver(d: Path, **kw: object) -> ElementalAnalyser:
    drv = ElementalAnalyser("analyser", AnalyserConfig(port=f"dir://{d}", read_timeout_s=0.01, **kw))
    drv.open()
    return drv


def drain(drv: ElementalAnalyser) -> list[Analysis]:
    out = []
    while (a := drv.read()) is not None:
        assert isinstance(a, Analysis)
        out.append(a)
    return out


def aged(path: Path, seconds: float = 600.0) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


HEAD = "Sample ID,Time,Tonnes,Fe\n"


def test_files_are_read_once_settled_once_and_remembered_across_restarts(tmp_path: Path) -> None:
    f = tmp_path / "day.csv"
    f.write_text(HEAD + "1,2024-03-01T06:01:00+08:00,66.25,62.31\n")
    drv = driver(tmp_path, settle_s=60)
    assert drain(drv) == []  # still being written, as far as the driver can tell
    aged(f)
    assert [a.sample_id for a in drain(drv)] == ["1"]
    assert drain(drv) == [] and drv.stats.frames == 1
    drv.close()
    drv = driver(tmp_path, settle_s=60)  # a restart
    assert drain(drv) == []
    with f.open("a") as out:  # the software appends the next result to its daily file
        out.write("2,2024-03-01T06:02:00+08:00,65.80,61.95\n")
    aged(f)
    assert [(a.sample_id, a.assay.fe) for a in drain(drv)] == [("2", 61.95)]
    assert drv.stats.extra["repeated"] == 1
    drv.close()
    drv = driver(tmp_path, settle_s=60)
    assert drain(drv) == []  # both results remembered
    (tmp_path / "bad.xml").write_text("<not closed")
    aged(tmp_path / "bad.xml")
    assert drain(drv) == [] and drv.stats.corrupt == 1 and "refused XML" in (drv.files.last_error or "")
    drv.close()


def test_a_file_is_remembered_only_once_its_results_were_taken(tmp_path: Path) -> None:
    f = tmp_path / "r.csv"
    f.write_text(HEAD + "1,2024-03-01T06:01:00Z,1,60\n2,2024-03-01T06:02:00Z,1,61\n")
    aged(f)
    drv = driver(tmp_path, settle_s=1)
    assert drv.read() is not None
    drv.close()  # one result still pending: not taken, so the file is not remembered
    drv = driver(tmp_path, settle_s=1)
    assert [a.sample_id for a in drain(drv)] == ["1", "2"]
    drv.close()


def test_a_missing_directory_is_a_fault(tmp_path: Path) -> None:
    from customs_edge.core.errors import DriverFault

    drv = ElementalAnalyser("analyser", AnalyserConfig(port=f"dir://{tmp_path}/nope"))
    with pytest.raises(DriverFault, match="is not a directory"):
        drv.open()


def test_the_ore_app_records_a_result_without_a_spectrum() -> None:
    f = FIX / "iron_ore_semicolon_local_time.csv"
    (a, *_) = ResultFileReader("analyser", {}, timezone="Australia/Perth", decimal_comma=True).parse(
        f.name, f.read_bytes())
    st = Station()
    st.belt(1)
    out = st.feed(a)
    (rec,) = [r for r in out if r.type == "ore_analysis"]
    assert rec.payload["model"] is None and rec.payload["sample_id"] == "24030106010"
    assert rec.payload["analyser"]["fe"] == 62.31 and rec.payload["analyser"]["Mn"] == pytest.approx(0.21)


def test_the_simulator_writes_result_files_the_driver_reads(tmp_path: Path) -> None:
    world = OreWorld(WorldConfig(seed=3, speed=600.0))
    sim = AnalyserFileSim(world, tmp_path)
    deadline = time.monotonic() + 30
    while sim.write_new() == 0 or sim.written < 2:
        assert time.monotonic() < deadline, "the simulated analyser produced no results"
        time.sleep(0.05)
    for p in tmp_path.glob("*.csv"):
        aged(p)
    drv = driver(tmp_path, settle_s=1)
    got = drain(drv)
    truth = world.results_after(0)
    assert len(got) == sim.written and drv.stats.corrupt == 0
    for a, r in zip(got, truth, strict=False):
        assert (a.seq, a.status, a.tonnes) == (r.seq, r.status, pytest.approx(r.tonnes, abs=0.005))
        assert a.analysed_at == pytest.approx(r.ts, abs=1.0)
        assert a.assay.fe == (pytest.approx(r.own["Fe"], abs=5e-4) if "Fe" in r.own else None)
    drv.close()


def test_the_header_delimiter_holds_for_rows_with_many_decimal_commas() -> None:
    r = ResultFileReader("analyser", {}, decimal_comma=True)
    (a,) = r.parse("x.csv", b"Time;Tonnes;Fe;SiO2\n2024-03-01T06:01:00Z;1,5;62,31;4,12\n")
    assert (a.tonnes, a.assay.fe, a.assay.sio2) == (1.5, 62.31, 4.12) and r.refused == 0
