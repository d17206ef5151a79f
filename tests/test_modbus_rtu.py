"""ModbusRtu against the station's Modbus line simulator, on a real pty and a loopback socket,
including every injected fault: withheld replies, CRC errors, exception responses, a dead slave,
a dead line, and bytes damaged on the wire."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from customs_edge.core import readings as rd
from customs_edge.core.errors import DriverFault
from customs_edge.drivers.modbus import (
    Block,
    ModbusRtu,
    ModbusRtuConfig,
    PointConfig,
    build_request,
    crc16,
    decode_value,
    encode_value,
    plan_blocks,
)
from customs_edge.simulators.base import Endpoints, Faults
from customs_edge.simulators.ore_devices import ModbusLineSim, SlaveModel
from customs_edge.simulators.wire import modbus as rtu


class Registers:
    """A slave's register image that a test changes at will."""

    def __init__(self) -> None:
        self.ir = {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 0}
        self.hr = {0: 7, 1: 2}
        self.di = {0: 1, 1: 0}
        self.set(rate=4012.5, speed=4.512, total=123456.7, temp=-3.5)

    def set(self, rate: float, speed: float, total: float, temp: float) -> None:
        hi, lo = struct.unpack(">HH", struct.pack(">f", rate))
        self.ir[0], self.ir[1] = hi, lo
        self.ir[2] = round(speed * 1000)
        raw = round(total * 10)
        self.ir[3], self.ir[4] = raw & 0xFFFF, raw >> 16  # low word first
        self.ir[5] = struct.unpack(">H", struct.pack(">h", round(temp * 10)))[0]

    def tables(self) -> dict[str, dict[int, int]]:
        return {"input": dict(self.ir), "holding": dict(self.hr), "discrete": dict(self.di)}


POINTS = [
    {"name": "rate_tph", "table": "input", "address": 0, "type": "float32", "unit": "t/h"},
    {"name": "speed_mps", "table": "input", "address": 2, "scale": 0.001, "unit": "m/s"},
    {"name": "total_t", "table": "input", "address": 3, "type": "uint32", "word_order": "little", "scale": 0.1},
    {"name": "temp_c", "table": "input", "address": 5, "type": "int16", "scale": 0.1},
    {"name": "lot_no", "table": "holding", "address": 0},
    {"name": "hold_no", "table": "holding", "address": 1},
    {"name": "running", "table": "discrete", "address": 0, "type": "bool"},
    {"name": "metal", "table": "discrete", "address": 1, "type": "bool"},
]


@pytest.fixture(params=["pty", "socket"])
def line(request: pytest.FixtureRequest):
    regs = {1: Registers(), 2: Registers()}
    slaves = [SlaveModel(1, "weigher", regs[1].tables), SlaveModel(2, "moisture", regs[2].tables)]
    sim = ModbusLineSim(slaves, Faults(seed=3), seed=3)
    with Endpoints(sim) as urls:
        yield sim, regs, urls[request.param]


def driver(url: str, ids: tuple[int, ...] = (1,), **kw: object) -> ModbusRtu:
    names = {1: "weigher", 2: "moisture"}
    # parity N: Linux ptys refuse a second open with parity E (EINVAL from tcsetattr)
    cfg = ModbusRtuConfig(port=url, parity="N", read_timeout_s=0.15, slaves=[
        {"name": names[i], "id": i, "poll_interval_s": 0.01, "points": POINTS} for i in ids], **kw)
    return ModbusRtu("belt_weigher", cfg)


def test_reads_every_type_and_table(line) -> None:
    sim, regs, url = line
    with driver(url) as d:
        r = d.read() or d.read()
    assert isinstance(r, rd.Registers)
    v = {name: p.value for name, p in r.points.items()}
    assert r.slave == "weigher" and r.slave_id == 1
    assert v["rate_tph"] == pytest.approx(4012.5)
    assert v["speed_mps"] == pytest.approx(4.512)
    assert v["total_t"] == pytest.approx(123456.7)
    assert v["temp_c"] == pytest.approx(-3.5)
    assert (v["lot_no"], v["hold_no"], v["running"], v["metal"]) == (7, 2, True, False)
    # three tables -> three requests per poll
    assert sim.slaves[1].requests == 3
    regs[1].set(rate=10.0, speed=0.0, total=0.5, temp=20.0)
    regs[1].di[1] = 1
    with driver(url) as d:
        r = d.read() or d.read()
    assert isinstance(r, rd.Registers)
    v = {name: p.value for name, p in r.points.items()}
    assert (v["rate_tph"], v["total_t"], v["metal"]) == (pytest.approx(10.0), pytest.approx(0.5), True)


