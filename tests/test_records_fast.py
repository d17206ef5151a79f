"""RecordIn checks the common record itself and hands every other input to its pydantic schema: both paths
must accept, convert and refuse alike (core/records.py). Each input below is given to RecordIn and to the
schema alone; the results, or the errors word for word, must be the same."""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from customs_edge.core.records import Priority, RecordIn, _Schema

NAN, INF = math.nan, math.inf


class Lane(enum.StrEnum):
    A = "a"


INPUTS: list[dict[str, Any]] = [
    # the fast path's inputs
    {"type": "weighing", "priority": Priority.ALERT, "ts": 1.7e9, "payload": {"w": 1.5, "ok": True, "n": 3, "s": "x",
                                                                               "none": None}},
    {"type": "t", "priority": 2, "ts": 1.7e9},
    {"type": "t", "payload": {"a": [1, 2.5, None, "nan"], "b": {"c": np.float32(1.5)}, "d": np.arange(3)}},
    {"type": "t", "payload": {"rows": ({"t": 1.0}, {"t": 2.0})}},
    # refused: non-finite numbers, wherever they are
    {"type": "t", "ts": NAN},
    {"type": "t", "ts": INF},
    {"type": "t", "ts": -INF},
    {"type": "t", "payload": {"w": NAN}},
    {"type": "t", "payload": {"w": -INF}},
    {"type": "t", "payload": {"a": {"b": [1, 2.5, NAN]}}},
    {"type": "t", "payload": {"cps": np.float32("nan")}},
    {"type": "t", "payload": {"frame": np.array([[20.0, 21.0], [INF, 22.0]])}},
    {"type": "t", "payload": {"rows": ({"t": 1.0}, {"t": NAN})}},
    # refused: wrong types, a missing type
    {"type": 1},
    {"type": None},
    {},
    {"type": "t", "priority": 7},
    {"type": "t", "priority": -1},
    {"type": "t", "priority": 2.5},
    {"type": "t", "priority": "ALERT"},
    {"type": "t", "priority": None},
    {"type": "t", "ts": None},
    {"type": "t", "ts": "soon"},
    {"type": "t", "ts": "nan"},
    {"type": "t", "ts": 10 ** 400},
    {"type": "t", "payload": None},
    {"type": "t", "payload": [1]},
    {"type": "t", "payload": [("a", 1)]},
    {"type": "t", "payload": {1: 2}},
    {"type": "t", "payload": {("a",): 2}},
    # converted, as pydantic's lax mode does
    {"type": b"bytes", "ts": 5},
    {"type": Lane.A, "priority": True},
    {"type": "t", "priority": "2", "ts": "1.5"},
    {"type": "t", "priority": 2.0, "ts": np.float32(2.5)},
    {"type": "t", "priority": np.int64(3), "ts": np.int64(3)},
    {"type": "t", "ts": True},
    {"type": "t", "payload": OrderedDict(a=1)},
    {"type": "t", "payload": MappingProxyType({"a": 1})},
    {"type": "t", "payload": {Lane.A: 1, b"k": 2}},
    # an unknown field is ignored
    {"type": "t", "colour": "red"},
]


def outcome(make: Any, kw: dict[str, Any]) -> tuple[str, Any]:
    try:
        r = make(**kw)
    except ValidationError as exc:
        return "error", str(exc)
    fields = (r.type, type(r.type), r.priority, type(r.priority), type(r.ts), type(r.payload))
    given = kw.get("ts")
    return "ok", (fields, r.ts if given is not None else "now", list(r.payload))


@pytest.mark.parametrize("kw", INPUTS, ids=[repr(kw)[:60] for kw in INPUTS])
def test_the_fast_path_accepts_converts_and_refuses_as_the_schema_does(kw: dict[str, Any]) -> None:
    assert outcome(RecordIn, kw) == outcome(_Schema, kw)


def test_an_error_is_a_value_error_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"payload\n.*payload\.a\[1\] is not a finite number"):
        RecordIn(type="t", payload={"a": [1.0, NAN]})
    with pytest.raises(ValueError, match=r"ts\n.*finite number"):
        RecordIn(type="t", ts=NAN)
    with pytest.raises(ValueError, match=r"priority\n.*Input should be 0, 1, 2 or 3"):
        RecordIn(type="t", priority=4)
    with pytest.raises(ValueError, match=r"type\n.*valid string"):
        RecordIn(type=3)


def test_the_payload_is_copied_one_level_as_pydantic_did() -> None:
    inner = [1.0]
    mine = {"a": 1, "inner": inner}
    r = RecordIn(type="t", payload=mine)
    mine["a"] = 2  # the app reuses its dict: the record keeps what it was given
    assert r.payload == {"a": 1, "inner": [1.0]} and r.payload["inner"] is inner


def test_defaults_equality_and_the_unchecked_constructor() -> None:
    r = RecordIn(type="t")
    assert r.priority is Priority.EVENT and r.payload == {} and isinstance(r.ts, float) and r.ts > 1.5e9
    assert r == RecordIn(type="t", ts=r.ts) and r != RecordIn(type="u", ts=r.ts)
    assert repr(r) == f"RecordIn(type='t', priority=<Priority.EVENT: 1>, ts={r.ts!r}, payload={{}})"
    with pytest.raises(TypeError):
        hash(r)
    bad = RecordIn.model_construct(type="t", ts=NAN, priority=7)
    assert math.isnan(bad.ts) and bad.priority == 7 and bad.payload == {}
