"""Frames kept as files: the documented analyser block, an MT-SICS session, Modbus RTU frames
(one from the specification). They pin the wire formats: a parser change that stops reading them,
or an encoder that stops producing them, fails here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from customs_edge.core.readings import Registers
from customs_edge.drivers.analyser import AnalyserParser, AnalyserResult, AnalyserStatus, encode_result
from customs_edge.drivers.modbus import ModbusRtu, ModbusRtuConfig, build_request, crc16, plan_blocks
from customs_edge.drivers.mtsics import parse_reply
from customs_edge.simulators.base import Conn, Endpoints
from customs_edge.simulators.ore_devices import ModbusLineSim
from customs_edge.simulators.wire import analyser as analyser_wire

FIX = Path(__file__).parent / "fixtures" / "ore"
REPO = Path(__file__).resolve().parent.parent


def test_analyser_block_fixture_parses_and_re_encodes_identically() -> None:
    data = (FIX / "analyser_result.txt").read_bytes()
    meta = json.loads((FIX / "analyser_result.json").read_text())
    p = AnalyserParser()
    p.feed(data)
    result, status = p.next(), p.next()
    assert isinstance(result, AnalyserResult) and isinstance(status, AnalyserStatus) and p.corrupt == 0
    assert result.seq == meta["seq"] and result.tonnes == pytest.approx(meta["tonnes"], abs=0.01)
    assert result.assays == pytest.approx(meta["own"], abs=1e-3)
    assert float(result.counts.sum()) == meta["counts_sum"] and result.counts.shape == (1024,)
    assert data.startswith(encode_result(result))  # the encoder still writes the documented format
    # and so does the simulator's own encoder (simulators/wire/analyser.py never imports the driver)
    assert data == analyser_wire.result(
        result.seq, result.ts, result.interval_s, result.tonnes, result.status, result.assays,
        result.counts.astype(int).tolist(), result.live_time_s, result.kev_per_channel,
        result.offset_kev) + analyser_wire.status_line(status.ts, status.state, status.detector_c)


def test_shipped_model_reads_the_fixture_spectrum() -> None:
    from customs_edge.models import default_manifest
    from customs_edge.models.runtime import OnnxModel

    p = AnalyserParser()
    p.feed((FIX / "analyser_result.txt").read_bytes())
    result = p.next()
    assert isinstance(result, AnalyserResult)
    truth = json.loads((FIX / "analyser_result.json").read_text())["truth"]
    fe, sio2, h2o = OnnxModel(default_manifest("ore_grade")).predict(
        {"spectrum": result.counts.reshape(1, -1)})["assay"][0]
    assert (fe, sio2, h2o) == pytest.approx((truth["fe"], truth["sio2"], truth["h2o"]), abs=0.6)


def test_mtsics_session_fixture() -> None:
    for line in (FIX / "mtsics_session.txt").read_text().splitlines():
        if line.startswith("#"):
            continue
        reply, kind, status, weight = line.split("\t")
        r = parse_reply(reply.encode())
        assert r is not None, reply
        assert (r.kind, r.status) == (kind, status)
        assert r.weight == (float(weight) if weight else None)


class Replay(ModbusLineSim):
    """Answers each request with the fixture's recorded reply."""

    def __init__(self, replies: dict[bytes, bytes]) -> None:
        super().__init__([])
        self.replies = replies

    def serve(self, conn: Conn, stop) -> None:  # type: ignore[no-untyped-def]
        while not stop.is_set() and not conn.closed:
            data = conn.read(0.05)
            if data in self.replies:
                conn.write(self.replies[data])


def test_modbus_frames_fixture() -> None:
    fx = json.loads((FIX / "modbus_frames.json").read_text())
    spec = fx["request_spec_example"]
    body = bytes.fromhex(spec["hex"])
    assert crc16(body[:-2]) == body[-2:]
    cfg = yaml.safe_load((REPO / "configs" / "ore-station.yaml").read_text())
    weigher = ModbusRtuConfig.model_validate({**cfg["drivers"]["belt_weigher"], "port": "loop://"})
    (block,) = plan_blocks(weigher.slaves[0].points)
    assert build_request(1, block).hex().upper() == fx["weigher"]["request"]
    replies = {bytes.fromhex(fx[k]["request"]): bytes.fromhex(fx[k]["reply"]) for k in ("weigher", "belt")}
    for k in ("weigher", "belt"):
        reply = bytes.fromhex(fx[k]["reply"])
        assert crc16(reply[:-2]) == reply[-2:]
    with Endpoints(Replay(replies), use_pty=False) as urls:
        weigher = weigher.model_copy(update={"port": urls["socket"]})
        with ModbusRtu("belt_weigher", weigher) as d:
            r = d.read() or d.read()
        assert isinstance(r, Registers)
        for name, value in fx["weigher"]["values"].items():
            assert r.points[name].value == pytest.approx(value), name
        belt = ModbusRtuConfig(port=urls["socket"], slaves=[{"name": "belt", "id": 3, "points": [
            p for p in cfg["drivers"]["belt_portal"]["slaves"][0]["points"] if p["table"] == "discrete"]}])
        with ModbusRtu("belt_portal", belt) as d:
            r = d.read() or d.read()
        assert isinstance(r, Registers)
        assert {k: r.points[k].value for k in fx["belt"]["values"]} == fx["belt"]["values"]
    exc = bytes.fromhex(fx["exception"]["reply"])
    assert crc16(exc[:-2]) == exc[-2:] and exc[1] == 0x80 | fx["exception"]["function"]
    assert exc[2] == fx["exception"]["code"]