def test_crc_error_is_counted_and_retried(line) -> None:
    sim, _, url = line
    sim.slaves[1].faults.crc_next = 2
    with driver(url, retries=2) as d:
        r = d.read() or d.read()
        assert isinstance(r, rd.Registers)
        assert d.stats.extra["crc_errors"] == 2 and d.stats.corrupt == 2
        assert d.stats.extra["retries"] == 2
    assert sim.slaves[1].faults.damaged == 2


def test_timeout_is_counted_and_retried(line) -> None:
    sim, _, url = line
    sim.slaves[1].faults.timeout_next = 1
    with driver(url, retries=1) as d:
        r = d.read() or d.read()
        assert isinstance(r, rd.Registers)
        assert d.stats.extra["timeouts"] == 1 and d.stats.extra["retries"] == 1


def test_retries_exhausted_gives_slave_error_then_recovers(line) -> None:
    sim, _, url = line
    sim.slaves[1].faults.timeout_next = 3
    with driver(url, retries=1, fail_after=5) as d:
        r = d.read() or d.read()
        assert isinstance(r, rd.SlaveError)
        assert r.slave == "weigher" and "timeout" in r.error
        assert r.consecutive == 1
        r = d.read() or d.read()  # third withheld reply, then the retry succeeds
        assert isinstance(r, rd.Registers)


def test_exception_response_is_reported_not_retried(line) -> None:
    sim, _, url = line
    sim.slaves[1].faults.exception_next = 1
    sim.slaves[1].faults.exception_code = 4
    with driver(url, retries=3) as d:
        r = d.read() or d.read()
        assert isinstance(r, rd.SlaveError)
        assert "exception 4" in r.error and "slave device failure" in r.error
        assert d.stats.extra["exceptions"] == 1 and d.stats.extra["retries"] == 0


def test_unmapped_address_gives_illegal_address(line) -> None:
    _, _, url = line
    cfg = ModbusRtuConfig(port=url, parity="N", read_timeout_s=0.15, slaves=[{"name": "weigher", "id": 1, "points": [
        {"name": "nothing_here", "table": "holding", "address": 900}]}])
    with ModbusRtu("x", cfg) as d:
        r = d.read() or d.read()
    assert isinstance(r, rd.SlaveError) and "illegal data address" in r.error


def test_dead_slave_on_shared_line_reports_per_slave(line) -> None:
    sim, _, url = line
    sim.slaves[2].faults.dead = True
    with driver(url, ids=(1, 2), retries=0, fail_after=2) as d:
        kinds: dict[str, list[str]] = {"weigher": [], "moisture": []}
        for _ in range(20):
            r = d.read()
            if r is not None:
                assert isinstance(r, rd.Registers | rd.SlaveError)
                kinds[r.slave].append(r.KIND)
        assert set(kinds["weigher"]) == {"registers"}
        assert kinds["moisture"] and set(kinds["moisture"]) == {"slave_error"}
        assert d.stats.faults == 0  # the line works: no DriverFault for one dead slave


def test_dead_line_raises_driver_fault(line) -> None:
    sim, _, url = line
    sim.slaves[1].faults.dead = True
    sim.slaves[2].faults.dead = True
    with driver(url, ids=(1, 2), retries=0, fail_after=2) as d:
        with pytest.raises(DriverFault, match="no slave answers"):
            for _ in range(20):
                d.read()
        assert d.stats.faults == 1


def test_damaged_bytes_on_the_wire_are_counted_and_skipped(line) -> None:
    sim, _, url = line
    sim.faults.corrupt_next(6)  # flipped bits or truncated replies, one per damaged frame
    with driver(url, retries=0, fail_after=50) as d:
        kinds = []
        while sim.faults.corrupted < 6 or len(kinds) < 12:
            r = d.read()
            if r is not None:
                kinds.append(r.KIND)
        x = d.stats.extra
        assert x["crc_errors"] + x["timeouts"] + x["wrong_slave"] == 6
        assert kinds.count("slave_error") == 6  # retries=0: each damaged reply fails one poll
        assert kinds[-3:] == ["registers"] * 3  # back in step after the damage


def test_unplugged_socket_raises_driver_fault() -> None:
    regs = Registers()
    sim = ModbusLineSim([SlaveModel(1, "weigher", regs.tables)])
    ep = Endpoints(sim, use_pty=False)
    urls = ep.start()
    d = driver(urls["socket"])
    d.open()
    try:
        assert (d.read() or d.read()) is not None
        ep.drop_clients(refuse_for=5)
        with pytest.raises(DriverFault):
            for _ in range(10):
                d.read()
    finally:
        d.close()
        ep.stop()


