"""Health-quarantine gate: one screening record per traveller, a fever alert at the highest priority.

Drivers: `thermal` (any driver that yields ThermalFrame: float32 HxW °C), and optionally `passage`
(entry/exit beams: Passage). Per frame the tracker finds people and their heads; when a traveller's
track ends, the ONNX model turns the track's measurement (hottest stable head area, skin, background,
apparent head size) into a core-temperature estimate, compensated for ambient and distance.

Records (raw frames never leave the device):
  screening    EVENT      estimate_c, confidence, decision ('fever' | 'normal'), threshold_c, frames ...
  fever_alert  ALERT      estimate_c, confidence, threshold_c (+ an optional small thumbnail, off by default)
  lane_summary TELEMETRY  per interval: screened, alerts, entries, exits, fragments, dead pixels ...
`confidence` is the probability, under the model's held-out residual spread, that the traveller's core
temperature lies on the side of the threshold the decision says.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from customs_edge.agent.apps.base import App, AppConfig, Role
from customs_edge.agent.apps.gate_tracker import FEATURES, FinishedTrack, Tracker, TrackerParams
from customs_edge.core.errors import DriverFault, ModelError
from customs_edge.core.readings import Passage, PassageHeartbeat, Reading, ThermalFrame
from customs_edge.core.records import Priority, RecordIn
from customs_edge.models.runtime import OnnxModel


class GateAppConfig(AppConfig):
    threshold_c: float = Field(37.3, ge=35.0, le=42.0, description="fever decision threshold (37.3, 37.5, 38.0 in use)")
    model: Path | None = Field(None, description="model manifest; default: the shipped models/fever/manifest.json")
    summary_interval_s: float = Field(60.0, gt=0, description="one 'lane_summary' record per interval")
    thumbnail_on_alert: bool = Field(False, description="attach a small thermal thumbnail to fever alerts")
    thumbnail_width_px: int = Field(16, ge=4, le=64, description="thumbnail width; height keeps the aspect")
    fg_delta_k: float = Field(2.0, gt=0, le=10, description="a person is this much warmer than the background")
    max_gap_frames: int = Field(3, ge=1, le=30, description="frames a traveller may go unseen before the track ends")
    min_frames: int = Field(2, ge=1, le=30, description="whole-head frames needed to screen a traveller")
    stale_after_s: float = Field(1.0, gt=0, description="no frame for this long: open tracks are closed")


@dataclass(frozen=True, slots=True)
class Screening:
    track: FinishedTrack
    estimate_c: float
    confidence: float
    fever: bool


def normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def load_fever_model(path: Path | None) -> OnnxModel:
    from customs_edge.models import default_manifest

    model = OnnxModel(path or default_manifest("fever"))
    spec = {t.name: t.shape for t in model.manifest.inputs}
    if spec.get("features") != [None, len(FEATURES)]:
        raise ModelError(f"{model.manifest.name}: expected input 'features' [None, {len(FEATURES)}], got {spec}")
    return model


class GateApp(App):
    Config = GateAppConfig
    CONSUMES = {"thermal": Role(ThermalFrame), "passage": Role(Passage, PassageHeartbeat, optional=True)}
    config: GateAppConfig

    def __init__(self, device_id: str, config: GateAppConfig, model: OnnxModel | None = None) -> None:
        super().__init__(device_id, config)
        self.model = model or load_fever_model(config.model)
        sd = self.model.manifest.metrics.get("residual_sd_c", 0.25)
        if not isinstance(sd, int | float) or not math.isfinite(sd) or sd <= 0:
            raise ModelError(f"{self.model.manifest.name}: metrics.residual_sd_c must be a positive number, got {sd!r}")
        self.sigma_c = float(sd)
        self.tracker = Tracker(TrackerParams(fg_delta_k=config.fg_delta_k, max_gap=config.max_gap_frames,
                                             min_frames=config.min_frames),
                               keep_frames=config.thumbnail_on_alert)
        self._last_frame_mono: float | None = None
        self._window_start: float | None = None
        self.totals = {"screened": 0, "alerts": 0, "entries": 0, "exits": 0}
        self._reset_window()

    def _reset_window(self) -> None:
        self._w = {"frames": 0, "screened": 0, "alerts": 0, "entries": 0, "exits": 0, "passage_lost": 0,
                   "bad_frames": 0}
        self._w_estimates: list[float] = []
        self._w_dead = 0
        self._w_ambient: float | None = None
        self._frag0, self._fix0 = self.tracker.fragments, self.tracker.fixtures

    # --- the screening pipeline (also run directly by models/fever.py on simulated frames) ------------
    def process_frame(self, frame: np.ndarray, mono: float, ts: float) -> list[Screening]:
        return self.screen(self.tracker.process(frame, mono, ts))

    def screen(self, tracks: list[FinishedTrack]) -> list[Screening]:
        if not tracks:
            return []
        x = np.array([t.features for t in tracks], dtype=np.float32)
        est = self.model.predict({"features": x})["core_c"].reshape(-1)
        out = []
        thr = self.config.threshold_c
        k = self.tracker.p.top_k
        for t, e in zip(tracks, est.tolist(), strict=True):
            sigma = self.sigma_c * math.sqrt(k / min(k, t.good_frames))  # fewer frames, less sure
            fever = e >= thr
            out.append(Screening(t, e, normal_cdf(abs(e - thr) / sigma), fever))
        return out

    # --- the App interface ------------------------------------------------------------------
    def feed(self, reading: Reading) -> list[RecordIn]:
        if self._window_start is None:
            self._window_start = reading.mono
        if isinstance(reading, ThermalFrame):
            frame = reading.pixels
            if min(frame.shape) < 4:  # too small to hold a traveller's head: not this app's camera
                self._w["bad_frames"] += 1
                return []
            self._last_frame_mono = reading.mono
            self._w["frames"] += 1
            self._w_dead = max(self._w_dead, reading.dead_pixels)
            if reading.ambient_c is not None:
                self._w_ambient = reading.ambient_c
            return self._records(self.process_frame(frame, reading.mono, reading.ts), reading.source)
        if isinstance(reading, Passage):
            n = 1 + reading.lost
            key = "entries" if reading.event == "entry" else "exits"
            self._w[key] += n
            self.totals[key] += n
            self._w["passage_lost"] += reading.lost
        return []

    def _records(self, screenings: list[Screening], source: str) -> list[RecordIn]:
        out: list[RecordIn] = []
        thr = self.config.threshold_c
        for s in screenings:
            t = s.track
            est, conf = round(s.estimate_c, 2), round(s.confidence, 3)
            self._w["screened"] += 1
            self.totals["screened"] += 1
            self._w_estimates.append(s.estimate_c)
            out.append(RecordIn(type="screening", priority=Priority.EVENT, ts=t.best_ts, payload={
                "traveller": t.id, "estimate_c": est, "confidence": conf,
                "decision": "fever" if s.fever else "normal", "threshold_c": thr,
                "frames": t.frames, "measured_frames": t.good_frames,
                "head_max_c": round(t.features[0], 2), "background_c": round(t.features[3], 2),
                "head_px": round(t.features[4]), "direction": "ltr" if t.direction > 0 else "rtl",
                "hot_object": t.hot_object, "model": self.model.manifest.version, "source": source}))
            if s.fever:
                self._w["alerts"] += 1
                self.totals["alerts"] += 1
                payload: dict[str, object] = {"traveller": t.id, "estimate_c": est, "confidence": conf,
                                              "threshold_c": thr, "source": source}
                if self.config.thumbnail_on_alert and t.thumbnail is not None:
                    payload["thumbnail"] = thumbnail(t.thumbnail, self.config.thumbnail_width_px)
                out.append(RecordIn(type="fever_alert", priority=Priority.ALERT, ts=t.best_ts, payload=payload))
        return out

    def tick(self, now: float) -> list[RecordIn]:
        out: list[RecordIn] = []
        if self._last_frame_mono is not None and now - self._last_frame_mono > self.config.stale_after_s \
                and self.tracker.tracks:
            out += self._records(self.screen(self.tracker.flush()), "thermal")
        if self._window_start is not None and now - self._window_start >= self.config.summary_interval_s:
            out.append(self._summary(now))
            self._window_start = now
        return out

    def _summary(self, now: float) -> RecordIn:
        est = self._w_estimates
        rec = RecordIn(type="lane_summary", priority=Priority.TELEMETRY, payload={
            **self._w, "interval_s": round(now - (self._window_start or now), 2),
            "fragments": self.tracker.fragments - self._frag0, "fixtures": self.tracker.fixtures - self._fix0,
            "mean_estimate_c": round(float(np.mean(est)), 2) if est else None,
            "max_estimate_c": round(float(np.max(est)), 2) if est else None,
            "dead_pixels": self._w_dead, "sensor_ambient_c": self._w_ambient,
            "threshold_c": self.config.threshold_c, "totals": dict(self.totals)})
        self._reset_window()
        return rec

    def on_fault(self, role: str, fault: DriverFault) -> list[RecordIn]:
        out = super().on_fault(role, fault)
        if role == "thermal" and self.tracker.tracks:
            out += self._records(self.screen(self.tracker.flush()), role)
        return out

    def close(self) -> list[RecordIn]:
        out = self._records(self.screen(self.tracker.flush()), "thermal")
        if self._window_start is not None:
            out.append(self._summary(time.monotonic()))
        return out

    # --- state that survives restarts (see App.snapshot); tracks in flight are dropped ---------------
    def snapshot(self) -> bytes | None:
        start = self._window_start
        return self.pack_state({
            "totals": self.totals, "window": self._w, "estimates": self._w_estimates, "dead_pixels": self._w_dead,
            "ambient_c": self._w_ambient, "fragments": self.tracker.fragments - self._frag0,
            "fixtures": self.tracker.fixtures - self._fix0,
            "window_age_s": None if start is None else time.monotonic() - start})

    def restore(self, blob: bytes) -> None:
        s = self.unpack_state(blob)
        totals = {k: int(s["totals"].get(k, 0)) for k in self.totals}
        window = {k: int(s["window"].get(k, 0)) for k in self._w}
        estimates = [float(x) for x in s["estimates"]]
        age, ambient = s["window_age_s"], s["ambient_c"]
        values = (totals, window, estimates, int(s["dead_pixels"]), None if ambient is None else float(ambient),
                  self.tracker.fragments - int(s["fragments"]), self.tracker.fixtures - int(s["fixtures"]),
                  None if age is None else time.monotonic() - float(age))
        (self.totals, self._w, self._w_estimates, self._w_dead, self._w_ambient, self._frag0, self._fix0,
         self._window_start) = values


def thumbnail(frame: np.ndarray, width: int) -> dict[str, object]:
    """A small thermal image: `width` columns, °C x 10 as integers, row-major."""
    import cv2

    h, w = frame.shape
    height = max(1, round(width * h / w))
    small = cv2.resize(frame.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
    return {"w": width, "h": height, "scale": 0.1, "data": np.rint(small * 10).astype(int).reshape(-1).tolist()}
