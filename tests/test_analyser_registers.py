"""Analyser results published in Modbus TCP holding registers (the `analyser` role, driver modbus-tcp):
each new result counter is one `ore_analysis` record without a model assay; a repeat of the counter is
the same result; flagged points are not taken; the counter survives a restart. End to end through the
real `modbus-tcp` driver against pymodbus's TCP server."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import yaml
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from customs_edge.agent.apps.ore import OreAppConfig, OreStationApp
from customs_edge.agent.config import parse_unit_config
from customs_edge.core.readings import Point, Registers, SlaveError
from customs_edge.core.records import RecordIn
from customs_edge.drivers.modbus import ModbusTcp, ModbusTcpConfig
from tests.conftest import wait_for
from tests.test_modbus_pymodbus_server import ServerThread, free_port
from tests.test_ore_app import Station

REPO = Path(__file__).resolve().parent.parent


def results(out: list[RecordIn]) -> list[RecordIn]:
    return [r for r in out if r.type == "ore_analysis"]


def regs(st: Station, **values: float) -> list[RecordIn]:
    return results(st.regs("analyser", "analyser", **values))


def test_one_record_per_new_counter_none_for_repeats() -> None:
    st = Station()
    st.belt(1)
    (first,) = regs(st, result_no=7, fe=62.4, sio2=4.1, h2o=8.2, tonnes=120.0)
    assert first.payload["model"] is None and first.payload["seq"] == 7 and first.payload["tonnes"] == 120.0
    assert first.payload["analyser"].items() >= {"fe": 62.4, "sio2": 4.1, "h2o": 8.2, "al2o3": None}.items()
    assert first.payload["lot_id"] is not None
    assert regs(st, result_no=7, fe=62.4, sio2=4.1, h2o=8.2, tonnes=120.0) == []  # the same result, polled again
    (second,) = regs(st, result_no=8, fe=63.0, sio2=4.0, h2o=8.0, tonnes=80.0)
    assert second.payload["seq"] == 8 and second.payload["analyser"]["fe"] == 63.0
    (reset,) = regs(st, result_no=1, fe=61.0, tonnes=100.0)  # the analyser restarted its count
    assert reset.payload["seq"] == 1
    assert regs(st, result_no=1, fe=61.0, tonnes=100.0) == []  # ... and it is the new baseline
    est = st.app.lot.whole.fe_analyser.estimate()  # type: ignore[union-attr]
    assert est is not None and est["n"] == 3
    assert abs(est["value"] - (62.4 * 120 + 63.0 * 80 + 61.0 * 100) / 300) < 1e-3


def test_names_are_configurable() -> None:
    st = Station(analyser_registers={"result_counter": "res", "fe": "fe_pct", "tonnes": "mass_t"})
    st.belt(1)
    (rec,) = regs(st, res=3, fe_pct=64.5, mass_t=50.0, fe=1.0)
    assert rec.payload["analyser"]["fe"] == 64.5 and rec.payload["tonnes"] == 50.0


def flagged(st: Station, **points: Point) -> list[RecordIn]:
    return results(st.feed(Registers(source="analyser", slave="analyser", slave_id=1, points=points, mono=st.at())))


def test_flagged_values_are_not_taken() -> None:
    st = Station()
    st.belt(1)
    bad = Point(None, "%", "not finite (nan)")
    (rec,) = flagged(st, result_no=Point(4), fe=bad, sio2=Point(4.2), tonnes=Point(90.0))
    assert rec.payload["analyser"]["fe"] is None and rec.payload["analyser"]["sio2"] == 4.2
    assert st.app.lot is not None and st.app.lot.whole.fe_analyser.estimate() is None
    n = len(st.records)
    # a flagged counter: the result cannot be told from a repeat; one fault, however many polls
    assert flagged(st, result_no=Point(None, None, "out of range"), fe=Point(60.0), tonnes=Point(1.0)) == []
    assert flagged(st, result_no=Point(None, None, "out of range"), fe=Point(60.0), tonnes=Point(1.0)) == []
    (fault,) = st.records[n:]
    assert fault.type == "instrument_fault" and "out of range" in fault.payload["error"]
    (nxt,) = flagged(st, result_no=Point(5), fe=Point(60.0), tonnes=bad)  # no tonnage: recorded, not weighed
    assert nxt.payload["analyser"]["fe"] == 60.0 and st.app.lot.whole.fe_analyser.estimate() is None
    assert st.records[-2].type == "instrument_recovered"


def test_a_missing_counter_point_names_the_fix() -> None:
    st = Station()
    st.belt(1)
    assert regs(st, result=3, fe=62.0, tonnes=5.0) == []
    (fault,) = [r for r in st.records if r.type == "instrument_fault"]
    assert "app.analyser_registers.result_counter" in fault.payload["error"] and "result" in fault.payload["error"]


def test_the_last_counter_survives_a_restart_and_a_fault_recovers() -> None:
    st = Station()
    st.belt(1)
    assert len(regs(st, result_no=11, fe=62.0, tonnes=10.0)) == 1
    out = st.feed(SlaveError(source="analyser", slave="analyser", slave_id=1, error="timeout"))
    assert [r.type for r in out] == ["instrument_fault"]
    blob = st.app.snapshot()
    assert blob is not None
    app = OreStationApp("ore-test", OreAppConfig())
    app.restore(blob)
    again = app.feed(Registers.of({"result_no": 11, "fe": 62.0, "tonnes": 10.0}, source="analyser",
                                  slave="analyser", slave_id=1))
    assert [r.type for r in again] == ["instrument_recovered"]  # the same result is not recorded twice


def test_the_config_loader_accepts_a_modbus_tcp_analyser() -> None:
    raw = yaml.safe_load((REPO / "configs" / "ore-station.yaml").read_text())
    raw["drivers"]["analyser"] = {"driver": "modbus-tcp", "port": "tcp://192.0.2.30:502", "slaves": [
        {"name": "analyser", "id": 1, "points": [{"name": "result_no", "table": "holding", "address": 0,
                                                   "type": "uint32"}]}]}
    cfg = parse_unit_config(raw, "ore.yaml")
    assert isinstance(cfg.drivers["analyser"], ModbusTcpConfig)


def words(counter: int, fe: float, sio2: float, tonnes: float) -> list[int]:
    """The vendor's register list: uint32 counter, then float32 values, CDAB (low word first)."""
    out = list(struct.unpack(">HH", struct.pack(">I", counter)))
    for x in (fe, sio2, tonnes):
        hi, lo = struct.unpack(">HH", struct.pack(">f", x))
        out += [lo, hi]
    return out