def test_open_fails_cleanly() -> None:
    with pytest.raises(DriverFault, match="cannot open"):
        driver("/dev/does-not-exist-ttyUSB9").open()


# --- pure functions --------------------------------------------------------------------------

def test_crc_matches_the_specification_example() -> None:
    # Modbus over serial line spec, read holding registers of slave 1, address 0, count 1: 84 0A
    assert crc16(bytes.fromhex("010300000001")) == bytes.fromhex("840A")
    assert build_request(1, Block("holding", 0, 1, ())) == bytes.fromhex("010300000001840A")


@given(st.sampled_from(["uint16", "int16", "uint32", "int32"]), st.integers(), st.sampled_from(["big", "little"]))
def test_integer_values_round_trip(dtype: str, value: int, order: str) -> None:
    bits = {"uint16": (0, 2**16), "int16": (-2**15, 2**15), "uint32": (0, 2**32), "int32": (-2**31, 2**31)}[dtype]
    value = bits[0] + value % (bits[1] - bits[0])
    words = encode_value(dtype, value, order)  # type: ignore[arg-type]
    assert all(0 <= w < 65536 for w in words)
    assert decode_value(dtype, words, order) == value  # type: ignore[arg-type]


def test_float_word_order() -> None:
    assert encode_value("float32", 1.0, "big") == [0x3F80, 0x0000]
    assert encode_value("float32", 1.0, "little") == [0x0000, 0x3F80]
    assert decode_value("float32", [0x0000, 0x3F80], "little") == 1.0


def test_blocks_group_contiguous_points_per_table() -> None:
    pts = [PointConfig.model_validate(p) for p in POINTS]
    blocks = {(b.table, b.address, b.count) for b in plan_blocks(pts)}
    assert blocks == {("input", 0, 6), ("holding", 0, 2), ("discrete", 0, 2)}
    far = [PointConfig(name="a", address=0), PointConfig(name="b", address=200)]
    assert [(b.address, b.count) for b in plan_blocks(far)] == [(0, 1), (200, 1)]


def test_config_refuses_mismatched_type_and_duplicates() -> None:
    with pytest.raises(ValidationError, match="coils/discrete inputs take type 'bool'"):
        PointConfig(name="x", table="coil", address=0, type="uint16")
    with pytest.raises(ValidationError, match="unique"):
        ModbusRtuConfig(port="/dev/null", slaves=[
            {"name": "a", "id": 1, "points": [{"name": "x", "address": 0}]},
            {"name": "b", "id": 1, "points": [{"name": "x", "address": 0}]}])
    with pytest.raises(ValidationError, match="repeated"):
        ModbusRtuConfig(port="/dev/null", slaves=[{"name": "a", "id": 1, "points": [
            {"name": "x", "address": 0}, {"name": "x", "address": 1}]}])
    with pytest.raises(ValidationError):
        ModbusRtuConfig(port="/dev/null", slaves=[{"name": "a", "id": 1, "points": [
            {"name": "x", "address": 0, "scaling": 2}]}])


# --- late replies: RTU has no transaction id, so the line is drained after a timeout ------------------------
SPLIT = [{"name": "a", "table": "holding", "address": 0}, {"name": "b", "table": "holding", "address": 100}]


@pytest.fixture(params=["pty", "socket"])
def split_line(request: pytest.FixtureRequest):
    """One slave whose two points are read by two requests of the same shape (function 3, one register)."""
    slave = SlaveModel(1, "weigher", lambda: {"holding": {0: 111, 100: 222}})
    sim = ModbusLineSim([slave], Faults(seed=4), seed=4)
    with Endpoints(sim) as urls:
        yield slave, ModbusRtuConfig(port=urls[request.param], parity="N", read_timeout_s=0.2, retries=0,
                                     fail_after=1000, slaves=[{"name": "weigher", "id": 1,
                                                               "poll_interval_s": 0.01, "points": SPLIT}])


