"""The n42-portal driver: ANSI N42.42 fixtures (tests/fixtures/n42, see README.txt there) read with
values worked out by hand, hostile documents counted and skipped, a TCP stream with documents split
across reads, a directory drop read once across restarts, and the simulator's documents checked
structurally with a plain ElementTree reading of our own."""

from __future__ import annotations

import os
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from customs_edge.core.readings import PortalOccupancy
from customs_edge.drivers.n42 import N42Config, N42Error, N42Portal, N42Reader
from customs_edge.simulators.base import Endpoints
from customs_edge.simulators.ore_devices import PortalN42Sim
from customs_edge.simulators.ore_world import OreWorld, WorldConfig
from tests.conftest import wait_for

FIX = Path(__file__).resolve().parent / "fixtures" / "n42"
NS = "{http://physics.nist.gov/N42/2011/N42}"
GAMMA = (FIX / "rpm_gamma_alarm_group.n42").read_bytes()
NEUTRON = (FIX / "rpm_neutron_alarm.n42").read_bytes()
BACKGROUND = (FIX / "rpm_background_report.n42").read_bytes()

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<RadInstrumentData xmlns="http://physics.nist.gov/N42/2011/N42">&lol4;</RadInstrumentData>"""
XXE = b"""<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<RadInstrumentData xmlns="http://physics.nist.gov/N42/2011/N42"><RadInstrumentDataCreatorName>&xxe;\
</RadInstrumentDataCreatorName></RadInstrumentData>"""
NOT_N42 = b"<RadInstrumentData><x/></RadInstrumentData>"  # no namespace: not an N42.42 document
BROKEN = b"<RadInstrumentData xmlns='http://physics.nist.gov/N42/2011/N42'><a></RadInstrumentData>"
NAN_COUNTS = GAMMA.replace(b"<CountData>480</CountData>", b"<CountData>NaN</CountData>")
OVERFLOW = GAMMA.replace(b"<CountData>480</CountData>", b"<CountData>1e308 1e308</CountData>")
YEAR_ONE = NEUTRON.replace(b"2012-03-15T12:00:00.5+02:00", b"0001-01-01T00:00:00+02:00")
HUGE = GAMMA.replace(b"<RadInstrumentDataCreatorName>", b"<RadInstrumentDataCreatorName>" + b"x" * 20000)


def test_the_gamma_alarm_fixture_reads_as_worked_out_by_hand() -> None:
    [occ] = N42Reader("portal").parse(GAMMA)
    assert occ.occupancy_id == "0f8e2a6c-3b4d-4e5f-8a9b-1c2d3e4f5a6b/Occupancy-42"
    assert occ.instrument == "RPM-0003"
    assert occ.start == 1331806831.0  # 2012-03-15T10:20:31Z: Foreground-1, the first occupied one
    assert occ.end == 1331806834.0  # Foreground-3 starts 10:20:33, lasts 1 s
    assert occ.gamma_counts == 210 + 220 + 480 + 300 + 260 + 230  # Foreground-0 is unoccupied: left out
    assert occ.gamma_cps == pytest.approx((210 + 480 + 260) / 3 + (220 + 300 + 230) / 3)
    assert occ.neutron_counts == 2 + 1 + 3 + 2 + 1 + 2
    assert occ.neutron_cps == pytest.approx(11 / 3)
    assert occ.gamma_background_cps == pytest.approx(4000 / 20 + 4200 / 20)
    assert occ.neutron_background_cps == pytest.approx(40 / 20 + 36 / 20)
    assert occ.gamma_alarm and not occ.neutron_alarm
    assert (occ.gamma_threshold_cps, occ.neutron_threshold_cps) == (500.0, 12.0)
    assert occ.detectors == ("Gamma A", "Gamma B", "Neutron A", "Neutron B")
    assert occ.alarms == ("Gamma alarm, side A",)


def test_the_neutron_fixture_honours_prefix_offset_windows_and_live_time() -> None:
    [occ] = N42Reader("portal").parse(NEUTRON)
    assert occ.occupancy_id == "7d1c9b0e-5a2f-4c3e-9d8b-6e5f4a3b2c1d"  # no group: the document
    assert occ.start == 1331805600.5  # 12:00:00.5+02:00 = 10:00:00.5Z
    assert occ.end == 1331805604.5
    assert occ.gamma_counts == 300 + 250 + 50  # three energy windows
    assert occ.gamma_cps == pytest.approx(600 / 3.75)  # the GrossCounts' own live time
    assert occ.neutron_counts == 80 and occ.neutron_cps == pytest.approx(80 / 4)
    assert occ.gamma_background_cps == pytest.approx(150.0) and occ.neutron_background_cps == pytest.approx(3.0)
    assert occ.neutron_alarm and not occ.gamma_alarm
    assert occ.gamma_threshold_cps is None and occ.neutron_threshold_cps is None
    assert occ.detectors == ("G", "N")  # no RadDetectorName: the id


def test_a_background_report_yields_nothing_and_serves_the_next_occupancy() -> None:
    reader = N42Reader("portal")
    assert reader.parse(BACKGROUND) == []
    start = GAMMA.index(b'<RadMeasurement id="Background-1">')
    without_background = GAMMA[:start] + GAMMA[GAMMA.index(b"</RadMeasurement>", start) + 17:]
    [occ] = reader.parse(without_background)
    assert occ.gamma_background_cps == pytest.approx(6300 / 30 + 6600 / 30)
    assert occ.neutron_background_cps == pytest.approx(60 / 30 + 48 / 30)


@pytest.mark.parametrize("doc", [BILLION_LAUGHS, XXE, NOT_N42, BROKEN, NAN_COUNTS, OVERFLOW, YEAR_ONE, b"",
                                 b"\xff\xfe<"],
                         ids=["billion-laughs", "external-entity", "not-n42", "not-well-formed", "nan-count",
                              "counts-sum-to-inf", "year-one", "empty", "garbage"])
def test_hostile_or_broken_documents_are_refused_with_a_reason(doc: bytes) -> None:
    with pytest.raises(N42Error):
        N42Reader("portal").parse(doc)


@pytest.fixture
def server() -> Iterator[tuple[str, list[socket.socket]]]:
    """A loopback TCP server standing in for the portal: the test writes to the accepted socket."""
    listener = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []
    threading.Thread(target=lambda: conns.append(listener.accept()[0]), daemon=True).start()
    yield f"socket://127.0.0.1:{listener.getsockname()[1]}", conns
    for c in conns:
        c.close()
    listener.close()


def read_until(drv: N42Portal, what: str, timeout: float = 20.0) -> PortalOccupancy:
    found: PortalOccupancy = wait_for(drv.read, timeout, what, interval=0)
    return found


def test_tcp_stream_joins_a_document_split_across_reads_and_skips_hostile_ones(
        server: tuple[str, list[socket.socket]]) -> None:
    url, conns = server
    drv = N42Portal("portal", N42Config(port=url, read_timeout_s=0.05, max_document_bytes=16384))
    drv.open()
    try:
        conn = wait_for(lambda: conns[0] if conns else None, 10, "the driver to connect")
        half = len(NEUTRON) // 2
        conn.sendall(NEUTRON[:half])
        halves = []
        wait_for(lambda: halves.append(drv.read()) or drv.stats.bytes_in >= half, 10, "the first half to arrive")
        assert set(halves) == {None} and drv.read() is None  # half a document is not a document
        conn.sendall(NEUTRON[half:])
        assert read_until(drv, "the joined document").occupancy_id == "7d1c9b0e-5a2f-4c3e-9d8b-6e5f4a3b2c1d"
        cut = NEUTRON[: len(NEUTRON) - 40]  # lost its end on the line: the next document follows it
        for doc in (BILLION_LAUGHS, XXE, NOT_N42, HUGE, cut):
            conn.sendall(doc + b"\r\n")
        conn.sendall(GAMMA)
        occ = read_until(drv, "the document after the hostile ones")
        assert occ.gamma_alarm and occ.gamma_counts == 1700
        assert drv.stats.corrupt == 5 and drv.stats.frames == 2
        assert drv.stats.extra["dropped"] == 2  # the huge one and the cut one
    finally:
        drv.close()


def drop(d: Path, name: str, data: bytes, age_s: float = 10.0) -> Path:
    p = d / name
    p.write_bytes(data)
    past = time.time() - age_s
    os.utime(p, (past, past))
    return p


def test_directory_drop_reads_each_file_once_across_restarts(tmp_path: Path) -> None:
    d = tmp_path / "drop"
    d.mkdir()
    drop(d, "a_background.n42", BACKGROUND)
    drop(d, "b_gamma.n42", GAMMA)
    drop(d, "c_bomb.n42", BILLION_LAUGHS)
    drop(d, "c_huge.xml", HUGE)
    drop(d, "d_neutron.n42", NEUTRON)
    drop(d, "notes.txt", b"not a pattern match")
    drop(d, "e_fresh.n42", GAMMA, age_s=0)  # still being written, as far as we know
    cfg = N42Config(port=f"dir://{d}", read_timeout_s=0.01, settle_s=5.0, max_document_bytes=16384)

    def run() -> tuple[list[str], N42Portal]:
        drv = N42Portal("portal", cfg)
        drv.open()
        got = []
        for _ in range(10):
            r = drv.read()
            if r is not None:
                got.append(r.occupancy_id)
        drv.close()
        return got, drv

    got, drv = run()
    assert got == ["0f8e2a6c-3b4d-4e5f-8a9b-1c2d3e4f5a6b/Occupancy-42", "7d1c9b0e-5a2f-4c3e-9d8b-6e5f4a3b2c1d"]
    assert drv.stats.corrupt == 2 and drv.stats.extra["no_occupancy"] == 1  # the bomb and the huge one
    got, drv = run()  # a restart: nothing read again, the refused files not counted again
    assert got == [] and drv.stats.corrupt == 0
    drop(d, "e_fresh.n42", GAMMA)  # now settled
    drop(d, "d_neutron.n42", NEUTRON + b"\n")  # rewritten: another size, another mtime
    got, _ = run()
    assert sorted(got) == ["0f8e2a6c-3b4d-4e5f-8a9b-1c2d3e4f5a6b/Occupancy-42",
                           "7d1c9b0e-5a2f-4c3e-9d8b-6e5f4a3b2c1d"]


def test_a_directory_that_is_not_there_is_a_fault(tmp_path: Path) -> None:
    from customs_edge.core.errors import DriverFault

    drv = N42Portal("portal", N42Config(port=f"dir://{tmp_path / 'nope'}"))
    with pytest.raises(DriverFault, match="not a directory"):
        drv.open()


def test_config_refuses_other_urls() -> None:
    with pytest.raises(ValueError, match="socket://host:port or dir://"):
        N42Config(port="/dev/ttyUSB0")


# --- the simulator's documents, read without the driver --------------------------------------------

def world(**over: float) -> tuple[OreWorld, list[float]]:
    clock = [0.0]
    cfg = WorldConfig(seed=5, speed=1.0, gamma_alarms_per_h=0, metal_per_h=0, stops_per_h=0, **over)  # type: ignore[arg-type]
    return OreWorld(cfg, clock=lambda: clock[0]), clock


def plain(doc: bytes) -> dict[str, object]:
    """An independent reading with the stdlib ElementTree: the required elements (n42.xsd) are there,
    references resolve, and the foreground gamma counts and the alarm categories."""
    root = ET.fromstring(doc)
    assert root.tag == NS + "RadInstrumentData" and root.get("n42DocUUID")
    info = root.find(NS + "RadInstrumentInformation")
    assert info is not None
    for tag in ("RadInstrumentManufacturerName", "RadInstrumentModelName", "RadInstrumentClassCode",
                "RadInstrumentVersion"):
        assert info.find(NS + tag) is not None, tag
    cats = {}
    for det in root.findall(NS + "RadDetectorInformation"):
        cat = det.findtext(NS + "RadDetectorCategoryCode")
        assert det.get("id") and cat in ("Gamma", "Neutron") and det.findtext(NS + "RadDetectorKindCode")
        cats[det.get("id")] = cat
    groups = {g.get("id") for g in root.findall(NS + "RadMeasurementGroup")}
    gamma = 0
    classes = []
    for m in root.findall(NS + "RadMeasurement"):
        klass = m.findtext(NS + "MeasurementClassCode")
        classes.append(klass)
        assert m.get("id") and m.findtext(NS + "StartDateTime") and m.findtext(NS + "RealTimeDuration")
        assert set((m.get("radMeasurementGroupReferences") or "").split()) <= groups
        for gc in m.findall(NS + "GrossCounts"):
            assert gc.get("id") and gc.get("radDetectorInformationReference") in cats
            assert gc.findtext(NS + "LiveTimeDuration") and gc.findtext(NS + "CountData")
            if klass == "Foreground" and cats[gc.get("radDetectorInformationReference")] == "Gamma":
                gamma += int(gc.findtext(NS + "CountData") or "")
    alarms = []
    for a in root.iter(NS + "RadAlarm"):
        refs = (a.get("radDetectorInformationReferences") or "").split()
        assert refs and set(refs) <= set(cats)
        alarms.append(a.findtext(NS + "RadAlarmCategoryCode"))
    return {"classes": classes, "gamma": gamma, "alarms": alarms, "groups": groups}


def test_simulator_documents_are_complete_n42_and_read_alike_by_both_readers() -> None:
    w, clock = world(gamma_every_s=600, neutron_every_s=900)
    sim = PortalN42Sim(w, seed=5)
    clock[0] = 1000.0
    occupancies = w.occupancies_after(0)
    assert len(occupancies) >= 15  # a belt segment of 60 s each
    reader = N42Reader("portal")
    seen_alarms: set[str] = set()
    for occ in occupancies:
        doc = sim.document(occ)
        mine = plain(doc)
        assert mine["classes"][0] == "Background" and set(mine["classes"][1:]) == {"Foreground"}
        [reading] = reader.parse(doc)
        assert reading.gamma_counts == mine["gamma"]
        assert {"Gamma": reading.gamma_alarm, "Neutron": reading.neutron_alarm} == {
            c: c in mine["alarms"] for c in ("Gamma", "Neutron")}
        assert reading.occupancy_id.endswith(f"/Occupancy-{occ.no}")
        seen_alarms |= set(mine["alarms"])  # type: ignore[arg-type]
    assert seen_alarms == {"Gamma", "Neutron"}  # the scheduled sources raised both


def test_simulator_pushes_documents_over_tcp_and_a_triggered_source_alarms() -> None:
    w = OreWorld(WorldConfig(seed=2, speed=600.0, gamma_alarms_per_h=0, metal_per_h=0, stops_per_h=0))
    with Endpoints(PortalN42Sim(w, seed=2), use_pty=False, tcp_port=0) as urls:
        drv = N42Portal("portal", N42Config(port=urls["socket"], read_timeout_s=0.05))
        drv.open()
        try:
            first = read_until(drv, "an occupancy")
            assert not first.alarm and first.gamma_background_cps is not None
            w.trigger_gamma()
            wait_for(lambda: (r := drv.read()) is not None and r.gamma_alarm, 30, "a gamma alarm occupancy",
                     interval=0)
            assert drv.stats.corrupt == 0
        finally:
            drv.close()


def test_the_station_serves_the_n42_portal_on_request() -> None:
    from customs_edge.simulators.ore_station import OreStation, build_parser, station_from_args

    assert "radiation_portal" not in OreStation().sims()  # the Modbus portal alone, as configs/ore-station.yaml
    st = station_from_args(build_parser().parse_args(["--n42-portal", "--neutron-every", "600"]))
    assert st.n42_portal is not None and st.sims()["radiation_portal"] == (st.n42_portal, False)
    assert st.world.cfg.neutron_every_s == 600
    st.kill("radiation_portal")
    assert st.n42_portal.faults.paused