def test_end_to_end_through_the_modbus_tcp_driver() -> None:
    port = free_port()
    dev = SimDevice(1, simdata=(
        [SimData(0, values=[False], datatype=DataType.BITS)], [SimData(0, values=[False], datatype=DataType.BITS)],
        [SimData(0, values=words(41, 62.5, 4.25, 150.0), datatype=DataType.UINT16)],
        [SimData(0, values=[0], datatype=DataType.UINT16)]))
    server = ServerThread(lambda: ModbusTcpServer([dev], address=("127.0.0.1", port)))
    f32 = {"table": "holding", "type": "float32", "word_order": "CDAB"}
    cfg = ModbusTcpConfig(port=f"tcp://127.0.0.1:{port}", read_timeout_s=2.0, slaves=[
        {"name": "analyser", "id": 1, "poll_interval_s": 0.01, "points": [
            {"name": "result_no", "table": "holding", "address": 0, "type": "uint32"},
            {"name": "fe", "address": 2, "range": [0, 75], **f32}, {"name": "sio2", "address": 4, **f32},
            {"name": "tonnes", "address": 6, **f32}]}])
    st = Station()
    st.belt(1)
    got: list[RecordIn] = []
    with server, ModbusTcp("analyser", cfg) as drv:
        def poll(n: int) -> bool:
            r = drv.read()
            if isinstance(r, Registers):
                got.extend(results(st.feed(r)))
                polls.append(r)
            return len(polls) >= n

        polls: list[Registers] = []
        wait_for(lambda: poll(3), 10.0, "three polls of the same result")
        assert len(got) == 1
        # the analyser publishes its next result (function 16: write the holding registers)
        store = server.server.context  # type: ignore[attr-defined]
        asyncio.run_coroutine_threadsafe(store.async_setValues(1, 16, 0, words(42, 63.75, 3.5, 90.0)),
                                         server.loop).result(5)
        wait_for(lambda: poll(len(polls) + 1) and len(got) == 2, 10.0, "the next result")
    assert [g.payload["seq"] for g in got] == [41, 42]
    assert got[0].payload["analyser"]["fe"] == 62.5 and got[0].payload["tonnes"] == 150.0
    assert got[1].payload["analyser"].items() >= {"fe": 63.75, "sio2": 3.5}.items() and got[1].payload["model"] is None
