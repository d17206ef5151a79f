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


class RecordIn(BaseModel):
    """What an app hands to the outbox. The outbox adds identity: device_id, seq, boot_id.

    Checked where it is made: `ts` and every number anywhere in `payload` must be finite (NaN or
    infinity can be neither ordered, stored NOT NULL, nor encoded as JSON); a ValueError names the field."""

    model_config = ConfigDict(allow_inf_nan=False)

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


_PLAIN = (str, int, bool, type(None))


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
