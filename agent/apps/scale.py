"""Weighing unit: one record per settled weighing, and a summary per interval (not every frame).

A weighing is reported when the weight has been stable for `settle_frames` readings, differs from the
last reported weighing by more than `deadband`, and is above `min_weight` (agent/apps/settle.py).
The summary's mean, min and max cover in-range weights only: a reading without a weight (busy) or out
of range is counted (`no_weight`, `out_of_range`), never averaged as 0.
"""

from __future__ import annotations

from pydantic import Field

from customs_edge.agent.apps.base import App, AppConfig, Role
from customs_edge.agent.apps.settle import Settle
from customs_edge.core.readings import Reading, Weight
from customs_edge.core.records import Priority, RecordIn


class ScaleAppConfig(AppConfig):
    summary_interval_s: float = Field(10.0, gt=0, description="one 'weight_summary' record per interval")
    settle_frames: int = Field(5, ge=1, description="stable readings in a row before a weighing counts")
    deadband: float = Field(0.05, ge=0, description="change needed to report a new weighing (scale units); "
                            "stable readings within it of each other are one load")
    min_weight: float = Field(0.5, ge=0, description="below this the platform counts as empty")


class ScaleApp(App):
    Config = ScaleAppConfig
    CONSUMES = {"scale": Role(Weight)}
    config: ScaleAppConfig

    def __init__(self, device_id: str, config: ScaleAppConfig) -> None:
        super().__init__(device_id, config)
        self.settle = Settle(config.settle_frames, config.min_weight, config.deadband)
        self._window_start: float | None = None
        self._reset_window()

    def _reset_window(self) -> None:
        self._n = self._weights = self._motion = self._oor = self._none = 0
        self._min = float("inf")
        self._max = float("-inf")
        self._sum = 0.0
        self._weighings = 0
        self._unit = ""

    def feed(self, reading: Reading) -> list[RecordIn]:
        if not isinstance(reading, Weight):
            return []
        if self._window_start is None:
            self._window_start = reading.mono
        self._n += 1
        self._motion += not reading.stable
        w = reading.value
        if reading.overload or reading.underload:
            self._oor += 1
        elif w is None:
            self._none += 1
        else:
            self._weights += 1
            self._sum += w
            self._min, self._max = min(self._min, w), max(self._max, w)
            self._unit = reading.unit
        settled = self.settle.feed(reading)
        if settled is None:
            return []
        self._weighings += 1
        return [RecordIn(type="weighing", priority=Priority.EVENT, ts=settled.ts, payload={
            "weight": settled.value, "unit": settled.unit, "net": settled.net, "tare": settled.tare,
            "zeroed": not settled.not_zeroed, "source": settled.source})]

    def tick(self, now: float) -> list[RecordIn]:
        if self._window_start is None or now - self._window_start < self.config.summary_interval_s:
            return []
        rec = self._summary(now)
        self._window_start = now
        return [rec] if rec else []

    def _summary(self, now: float) -> RecordIn | None:
        if not self._n:
            return None
        k = self._weights
        rec = RecordIn(type="weight_summary", priority=Priority.TELEMETRY, payload={
            "frames": self._n, "mean": round(self._sum / k, 4) if k else None, "min": self._min if k else None,
            "max": self._max if k else None, "motion_share": round(self._motion / self._n, 3),
            "out_of_range": self._oor, "no_weight": self._none,
            "weighings": self._weighings, "unit": self._unit,
            "interval_s": round(now - (self._window_start or now), 2)})
        self._reset_window()
        return rec

    def close(self) -> list[RecordIn]:
        import time

        rec = self._summary(time.monotonic())
        return [rec] if rec else []

    # --- state that survives restarts (see App.snapshot) -----------------------------------------
    def snapshot(self) -> bytes | None:
        import time

        start, k = self._window_start, self._weights
        return self.pack_state({
            "settle": self.settle.state(), "window_age_s": None if start is None else time.monotonic() - start,
            "frames": self._n, "weights": k, "motion": self._motion, "out_of_range": self._oor,
            "no_weight": self._none, "sum": self._sum, "min": self._min if k else None,
            "max": self._max if k else None, "weighings": self._weighings, "unit": self._unit})

    def restore(self, blob: bytes) -> None:
        import time

        from customs_edge.agent.apps.base import StateMismatch

        s = self.unpack_state(blob)
        try:
            age, k = s["window_age_s"], int(s["weights"])
            values = (None if age is None else time.monotonic() - float(age), int(s["frames"]), k,
                      int(s["motion"]), int(s["out_of_range"]), int(s["no_weight"]), float(s["sum"]),
                      float(s["min"]) if k else float("inf"), float(s["max"]) if k else float("-inf"),
                      int(s["weighings"]), str(s["unit"]))
            self.settle.load(s["settle"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateMismatch(f"scale state: {exc!r}") from exc
        (self._window_start, self._n, self._weights, self._motion, self._oor, self._none, self._sum,
         self._min, self._max, self._weighings, self._unit) = values
