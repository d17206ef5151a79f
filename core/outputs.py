"""Outputs: what an app asks a driver to set (a stack light, a buzzer), and what the driver reports back.

An app hands `SetOutputs` for one of its output roles to the runtime (App.take_outputs); the runtime
gives it to that role's driver, which must implement `Output`. The driver sets the outputs, reads them
back, and yields `OutputsSet` into the app's feed like any reading. A write that fails, or reads back
other than written, raises DriverFault: the app's on_fault hears of it and knows the outputs are not
set. Outputs are states, not events: when several commands wait, the driver sets the newest and counts
the ones it skipped (`superseded`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

from customs_edge.core.readings import Reading


@dataclass(frozen=True, slots=True, kw_only=True)
class SetOutputs:
    """Set each named output on (True) or off. `ref`: what it is for (e.g. the traveller), echoed back."""

    values: Mapping[str, bool]
    ref: str = ""
    issued_mono: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputsSet(Reading):
    """The outputs are set and read back as `values` (the command's `ref`, when it was issued and when the
    read-back confirmed it; `superseded`: older commands skipped for this one)."""

    KIND: ClassVar[str] = "outputs_set"
    values: Mapping[str, bool]
    ref: str = ""
    issued_mono: float = 0.0
    superseded: int = 0

    @property
    def latency_s(self) -> float:
        """From the command's issue to the confirmed read-back."""
        return self.mono - self.issued_mono


@runtime_checkable
class Output(Protocol):
    """A driver that sets outputs. `submit` is called from the app's thread and must not block; the
    driver's own thread does the write. `outputs`: the names it can set."""

    @property
    def outputs(self) -> tuple[str, ...]: ...

    def submit(self, command: SetOutputs) -> None: ...
