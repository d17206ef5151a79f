"""The values that cross module boundaries after the app: an app's RecordIn, a stored Record.
(What a driver hands the app is a typed reading: core/readings.py.)"""

from __future__ import annotations

import math
import time
from enum import IntEnum
from typing import Any, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator


class Priority(IntEnum):
    """Record priority. The outbox cap drops the oldest records of the lowest priority first
    and never drops ALERT records; sync sends higher priorities first when there is a backlog."""

    TELEMETRY = 0  # per-interval aggregates, status samples
    EVENT = 1  # measurements and domain events (a weighing, a screening)
    REPORT = 2  # summaries that close a period (lot report), driver faults
    ALERT = 3  # fever, radiation, hold decisions: never dropped


Scalar = float | int | str | bool | None


class _Schema(BaseModel):
    """RecordIn's rules as a pydantic model: what RecordIn() runs for any input its fast path does not take
    as is (another type to convert, a non-finite number, a missing field), so that it accepts, converts and
    refuses exactly as this model does, with pydantic's ValidationError (a ValueError) naming the field."""

    model_config = ConfigDict(allow_inf_nan=False, title="RecordIn")

    type: str
    priority: Priority = Priority.EVENT
    ts: float = Field(default_factory=time.time)
    payload: dict[str, Any] = Field(default_factory=dict)

    @field_validator("payload")
    @classmethod
    def _finite_payload(cls, payload: dict[str, Any]) -> dict[str, Any]:
        where = _non_finite(payload, "payload")
        if where is not None:
            raise ValueError(f"{where} is not a finite number: records carry finite numbers only"
                             " (use None for a missing value)")
        return payload


_UNSET: Any = object()  # an argument not given
_PRIORITY = {int(p): p for p in Priority}


class RecordIn:
    """What an app hands to the outbox. The outbox adds identity: device_id, seq, boot_id.

    Checked where it is made: `ts` and every number anywhere in `payload` must be finite (NaN or
    infinity can be neither ordered, stored NOT NULL, nor encoded as JSON); a ValueError names the field.

    Made once per record on the hot path: the common input (a str type, a Priority or an int 0-3, a finite
    float ts, a dict payload with str keys and finite numbers) is checked here in a few steps; any other is
    validated by `_Schema` (pydantic), which converts or refuses it exactly as RecordIn always did. The payload
    dict is copied (one level, as pydantic's dict[str, Any] does): an app that reuses its dict changes no record.
    tests/test_records_fast.py holds the two paths to the same results."""

    __slots__ = ("payload", "priority", "ts", "type")

    type: str
    priority: Priority
    ts: float
    payload: dict[str, Any]

    def __init__(self, *, type: str = _UNSET, priority: Priority | int = _UNSET,
                 ts: float = _UNSET, payload: dict[str, Any] = _UNSET, **extra: Any) -> None:
        prio = Priority.EVENT if priority is _UNSET else priority if priority.__class__ is Priority else \
            _PRIORITY.get(priority) if priority.__class__ is int else None
        if (type.__class__ is str and prio is not None and not extra
                and (ts is _UNSET or (ts.__class__ is float and not ts - ts))  # x - x: NaN unless x is finite
                and (payload is _UNSET or (payload.__class__ is dict and _plain_payload(payload)))):
            self.type, self.priority = type, prio
            self.ts = time.time() if ts is _UNSET else ts
            self.payload = {} if payload is _UNSET else payload.copy()
            return
        given = {k: v for k, v in (("type", type), ("priority", priority), ("ts", ts), ("payload", payload))
                 if v is not _UNSET}
        m = _Schema(**given, **extra)
        self.type, self.priority, self.ts, self.payload = m.type, m.priority, m.ts, m.payload

    @classmethod
    def model_construct(cls, **fields: Any) -> RecordIn:
        """A RecordIn of these fields as given, unchecked (the defaults for those left out): tests use it for
        a record as a buggy app could hand one over."""
        r = object.__new__(cls)
        r.type = fields.get("type", "")
        r.priority = fields.get("priority", Priority.EVENT)
        r.ts = fields["ts"] if "ts" in fields else time.time()
        r.payload = fields.get("payload", {})
        return r

    def model_dump(self) -> dict[str, Any]:
        return {"type": self.type, "priority": self.priority, "ts": self.ts, "payload": self.payload}

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, RecordIn)
        return (self.type, self.priority, self.ts, self.payload) == (other.type, other.priority, other.ts,
                                                                     other.payload)

    __hash__ = None  # type: ignore[assignment]  # mutable, like the pydantic model it replaces

    def __str__(self) -> str:
        return f"type={self.type!r} priority={self.priority!r} ts={self.ts!r} payload={self.payload!r}"

    def __repr__(self) -> str:
        return f"RecordIn(type={self.type!r}, priority={self.priority!r}, ts={self.ts!r}, payload={self.payload!r})"


def _plain_payload(payload: dict[Any, Any]) -> bool:
    """True if every key is a str and every number in it finite: the fast path's payload. False sends the
    record through _Schema, which converts the keys or names the first bad number."""
    for k, v in payload.items():
        if k.__class__ is not str:
            return False
        kind = v.__class__
        if kind is float:
            if v - v:  # NaN for NaN and the infinities, 0.0 for every finite float
                return False
        elif kind not in _PLAIN_KINDS and _non_finite(v, "") is not None:
            return False
    return True


_PLAIN = (str, int, bool, type(None))
_PLAIN_KINDS = frozenset(_PLAIN)


def _non_finite(value: Any, path: str) -> str | None:
    """The path of the first NaN or infinity inside value (dicts, lists, tuples, numpy), or None."""
    if isinstance(value, dict):
        items: Any = value.items()
        step = "{}.{}"
    elif isinstance(value, list | tuple):
        items = enumerate(value)
        step = "{}[{}]"
    elif isinstance(value, float | np.floating):
        return None if math.isfinite(value) else path
    elif isinstance(value, np.ndarray) and value.dtype.kind in "fc" and not np.isfinite(value).all():
        return f"{path}[{np.flatnonzero(~np.isfinite(value))[0]}]"
    else:
        return None
    for k, v in items:
        kind = type(v)
        if kind is float:  # the common case, checked inline
            if not math.isfinite(v):
                return step.format(path, k)
        elif kind not in _PLAIN and (where := _non_finite(v, step.format(path, k))) is not None:
            return where
    return None


class Record(BaseModel):
    """A stored record: stable identity (device_id, seq), seq monotonic per device across restarts."""

    device_id: str
    seq: int
    ts: float
    boot_id: str
    mono: float
    type: str
    priority: Priority
    payload: dict[str, Any]


class Pending(NamedTuple):
    """A committed record as the outbox hands it to sync: the payload is JSON text, sent as-is."""

    seq: int
    ts: float
    boot_id: str
    mono: float
    type: str
    priority: int
    payload: str  # JSON text, stored as-is and sent as-is
    prev: str | None = None  # the chain hash of the device's previous record (core/signing.py); None: unchained
