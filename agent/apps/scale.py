"""Weighing unit: one record per settled weighing, and a summary per interval (not every frame).

A weighing is reported when the displayed weight has been free of motion for `settle_frames` frames,
differs from the last reported weighing by more than `deadband`, and is above `min_weight`.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from customs_edge.agent.apps.base import App, AppConfig
from customs_edge.core.records import Priority, Reading, RecordIn


class ScaleAppConfig(AppConfig):
    summary_interval_s: float = Field(10.0, gt=0, description="one 'weight_summary' record per interval")
    settle_frames: int = Field(5, ge=1, description="motion-free frames before a weighing counts")
    deadband: float = Field(0.05, ge=0, description="change needed to report a new weighing (scale units)")
    min_weight: float = Field(0.5, ge=0, description="below this the platform counts as empty")


class ScaleApp(App):
    Config = ScaleAppConfig
    REQUIRED_DRIVERS: ClassVar[dict[str, tuple[str, ...]]] = {"scale": ("toledo-continuous", "mt-sics")}
    config: ScaleAppConfig

    def __init__(self, device_id: str, config: ScaleAppConfig) -> None:
        super().__init__(device_id, config)
        self._still = 0
        self._last_reported: float | None = None
        self._window_start: float | None = None
        self._reset_window()

    def _reset_window(self) -> None:
        self._n = self._motion = self._oor = 0
        self._min = float("inf")
        self._max = float("-inf")
        self._sum = 0.0
        self._weighings = 0
        self._unit = ""

    def feed(self, reading: Reading) -> list[RecordIn]:
        if reading.kind != "weight":
            return []
        v = reading.values
        w, motion = float(v["weight"] or 0.0), bool(v["motion"])
        if self._window_start is None:
            self._window_start = reading.mono
        self._n += 1
        self._sum += w
        self._min, self._max = min(self._min, w), max(self._max, w)
        self._motion += motion
        self._oor += bool(v.get("out_of_range"))
        self._unit = str(v.get("unit", ""))
        out: list[RecordIn] = []
        self._still = 0 if motion else self._still + 1
        if self._still == self.config.settle_frames:
            if w < self.config.min_weight:
                self._last_reported = None
            elif self._last_reported is None or abs(w - self._last_reported) > self.config.deadband:
                self._last_reported = w
                self._weighings += 1
                out.append(RecordIn(type="weighing", priority=Priority.EVENT, ts=reading.ts,
                                    payload={"weight": w, "unit": self._unit, "net": v.get("net"),
                                             "tare": v.get("tare"), "source": reading.source}))
        return out

    def tick(self, now: float) -> list[RecordIn]:
        if self._window_start is None or now - self._window_start < self.config.summary_interval_s:
            return []
        rec = self._summary(now)
        self._window_start = now
        return [rec] if rec else []

    def _summary(self, now: float) -> RecordIn | None:
        if not self._n:
            return None
        rec = RecordIn(type="weight_summary", priority=Priority.TELEMETRY, payload={
            "frames": self._n, "mean": round(self._sum / self._n, 4), "min": self._min, "max": self._max,
            "motion_share": round(self._motion / self._n, 3), "out_of_range": self._oor,
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

        start = self._window_start
        return self.pack_state({
            "still": self._still, "last_reported": self._last_reported,
            "window_age_s": None if start is None else time.monotonic() - start,
            "frames": self._n, "motion": self._motion, "out_of_range": self._oor, "sum": self._sum,
            "min": self._min if self._n else None, "max": self._max if self._n else None,
            "weighings": self._weighings, "unit": self._unit})

    def restore(self, blob: bytes) -> None:
        import time

        s = self.unpack_state(blob)
        age, n = s["window_age_s"], int(s["frames"])
        last = None if s["last_reported"] is None else float(s["last_reported"])
        values = (int(s["still"]), last, None if age is None else time.monotonic() - float(age), n,
                  int(s["motion"]), int(s["out_of_range"]), float(s["sum"]),
                  float(s["min"]) if n else float("inf"), float(s["max"]) if n else float("-inf"),
                  int(s["weighings"]), str(s["unit"]))
        (self._still, self._last_reported, self._window_start, self._n, self._motion, self._oor, self._sum,
         self._min, self._max, self._weighings, self._unit) = values