def test_replies_later_than_the_timeout_never_land_on_the_next_request(split_line) -> None:
    """A slave that always answers 0.3 s after a 0.2 s timeout: without draining, each request reads the
    previous request's reply and a and b swap silently. Every poll must fail as a timeout instead."""
    slave, cfg = split_line
    slave.faults.late_next, slave.faults.late_by_s = 1000, 0.3
    with ModbusRtu("belt_weigher", cfg) as d:
        readings = [r for _ in range(8) if (r := d.read()) is not None]
        assert d.stats.extra["drained"] > 0
    assert len(readings) >= 6 and slave.faults.late >= 6
    assert [(r.number("a"), r.number("b")) for r in readings if isinstance(r, rd.Registers)] == []  # no swapped values
    assert all(isinstance(r, rd.SlaveError) and "timeout" in r.error for r in readings)


def test_after_one_late_reply_the_values_stay_in_place(split_line) -> None:
    slave, cfg = split_line
    slave.faults.late_next, slave.faults.late_by_s = 1, 0.3
    with ModbusRtu("belt_weigher", cfg) as d:
        readings = [r for _ in range(10) if (r := d.read()) is not None]
    assert isinstance(readings[0], rd.SlaveError) and "timeout" in readings[0].error
    good = [(r.number("a"), r.number("b")) for r in readings if isinstance(r, rd.Registers)]
    assert len(good) >= 8 and set(good) == {(111, 222)}


class Scripted(ModbusLineSim):
    """Answers every request with the next scripted reply (each a whole frame with a valid CRC)."""

    def __init__(self, replies: list[bytes]) -> None:
        super().__init__([])
        self.replies = replies

    def serve(self, conn, stop) -> None:  # type: ignore[no-untyped-def]
        while not stop.is_set() and not conn.closed:
            if conn.read(0.05) and self.replies:
                conn.write(self.replies.pop(0))


@pytest.mark.parametrize(("reply", "counter"), [
    (rtu.read_reply(2, 3, [111]), "wrong_slave"),             # another slave's reply
    (rtu.read_reply(1, 4, [111]), "wrong_slave"),             # another function's reply
    (rtu.frame(bytes([1, 3, 4, 0, 111])), "wrong_count"),     # byte count 4 for one register, CRC good
    (rtu.frame(bytes([1, 3, 1, 0, 111])), "wrong_count"),     # byte count 1, CRC good
])
def test_a_reply_that_does_not_match_the_request_is_refused_and_counted(reply: bytes, counter: str) -> None:
    with Endpoints(Scripted([reply, rtu.read_reply(1, 3, [111])]), use_pty=False) as urls:
        cfg = ModbusRtuConfig(port=urls["socket"], parity="N", read_timeout_s=0.2, retries=1, slaves=[
            {"name": "weigher", "id": 1, "points": [{"name": "a", "table": "holding", "address": 0}]}])
        with ModbusRtu("belt_weigher", cfg) as d:
            r = d.read() or d.read()
    assert isinstance(r, rd.Registers) and r.number("a") == 111  # the retry got the right reply
    assert d.stats.extra[counter] == 1 and d.stats.corrupt == 1


# --- a published exchange, read by the driver and written by the simulator independently --------------------
EXAMPLE = json.loads((Path(__file__).parent / "fixtures" / "modbus" / "read_holding_example.json").read_text())


def test_the_published_exchange_is_what_the_driver_sends_and_decodes() -> None:
    req, reply = (bytes.fromhex(EXAMPLE[k]["hex"]) for k in ("request", "reply"))
    slave, address, count = EXAMPLE["request"]["slave"], EXAMPLE["request"]["address"], EXAMPLE["request"]["count"]
    assert build_request(slave, Block("holding", address, count, ())) == req
    points = [{"name": f"r{i}", "table": "holding", "address": address + i} for i in range(count)]
    with Endpoints(Scripted([reply]), use_pty=False) as urls:
        cfg = ModbusRtuConfig(port=urls["socket"], parity="N", slaves=[{"name": "s", "id": slave, "points": points}])
        with ModbusRtu("line", cfg) as d:
            r = d.read() or d.read()
    assert isinstance(r, rd.Registers)
    assert [r.points[f"r{i}"].value for i in range(count)] == EXAMPLE["reply"]["registers"]


def test_the_published_exchange_is_what_the_simulator_answers() -> None:
    req, reply = (bytes.fromhex(EXAMPLE[k]["hex"]) for k in ("request", "reply"))
    assert rtu.crc16(req[:-2]) == req[-2:]
    address, words = EXAMPLE["request"]["address"], EXAMPLE["reply"]["registers"]
    slave = SlaveModel(EXAMPLE["request"]["slave"], "s",
                       lambda: {"holding": {address + i: w for i, w in enumerate(words)}})
    assert ModbusLineSim([slave]).respond(req) == reply
