"""The values that cross module boundaries after the app: an app's RecordIn, a stored Record.
(What a driver hands the app is a typed reading: core/readings.py.)"""

from __future__ import annotations

import time
from enum import IntEnum
from typing import Any, NamedTuple

from pydantic import BaseModel, Field


class Priority(IntEnum):
    """Record priority. The outbox cap drops the oldest records of the lowest priority first
    and never drops ALERT records; sync sends higher priorities first when there is a backlog."""

    TELEMETRY = 0  # per-interval aggregates, status samples
    EVENT = 1  # measurements and domain events (a weighing, a screening)
    REPORT = 2  # summaries that close a period (lot report), driver faults
    ALERT = 3  # fever, radiation, hold decisions: never dropped


Scalar = float | int | str | bool | None


class RecordIn(BaseModel):
    """What an app hands to the outbox. The outbox adds identity: device_id, seq, boot_id."""

    type: str
    priority: Priority = Priority.EVENT
    ts: float = Field(default_factory=time.time)
    payload: dict[str, Any] = Field(default_factory=dict)


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
