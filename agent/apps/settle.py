"""Settled weighings from a stream of Weight readings: one implementation for every app that weighs.

A weighing is reported once per load: when `readings` stable readings in a row agree (same unit, each
within `deadband` of the run's first), if the weight is at least `min_weight` and differs from the last
reported weighing by more than `deadband`. A weight below `min_weight` at the settle point means the
platform was emptied: the next load is reported even when it weighs the same as the last one.

What breaks a stable run (the count starts again):
  - a reading with motion (`stable` false);
  - a reading without a weight (MT-SICS 'I': busy, or no stable value in time): the instrument could
    not say the load is still, so it is not taken as still, and never as 0;
  - overload or underload: outside the weighing range there is no weight to report, and it never
    counts as one (nor as 0 in an average: see Weight.in_range);
  - a stable weight that moved by more than `deadband` from the run's first: a new load, even with no
    motion reading in between (MT-SICS `S` only ever replies with stable weights, and a load placed
    between two polls shows no motion at all): the run starts again from it;
  - a change of unit (the indicator was switched): the deadband compares like with like, so the last
    weighing is forgotten too.
A power-up zero not captured (`not_zeroed`) does not stop a weighing; the apps pass the flag on.
"""

from __future__ import annotations

from typing import Any

from customs_edge.core.readings import Weight


class Settle:
    def __init__(self, readings: int, min_weight: float, deadband: float) -> None:
        if readings < 1:
            raise ValueError("readings must be >= 1")
        self.readings, self.min_weight, self.deadband = readings, min_weight, deadband
        self.run = 0  # stable readings in a row, each within the deadband of the run's first
        self.first = 0.0  # the run's first weight
        self.last: float | None = None  # the last reported weighing
        self.unit: str | None = None

    def state(self) -> dict[str, Any]:
        """What an app's snapshot keeps of the settle run (see App.snapshot)."""
        return {"run": self.run, "first": self.first, "last": self.last, "unit": self.unit}

    def load(self, s: dict[str, Any]) -> None:
        """Resume from state(); a KeyError or ValueError leaves the run as it was."""
        run, first = int(s["run"]), float(s["first"])
        last = None if s["last"] is None else float(s["last"])
        unit = None if s["unit"] is None else str(s["unit"])
        self.run, self.first, self.last, self.unit = run, first, last, unit

    def feed(self, w: Weight) -> Weight | None:
        """The reading that completes a new settled weighing, else None."""
        if w.value is None or not w.stable or w.overload or w.underload:
            self.run = 0
            return None
        if w.unit != self.unit:
            self.unit, self.last, self.run = w.unit, None, 0
        if not self.run or abs(w.value - self.first) > self.deadband:
            self.first, self.run = w.value, 0
        self.run += 1
        if self.run != self.readings:
            return None
        if w.value < self.min_weight:
            self.last = None
            return None
        if self.last is not None and abs(w.value - self.last) <= self.deadband:
            return None
        self.last = w.value
        return w
