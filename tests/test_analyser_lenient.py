"""The analyser result stream, read leniently where the format allows and strictly where it matters:
an extra element is kept (Assay.extra), an ISO 8601 time with an offset or fractional seconds is
converted to UTC, a lower-case CRC is accepted; a bad CRC, a time without a zone or a missing
required field still refuses the block (counted corrupt)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from customs_edge.core.readings import Assay, ReadingError
from customs_edge.drivers.analyser import AnalyserParser, AnalyserResult, AnalyserStatus

T0 = 1_700_000_040.0  # 2023-11-14T22:14:00Z


def block(result_line: str, assay_line: str = "$ASSAY,Fe=62.310,SiO2=4.120", crc_case: str = "X",
          channels: int = 64) -> bytes:
    """A block written by hand from docs/ore-station.md (not by the driver's encoder)."""
    lines = [result_line, assay_line, f"$SPEC,{channels},60.00,9.76563,0.000",
             "$CH,0," + ",".join(str(i) for i in range(channels))]
    body = "".join(f"{x}\r\n" for x in lines).encode()
    return body + f"$END,{zlib.crc32(body):08{crc_case}}\r\n".encode()


def parse(data: bytes) -> tuple[list[AnalyserResult | AnalyserStatus], AnalyserParser]:
    p = AnalyserParser()
    p.feed(data)
    out = []
    while (item := p.next()) is not None:
        out.append(item)
    return out, p


def only_result(data: bytes) -> AnalyserResult:
    got, p = parse(data)
    assert p.corrupt == 0 and len(got) == 1 and isinstance(got[0], AnalyserResult)
    return got[0]


def test_an_extra_element_is_kept_not_the_block_dropped() -> None:
    r = only_result(block("$RESULT,5,2023-11-14T22:14:00Z,60.0,66.25,OK",
                          "$ASSAY,Fe=62.310,SiO2=4.120,Mn=0.210,CaO=0.050"))
    a = r.reading("analyser").assay
    assert (a.fe, a.sio2, a.al2o3) == (62.31, 4.12, None)
    assert dict(a.extra) == {"Mn": 0.21, "CaO": 0.05}
    assert a.as_dict()["Mn"] == 0.21


@pytest.mark.parametrize("assay", [
    "$ASSAY,Fe=62.310,Fe=61.000",  # the same element twice
    "$ASSAY,Fe=62.310,Mn=nan",  # not a plain percentage
    "$ASSAY,Fe=62.310,=1.0",  # no element name
    "$ASSAY,Fe=62.310,M n=1.0",  # not an element or oxide name
])
def test_a_bad_extra_element_still_refuses_the_block(assay: str) -> None:
    got, p = parse(block("$RESULT,5,2023-11-14T22:14:00Z,60.0,66.25,OK", assay))
    assert got == [] and p.corrupt == 1


@pytest.mark.parametrize(("when", "ts"), [
    ("2023-11-15T06:14:00+08:00", T0),  # a local time with its offset
    ("2023-11-14T22:14:00.250Z", T0 + 0.25),  # fractional seconds
    ("2023-11-14T17:14:00.5-05:00", T0 + 0.5),
    ("2023-11-14T22:14:00+00:00", T0),
])
def test_iso8601_offsets_and_fractions_are_converted_to_utc(when: str, ts: float) -> None:
    r = only_result(block(f"$RESULT,5,{when},60.0,66.25,OK"))
    assert r.ts == pytest.approx(ts, abs=1e-6)
    got, p = parse(f"$STAT,{when},RUN,31.5\r\n".encode())
    assert p.corrupt == 0 and isinstance(got[0], AnalyserStatus) and got[0].ts == pytest.approx(ts, abs=1e-6)


@pytest.mark.parametrize("when", ["2023-11-14T22:14:00", "2023-11-14 22:14:00Z", "yesterday",
                                  "2023-11-14T22:14:00+25:00", "2023-11-14T22:14:00." + "5" * 40 + "Z"])
def test_a_time_without_a_zone_or_malformed_refuses_the_block(when: str) -> None:
    got, p = parse(block(f"$RESULT,5,{when},60.0,66.25,OK") + f"$STAT,{when},RUN,31.5\r\n".encode())
    assert got == [] and p.corrupt == 2


def test_lower_case_crc_is_accepted() -> None:
    data = block("$RESULT,5,2023-11-14T22:14:00Z,60.0,66.25,OK", crc_case="x")
    crc = data.rstrip().rsplit(b",", 1)[1]
    assert crc != crc.upper()  # this block's CRC has hex letters, written lower-case
    assert only_result(data).seq == 5


@pytest.mark.parametrize("crc_case", ["X", "x"])
def test_a_bad_crc_still_refuses_the_block(crc_case: str) -> None:
    good = block("$RESULT,5,2023-11-14T22:14:00Z,60.0,66.25,OK", crc_case=crc_case)
    bad = good.replace(b"62.310", b"62.311")  # one digit changed on the line, CRC kept
    got, p = parse(bad + good)
    assert p.corrupt == 1 and len(got) == 1 and got[0].seq == 5


@pytest.mark.parametrize("result_line", [
    "$RESULT,5,2023-11-14T22:14:00Z,60.0,OK",  # tonnes missing
    "$RESULT,5,,60.0,66.25,OK",  # time missing
    "$RESULT,2023-11-14T22:14:00Z,60.0,66.25,OK",  # seq missing
])
def test_a_missing_required_field_still_refuses_the_block(result_line: str) -> None:
    got, p = parse(block(result_line))
    assert got == [] and p.corrupt == 1


def test_assay_extra_is_validated_finite_and_frozen() -> None:
    a = Assay(fe=62.0, extra={"Mn": 0.2})
    assert a.as_dict() == {"fe": 62.0, "sio2": None, "al2o3": None, "p": None, "s": None, "h2o": None, "Mn": 0.2}
    with pytest.raises(TypeError):
        a.extra["Mn"] = 1.0  # type: ignore[index]
    for bad in ({"Mn": float("nan")}, {"Mn": float("inf")}, {"Mn": "0.2"}, {"fe": 1.0}, {"": 1.0}):
        with pytest.raises(ReadingError):
            Assay(extra=bad)  # type: ignore[arg-type]
    assert Assay().extra == {} and np.isfinite(Assay(extra={"Cu": 1}).extra["Cu"])
