"""External temperature reference (a blackbody in the thermal camera's field of view).

Constant-offset calibration: a region of every frame looks at a blackbody held at a known set-point;
offset = set-point - the region's measured temperature (the median of its hottest pixels), and the
whole frame is corrected by that offset, which cancels the camera's own slow drift. The offset applied
is the mean over the last `smooth_s` of valid frames (one frame's reading carries the pixel noise).

A frame is not used for measurement when its reference is
  missing   the region is not within `max_offset_c` of the set-point (blackbody off, moved, not warm);
  occluded  the region is not uniform (`max_sd_c`), or it jumped by more than `max_step_c` from the
            running offset, or it left the band within `occlusion_s` of a valid reading (a traveller
            walking in front of it);
  drift     the offset moved by more than `max_drift_c` across the last `window_s` (the mean of the
            window's last quarter against its first quarter, from one-second means): faster than a
            camera's own drift, so the blackbody itself is drifting. A drift slower than that cannot be
            told from the camera's from the image alone (docs/gate.md).
Such frames are still corrected with the last good offset and tracked (travellers are counted), but
a traveller measured only on them is screened `invalid` by the app.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

REASONS = ("missing", "occluded", "drift")


class ReferenceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rows: tuple[int, int] = Field(description="first and last+1 row of the blackbody's region in the frame")
    cols: tuple[int, int] = Field(description="first and last+1 column of the region")
    setpoint_c: float = Field(ge=20.0, le=45.0, description="the blackbody's set-point, °C (no default: state it)")
    max_offset_c: float = Field(3.0, gt=0, le=10.0,
                                description="|set-point - reading| beyond this: the reference is missing")
    max_sd_c: float = Field(0.3, gt=0, description="region spread (SD of its pixels) beyond this: occluded")
    max_step_c: float = Field(0.5, gt=0, description="a reading this far from the running offset: occluded")
    occlusion_s: float = Field(10.0, ge=0, description="out of band this soon after a valid reading: occluded")
    max_drift_c: float = Field(0.3, gt=0, description="offset change across window_s beyond this: drifting")
    window_s: float = Field(300.0, ge=8, description="rolling window of the stability and drift statistics")
    smooth_s: float = Field(2.0, gt=0, description="the applied offset is the mean over this span")
    hottest_share: float = Field(0.5, gt=0, le=1.0, description="share of the region's hottest pixels read")

    @model_validator(mode="after")
    def _box(self) -> ReferenceConfig:
        for name, (a, b) in (("rows", self.rows), ("cols", self.cols)):
            if not 0 <= a < b:
                raise ValueError(f"reference.{name} must be [first, last+1] with 0 <= first < last+1, got {[a, b]}")
        if (self.rows[1] - self.rows[0]) * (self.cols[1] - self.cols[0]) < 2:
            raise ValueError("reference region must hold at least 2 pixels (its spread tells occlusion)")
        return self


@dataclass(frozen=True, slots=True)
class RefReading:
    offset_c: float | None  # applied to the frame (None: no valid reading yet)
    reason: str  # "" when the frame's reference is valid, else one of REASONS


class Reference:
    def __init__(self, cfg: ReferenceConfig) -> None:
        self.cfg = cfg
        self._recent: deque[tuple[float, float]] = deque()  # (mono, raw offset) of in-band readings, smooth_s
        self._hist: deque[float] = deque()  # one-second means of those offsets over window_s
        self._bucket: list[float] = []  # the current second's offsets
        self._second: int | None = None
        self._last_valid: float | None = None  # mono of the last valid reading
        self.offset_c: float | None = None
        self.drift_c = 0.0
        self.sd_c: float | None = None  # stability: SD of the window's offsets
        self.counts = dict.fromkeys(("valid", *REASONS), 0)
        self.error: str | None = None  # a region the frames cannot hold

    def box(self, frame: np.ndarray) -> tuple[slice, slice] | None:
        (r0, r1), (c0, c1) = self.cfg.rows, self.cfg.cols
        if r1 > frame.shape[0] or c1 > frame.shape[1]:
            self.error = (f"reference region rows {[r0, r1]} cols {[c0, c1]} is outside the "
                          f"{frame.shape[0]}x{frame.shape[1]} frame: fix app.reference")
            return None
        return slice(r0, r1), slice(c0, c1)

    def read(self, frame: np.ndarray, mono: float) -> RefReading:
        c = self.cfg
        box = self.box(frame)
        if box is None:  # configured outside the frame: no reference in it (reported in the summary)
            self.counts["missing"] += 1
            return RefReading(self.offset_c, "missing")
        px = sorted(frame[box].reshape(-1).tolist())  # a handful of pixels: plain Python is the fastest
        n = len(px)
        k = max(1, round(c.hottest_share * n))
        measured = (px[n - 1 - (k - 1) // 2] + px[n - 1 - k // 2]) / 2  # the median of the k hottest
        mean = sum(px) / n
        sd = math.sqrt(sum((v - mean) ** 2 for v in px) / n)
        raw = c.setpoint_c - measured
        reason = ""
        recent = self._last_valid is not None and mono - self._last_valid <= c.occlusion_s
        if abs(raw) > c.max_offset_c:
            reason = "occluded" if recent else "missing"
        elif sd > c.max_sd_c or (self.offset_c is not None and recent
                                                   and abs(raw - self.offset_c) > c.max_step_c):
            reason = "occluded"
        else:
            self._add(mono, raw)
            if self.drift_c > c.max_drift_c:
                reason = "drift"
            else:
                self._last_valid = mono
                self.offset_c = sum(o for _, o in self._recent) / len(self._recent)
        self.counts[reason or "valid"] += 1
        return RefReading(self.offset_c, reason)

    def _add(self, mono: float, raw: float) -> None:
        r = self._recent
        r.append((mono, raw))
        while r[0][0] < mono - self.cfg.smooth_s:
            r.popleft()
        second = int(mono)
        if second != self._second and self._bucket:  # a second is complete: update the window statistics
            h = self._hist
            if self._second is not None and second - self._second > self.cfg.window_s:
                h.clear()  # a long gap (no valid reading): a new window
            h.append(sum(self._bucket) / len(self._bucket))
            while len(h) > self.cfg.window_s:
                h.popleft()
            offs = np.array(h)
            q = max(1, len(offs) // 4)
            self.drift_c = abs(float(offs[-q:].mean() - offs[:q].mean())) if len(offs) >= 8 else 0.0
            self.sd_c = float(offs.std())
            self._bucket = []
        self._second = second
        self._bucket.append(raw)

    def correct(self, frame: np.ndarray, mono: float) -> tuple[np.ndarray, RefReading]:
        """The frame corrected by the reference's offset, its region blanked to the scene's median (the
        blackbody is no traveller), and the reading."""
        r = self.read(frame, mono)
        out = frame + np.float32(r.offset_c or 0.0)
        box = self.box(frame)
        if box is not None:
            flat = out.reshape(-1)
            out[box] = np.partition(flat, flat.size // 2)[flat.size // 2]  # the scene's median, as the tracker's
        return out, r

    def summary(self) -> dict[str, object]:
        s: dict[str, object] = {"offset_c": None if self.offset_c is None else round(self.offset_c, 3),
             "drift_c": round(self.drift_c, 3), "sd_c": None if self.sd_c is None else round(self.sd_c, 3),
             **self.counts, "error": self.error}
        self.counts = dict.fromkeys(self.counts, 0)
        return s
