"""Register decoding: every byte/word order of 16-, 32- and 64-bit values, checked against layouts
from vendor manuals (tests/fixtures/modbus/word_orders.json names each source) and against pymodbus's
own encoder; scale, offset and a declared range per point; NaN, inf and out-of-range values flagged
on the Point and counted, never taken. End to end through pymodbus's TCP server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from pymodbus.client.mixin import ModbusClientMixin
from pymodbus.simulator import DataType as SimType
from pymodbus.simulator import SimData, SimDevice

from customs_edge.core.readings import Registers
from customs_edge.drivers.modbus import (
    ModbusRtuConfig,
    ModbusTcp,
    ModbusTcpConfig,
    PointConfig,
    decode_value,
    encode_value,
)
from tests.test_modbus_pymodbus_server import free_port
from tests.test_modbus_tcp import read_until, tcp_server

REPO = Path(__file__).resolve().parent.parent
FIX = json.loads((REPO / "tests" / "fixtures" / "modbus" / "word_orders.json").read_text())
CASES = [(c["type"], c["value"], order, [int(w, 16) for w in words])
         for c in FIX["cases"] for order, words in c["registers"].items()]
PYMODBUS = {t: getattr(ModbusClientMixin.DATATYPE, t.upper())
            for t in ("int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64")}


def same(dtype: str, a: float | int | bool, b: float | int) -> bool:
    return a == pytest.approx(b, rel=1e-7) if dtype == "float32" else a == b


@pytest.mark.parametrize(("dtype", "value", "order", "words"), CASES, ids=[f"{c[0]}-{c[2]}-{c[1]}" for c in CASES])
def test_the_decoder_reads_each_published_layout(dtype: Any, value: float | int, order: str, words: list[int]) -> None:
    assert same(dtype, decode_value(dtype, words, order), value)
    assert encode_value(dtype, value, order) == words
    assert PointConfig(name="x", address=0, type=dtype, word_order=order).word_order == order


def test_the_siemens_byte_numbers_are_the_layouts_named_here() -> None:
    """FST030 numbers bytes 3 (MSB) to 0 and lists them in the order sent: 3-2-1-0 is ABCD."""
    for numbers, name in FIX["siemens_fst030_options"].items():
        assert "".join(chr(ord("A") + 3 - int(n)) for n in numbers.split("-")) == name


def test_the_old_names_stay_what_they_were() -> None:
    """big / little (the configs' existing values) are ABCD / CDAB, ABCDEFGH / GHEFCDAB; on 16 bits, as is."""
    for c in FIX["cases"]:
        words = [[int(w, 16) for w in ws] for ws in c["registers"].values()]
        assert same(c["type"], decode_value(c["type"], words[0], "big"), c["value"])
        if len(words[0]) > 1:
            assert same(c["type"], decode_value(c["type"], words[1], "little"), c["value"])
        else:
            assert decode_value(c["type"], words[0], "little") == c["value"]


def swap_bytes(words: list[int]) -> list[int]:
    return [((w & 0xFF) << 8) | (w >> 8) for w in words]


def test_pymodbus_encoder_agrees_with_the_fixture() -> None:
    """pymodbus's convert_to_registers knows word order only (big, little); a byte-swapped layout is its
    registers with each register's two bytes exchanged."""
    for c in FIX["cases"]:
        layouts = list(c["registers"].values())
        regs = {o: [int(w, 16) for w in ws] for o, ws in c["registers"].items()}
        names = list(regs)
        kind = PYMODBUS[c["type"]]
        big = ModbusClientMixin.convert_to_registers(c["value"], kind, word_order="big")
        assert big == regs[names[0]], c
        if len(layouts[0]) > 1:
            little = ModbusClientMixin.convert_to_registers(c["value"], kind, word_order="little")
            assert little == regs[names[1]]
            assert swap_bytes(big) == regs[names[2]] and swap_bytes(little) == regs[names[3]]
        else:
            assert swap_bytes(big) == regs[names[1]]


WIDE = {"int32": (st.integers(-2**31, 2**31 - 1), ("ABCD", "CDAB", "BADC", "DCBA")),
        "uint32": (st.integers(0, 2**32 - 1), ("ABCD", "CDAB", "BADC", "DCBA")),
        "float32": (st.floats(width=32, allow_nan=False), ("ABCD", "CDAB", "BADC", "DCBA")),
        "int64": (st.integers(-2**63, 2**63 - 1), ("ABCDEFGH", "GHEFCDAB", "BADCFEHG", "HGFEDCBA")),
        "uint64": (st.integers(0, 2**64 - 1), ("ABCDEFGH", "GHEFCDAB", "BADCFEHG", "HGFEDCBA")),
        "float64": (st.floats(allow_nan=False), ("ABCDEFGH", "GHEFCDAB", "BADCFEHG", "HGFEDCBA"))}


@given(st.data())
def test_any_value_pymodbus_encodes_decodes_in_every_order(data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(sorted(WIDE)))
    values, (plain, words_swapped, bytes_swapped, reversed_) = WIDE[dtype]
    value = data.draw(values)
    big = ModbusClientMixin.convert_to_registers(value, PYMODBUS[dtype], word_order="big")
    little = ModbusClientMixin.convert_to_registers(value, PYMODBUS[dtype], word_order="little")
    for order, words in ((plain, big), (words_swapped, little), (bytes_swapped, swap_bytes(big)),
                         (reversed_, swap_bytes(little))):
        assert decode_value(dtype, words, order) == value  # type: ignore[arg-type]


@pytest.mark.parametrize(("point", "why"), [
    ({"type": "int16", "word_order": "ABCD"}, "use one of AB, BA, big, little"),
    ({"type": "float32", "word_order": "ACBD"}, "use one of ABCD, CDAB, BADC, DCBA, big, little"),
    ({"type": "float64", "word_order": "CDAB"}, "ABCDEFGH, GHEFCDAB, BADCFEHG, HGFEDCBA"),
    ({"type": "float32", "range": [10, 0]}, "min <= max"),
    ({"table": "coil", "type": "bool", "range": [0, 1]}, "a bool point has no range"),
])
def test_a_layout_or_range_that_cannot_be_is_refused_with_the_valid_ones(point: dict[str, Any], why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        PointConfig.model_validate({"name": "x", "address": 0, **point})


def test_the_shipped_ore_station_config_decodes_as_before() -> None:
    raw = yaml.safe_load((REPO / "configs" / "ore-station.yaml").read_text())
    cfg = ModbusRtuConfig.model_validate(raw["drivers"]["belt_weigher"])
    total = next(p for p in cfg.slaves[0].points if p.name == "total_t")
    assert (total.type, total.word_order, total.range) == ("uint32", "little", None)
    # the totaliser as the simulator writes it, low word first: 1234567 = 0x0012D687
    assert decode_value(total.type, [0xD687, 0x0012], total.word_order) == 1234567


# --- end to end: pymodbus's TCP server serves the published layouts and bad values ----------------------------
def served_words() -> tuple[list[int], list[dict[str, Any]], dict[str, float | int]]:
    words: list[int] = []
    points: list[dict[str, Any]] = []
    expect: dict[str, float | int] = {}
    for i, (dtype, value, order, regs) in enumerate(CASES):
        points.append({"name": f"p{i}", "address": len(words), "type": dtype, "word_order": order})
        expect[f"p{i}"] = value
        words += regs
    return words, points, expect


NAN32, INF32 = (0x7FC0, 0x0000), (0x7F80, 0x0000)  # IEEE 754 binary32: quiet NaN, +infinity


def test_every_layout_and_every_bad_value_through_a_tcp_server() -> None:
    words, points, expect = served_words()
    base = len(words)
    words += [*NAN32, *INF32, 1234, 5000, 0xFFFF]
    points += [
        {"name": "nan", "address": base, "type": "float32"},
        {"name": "inf", "address": base + 2, "type": "float32", "range": [0, 10]},
        {"name": "temp_c", "address": base + 4, "type": "int16", "scale": 0.1, "offset": -20, "range": [-40, 150]},
        {"name": "rate_tph", "address": base + 5, "scale": 1, "range": [0, 4000], "unit": "t/h"},
        {"name": "level", "address": base + 6, "type": "int16", "range": [-5, 100]},
    ]
    dev = SimDevice(1, simdata=([SimData(0, values=[False], datatype=SimType.BITS)],
                                [SimData(0, values=[False], datatype=SimType.BITS)],
                                [SimData(0, values=words, datatype=SimType.REGISTERS)],
                                [SimData(0, values=[0], datatype=SimType.UINT16)]))
    port = free_port()
    with tcp_server(port, [dev]):
        cfg = ModbusTcpConfig(host="127.0.0.1", port=port, read_timeout_s=2.0,
                              slaves=[{"name": "s", "id": 1, "points": points}])
        with ModbusTcp("line", cfg) as d:
            (r,) = read_until(d, 1)
    assert isinstance(r, Registers)
    for name, value in expect.items():
        assert same(cfg.slaves[0].points[int(name[1:])].type, r.points[name].value, value), name  # type: ignore[arg-type]
    assert r.number("temp_c") == pytest.approx(1234 * 0.1 - 20)
    for name, why in (("nan", "not finite"), ("inf", "not finite"), ("rate_tph", "out of range [0.0, 4000.0] (5000)")):
        assert r.number(name) is None and r.points[name].value is None
        assert why in (r.points[name].error or ""), (name, r.points[name])
    assert r.points["rate_tph"].unit == "t/h"
    assert r.number("level") == -1  # int16 0xFFFF, inside its range
    assert d.stats.extra["non_finite"] == 2 and d.stats.extra["out_of_range"] == 1
