"""Barcode scanner in serial mode: the driver on GS1 content published by GS1 and others (fixtures),
on line framing and noise, and on the simulator (written from the standards, never importing the
driver nor a GS1 library) with its ground truth."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from customs_edge.agent.registry import lookup
from customs_edge.core.readings import CodeScan, ReadingError
from customs_edge.drivers.scanner import BarcodeSerial, BarcodeSerialConfig, ScanLineParser, decode
from customs_edge.simulators.base import Endpoints
from customs_edge.simulators.scanner import ScannerSim, ScanTruth, ScanWorld, check_digit

EXAMPLES = json.loads((Path(__file__).parent / "fixtures" / "gs1" / "examples.json").read_text())


@pytest.mark.parametrize("example", EXAMPLES, ids=[e["source"][:40] for e in EXAMPLES])
def test_published_gs1_content(example: dict[str, Any]) -> None:
    scan = decode(example["line"], "scanner")
    want = example["expect"]
    assert scan.valid is want["valid"], scan.error
    assert scan.symbology == example["line"][:3] and scan.symbology_name == want["symbology_name"]
    assert scan.raw == example["line"]
    if not want["valid"]:
        assert scan.error and scan.gtin is None and not scan.ais
        return
    assert scan.gs1 and scan.error is None
    assert {k: getattr(scan, k) for k in ("gtin", "batch", "serial", "expiry")} == {
        k: want[k] for k in ("gtin", "batch", "serial", "expiry")}
    assert dict(scan.ais) == want["ais"]


def test_non_gs1_payloads_are_kept_as_text_with_their_symbology() -> None:
    url = decode("]Q1https://trace.example.cn/q/ZX-901?lot=20260918")
    assert url.valid and not url.gs1 and url.text == "https://trace.example.cn/q/ZX-901?lot=20260918"
    assert url.symbology_name == "QR_CODE"
    plain = decode("]C0ABC-123")  # Code 128 without FNC1: not GS1, even when it looks like AIs
    assert plain.valid and not plain.gs1 and plain.text == "ABC-123" and plain.symbology_name == "CODE_128"
    digits = decode("]Q10109501101530003")  # a plain QR holding digits is text, not a guessed GTIN
    assert digits.valid and not digits.gs1 and digits.gtin is None
    bare = decode("4006381333931")  # no AIM identifier configured on the scanner
    assert bare.valid and bare.symbology == "" and bare.symbology_name == "unknown" and bare.text == "4006381333931"
    assert decode("]d1溯源码 A1B2").text == "溯源码 A1B2"


@pytest.mark.parametrize(("line", "why"), [
    ("]C10109501101530004", "check digit"),  # GTIN 09501101530003 with its check digit changed
    ("]C1010950110153000317141304", "17"),  # month 13
    ("]d201095011AB530003", "01"),  # letters in a GTIN
    ("]C1", "no GS1 element strings"),
    ("]I114012345678902", "check digit"),
    ("],x123", "unknown AIM symbology identifier"),
    ("]", "unknown AIM symbology identifier"),
    ("]C", "unknown AIM symbology identifier"),
])
def test_damaged_reads_are_kept_flagged_with_the_reason(line: str, why: str) -> None:
    scan = decode(line, "scanner")
    assert not scan.valid and scan.error is not None and why in scan.error
    assert scan.gtin is None and not scan.ais and scan.raw == line


def test_lines_end_with_cr_or_crlf_and_noise_is_counted() -> None:
    p = ScanLineParser(max_line=64)
    p.feed(b"]E04006381333931\r]E04006381333931\r\n]Q1ab")
    assert [p.next(), p.next(), p.next()] == ["]E04006381333931", "]E04006381333931", None]
    p.feed(b"c\r")
    assert p.next() == "]Q1abc"  # a line completed in a later chunk
    p.feed(b"\xff\xfe\r" + b"x" * 100)
    assert p.next() is None
    p.feed(b"y" * 10 + b"\r]E04006381333931\r")
    assert p.next() == "]E04006381333931"  # the tail of the overlong line is dropped with it
    assert p.frames == 4 and p.corrupt == 2  # not UTF-8; longer than max_line without a line end


def test_config_and_registry() -> None:
    assert lookup("driver", "barcode-serial") is BarcodeSerial
    assert (CodeScan,) == BarcodeSerial.PRODUCES
    with pytest.raises(pydantic.ValidationError, match="unknown encoding"):
        BarcodeSerialConfig(port="/dev/ttyACM0", encoding="utf-9")


def test_readings_refuse_what_a_scan_cannot_be() -> None:
    with pytest.raises(ReadingError, match=r"CodeScan\.gtin: must be 14 digits with a valid check digit"):
        CodeScan(source="s", text="x", gs1=True, gtin="09501101530004")
    with pytest.raises(ReadingError, match=r"CodeScan\.error"):
        CodeScan(source="s", text="x", valid=False)
    with pytest.raises(ReadingError, match=r"CodeScan\.expiry"):
        CodeScan(source="s", text="x", gs1=True, expiry="2024-13-01")
    with pytest.raises(ReadingError, match=r"CodeScan\.symbology"):
        CodeScan(source="s", text="x", symbology="C1")
    scan = CodeScan(source="s", text="x", gs1=True, ais={"10": "L1"})
    with pytest.raises(TypeError):
        scan.ais["10"] = "L2"  # type: ignore[index]


def test_the_simulators_check_digits_are_gs1s_worked_examples() -> None:
    """simulators/scanner.py computes check digits itself (it may not use the driver nor biip)."""
    assert check_digit("629104150021") == "3"  # GS1's worked example
    assert check_digit("400638133393") == "1"  # the EAN-13 example of tests/fixtures/gs1
    assert check_digit("0950110153000") == "3"


def assert_matches(scan: CodeScan, t: ScanTruth) -> None:
    assert scan.raw == t.line
    assert scan.valid == (t.damage is None), (t, scan.error)
    if t.damage is not None:
        return
    assert scan.gtin == t.gtin and scan.batch == t.batch and scan.serial == t.serial
    assert scan.expiry == (t.expiry.isoformat() if t.expiry else None)
    assert scan.gs1 == (t.gtin is not None)
    if t.text is not None:
        assert scan.text == t.text


@pytest.mark.parametrize(("transport", "crlf"), [("pty", False), ("socket", True)])
def test_driver_on_the_simulator_reads_every_scan_as_the_ground_truth_says(transport: str, crlf: bool) -> None:
    world = ScanWorld(seed=21 if crlf else 22, damaged_rate=0.2)
    sim = ScannerSim(world, period_s=0.02, crlf=crlf)
    with Endpoints(sim, use_pty=transport == "pty", tcp_port=0 if transport == "socket" else None) as urls:
        drv = BarcodeSerial("scanner", BarcodeSerialConfig(port=urls[transport]))
        drv.open()
        try:
            got: list[CodeScan] = []
            deadline = time.monotonic() + 30
            world.damage_next("bad-date")  # one damaged read the test triggers for sure
            while len(got) < 60 and time.monotonic() < deadline:
                r = drv.read()
                if r is not None:
                    assert isinstance(r, CodeScan)
                    got.append(r)
        finally:
            drv.close()
    assert len(got) == 60
    truth = list(sim.truth)
    first = next(i for i, t in enumerate(truth) if t.line == got[0].raw)  # lines sent before the port opened
    for scan, t in zip(got, truth[first:], strict=False):
        assert_matches(scan, t)
    assert {t.kind for t in truth[first:first + 60]} >= {"gs1-128", "gs1-datamatrix", "ean-13", "digital-link", "url"}
    damaged = sum(t.damage is not None for t in truth[first:first + 60])
    assert damaged >= 2 and drv.stats.extra["invalid"] == damaged
    assert drv.stats.corrupt == 0
    bad_date = next(s for s, t in zip(got, truth[first:], strict=False) if t.damage == "bad-date")
    assert bad_date.error is not None and "(17)" in bad_date.error


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["", "]", "]C", "]C1", "]d2", "]Q1", "]Q3", "]E0", "]I1", "]e0", "]Y", "]Q1https://id.gs1.org/01/"]),
       st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=60))
def test_no_line_makes_the_driver_raise(prefix: str, rest: str) -> None:
    """What a scanner sends is a CodeScan, valid or flagged, whatever biip makes of it."""
    scan = decode(prefix + rest, "scanner")
    assert scan.raw == prefix + rest  # the line as it came, whatever it means
    assert scan.valid == (scan.error is None)
