"""Health-quarantine gate: one screening record per traveller, a fever alert at the highest priority.

Drivers: `thermal` (any driver that yields ThermalFrame: float32 HxW °C), and optionally `passage`
(entry/exit beams: Passage). Per frame the tracker finds people and their heads; when a traveller's
track ends, the ONNX model turns the track's measurement (hottest stable head area, skin, background,
apparent head size) into a core-temperature estimate, compensated for ambient and distance.

Records (raw frames never leave the device):
  screening    EVENT      estimate_c, confidence, decision ('fever' | 'normal'), threshold_c, frames ...
  fever_alert  ALERT      estimate_c, confidence, threshold_c (+ an optional small thumbnail, off by default)
  lane_summary TELEMETRY  per interval: screened, alerts, entries, exits, fragments, dead pixels, reference ...
`confidence` is the probability, under the model's held-out residual spread, that the traveller's core
temperature lies on the side of the threshold the decision says.

With `reference` configured, every frame is corrected by a blackbody's offset (gate_reference.py).
Every screening carries `tags`, the reasons its measurement is not valid (reference missing, occluded or
drifting; warm-up; too near or too far; more than one face in view; ambient out of range) and `valid`;
a fever alert from an invalid screening still alerts, with `rescreen: true`.

Lane signals (`signal` configured, and an output driver in the `signal` role, e.g. modbus-relay): per
screening the stack light shows red (fever; the buzzer sounds for `buzzer_s`), amber (re-screen: the
measurement is not valid, or the decision is less sure than `rescreen_below_confidence`) or green. The
driver's read-back (OutputsSet) confirms it; a signal the driver could not set is reported in a
`signal_missed` record (ALERT for a red one) beside the driver's `driver_fault`.

Confirmation: a fever alert asks for a clinical thermometer. The officer's reading arrives as the command
`confirm` (args: screening, measured_c, by; optional at) and becomes a `fever_confirmation` record paired
with the screening by its `screening` id.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from customs_edge.agent.apps.base import App, AppConfig, Role
from customs_edge.agent.apps.gate_reference import Reference, ReferenceConfig
from customs_edge.agent.apps.gate_tracker import FEATURES, FinishedTrack, Tracker, TrackerParams
from customs_edge.core.errors import ConfigError, DriverFault, ModelError
from customs_edge.core.outputs import OutputsSet, SetOutputs
from customs_edge.core.readings import Ambient, Passage, PassageHeartbeat, Reading, ThermalFrame
from customs_edge.core.records import Priority, RecordIn
from customs_edge.models.runtime import OnnxModel


class SignalConfig(BaseModel):
    """The lane's stack light and buzzer, set per screening through the output driver in role `signal`."""

    model_config = ConfigDict(extra="forbid")
    rescreen_below_confidence: float = Field(0.8, ge=0.5, le=1.0, description=(
        "a valid screening whose decision is less sure than this shows amber (re-screen)"))
    buzzer_s: float = Field(2.0, ge=0, le=60, description="the buzzer sounds this long for a red signal")
    late_after_s: float = Field(0.3, gt=0, description="a signal confirmed later than this after the decision "
                                                       "is counted in `signal_late`")


class Confirm(BaseModel):
    """The `confirm` command's args: the officer's clinical-thermometer reading for a fever alert."""

    model_config = ConfigDict(extra="forbid")
    screening: str = Field(min_length=1, description="the `screening` id of the fever alert")
    measured_c: float = Field(ge=30.0, le=45.0, description="the clinical thermometer's reading, °C")
    by: str = Field(min_length=1, max_length=64, description="the officer")
    at: float | None = Field(None, description="when it was measured (unix seconds); default: now")


class GateAppConfig(AppConfig):
    threshold_c: float = Field(37.3, ge=35.0, le=42.0, description="fever decision threshold (37.3, 37.5, 38.0 in use)")
    model: Path | None = Field(None, description="model manifest; default: the shipped models/fever/manifest.json",
                               json_schema_extra={"shipped_model": "fever"})
    summary_interval_s: float = Field(60.0, gt=0, description="one 'lane_summary' record per interval")
    thumbnail_on_alert: bool = Field(False, description="attach a small thermal thumbnail to fever alerts")
    thumbnail_width_px: int = Field(16, ge=4, le=64, description="thumbnail width; height keeps the aspect")
    fg_delta_k: float = Field(2.0, gt=0, le=10, description="a person is this much warmer than the background")
    max_gap_frames: int = Field(3, ge=1, le=30, description="frames a traveller may go unseen before the track ends")
    min_frames: int = Field(2, ge=1, le=30, description="whole-head frames needed to screen a traveller")
    stale_after_s: float = Field(1.0, gt=0, description="no frame for this long: open tracks are closed")
    reference: ReferenceConfig | None = Field(None, description="blackbody in view: region, set-point, limits")
    warmup_s: float = Field(1800.0, ge=0, description="screenings this soon after the first frame: 'warm_up'")
    hfov_deg: float | None = Field(None, gt=0, lt=180, description=(
        "the camera's horizontal field of view; default: the model's optics (a different one is refused)"))
    frame_size: tuple[int, int] | None = Field(None, description=(
        "width, height of the thermal driver's frames: checked against the model's optics at start "
        "(frames of another size are refused whether or not it is set)"))
    head_size_m: float = Field(0.154, gt=0, le=0.3,
                               description="distance estimate: sqrt of a head's warm skin area, metres")
    head_blur_px: float = Field(0.63, ge=0, le=3, description="distance estimate: optics' blur, pixels")
    min_distance_m: float = Field(0.8, gt=0, description="a head nearer than this: 'too_near'")
    max_distance_m: float = Field(1.8, gt=0, description="a head farther than this: 'too_far'")
    ambient_min_c: float = Field(18.0, description="air below this: 'ambient_low' (ISO/TR 13154: 18-24 °C)")
    ambient_max_c: float = Field(24.0, description="air above this: 'ambient_high'")
    sensor_ambient_offset_k: float = Field(3.5, description=(
        "the sensor's ambient (die) reading minus the air: used only without an environment sensor"))
    humidity_min_pct: float = Field(10.0, ge=0, le=100, description="RH below this: 'humidity_low' (ISO/TR 13154)")
    humidity_max_pct: float = Field(75.0, ge=0, le=100, description="RH above this: 'humidity_high' (ISO/TR 13154)")
    environment_stale_s: float = Field(120.0, gt=0, description=(
        "the environment sensor's last reading is older than this: 'environment_stale'"))
    signal: SignalConfig | None = Field(None, description=(
        "stack light and buzzer on an output driver in role `signal` (modbus-relay: coils green, amber, red, buzzer)"))
    confirm_fever_c: float = Field(38.0, ge=37.0, le=40.0, description=(
        "a clinical reading at or above this confirms the fever (38.0 °C: the usual clinical definition)"))


@dataclass(frozen=True, slots=True)
class Screening:
    track: FinishedTrack
    estimate_c: float
    confidence: float
    fever: bool
    tags: tuple[str, ...] = ()  # why the measurement is not valid; empty: valid
    distance_m: float | None = None
    ambient_c: float | None = None  # air, from the sensor's ambient reading

    @property
    def valid(self) -> bool:
        return not self.tags


def normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def load_fever_model(path: Path | None) -> OnnxModel:
    from customs_edge.models import default_manifest

    model = OnnxModel(path or default_manifest("fever"))
    spec = {t.name: t.shape for t in model.manifest.inputs}
    if spec.get("features") != [None, len(FEATURES)]:
        raise ModelError(f"{model.manifest.name}: expected input 'features' [None, {len(FEATURES)}], got {spec}")
    return model


OPTICS_MODELS = "models/fever (MLX90640), models/fever_lepton35 (FLIR Lepton 3.5), models/fever_ir384 (384x288)"


def optics_mismatch(model: str, optics: dict[str, Any], camera: str) -> str:
    return (f"app.model: {model} was trained for {optics['name']} ({optics['cols']}x{optics['rows']}, "
            f"{optics['hfov_deg']:g}° wide); the camera is {camera}: set app.model to the manifest trained for "
            f"this camera ({OPTICS_MODELS}) or train one: python -m customs_edge.training.train fever --optics NAME")


def model_optics(model: OnnxModel, config: GateAppConfig) -> dict[str, Any]:
    """The optics the model was trained for (manifest `training.optics`), checked against the config."""
    o = model.manifest.training.get("optics")
    keys = ("name", "cols", "rows", "hfov_deg")
    if not isinstance(o, dict) or any(k not in o for k in keys):
        raise ConfigError("app", [f"app.model: {model.manifest.name} states no optics (training.optics with "
                                  f"{', '.join(keys)}): retrain it with python -m customs_edge.training.train fever "
                                  f"--optics NAME"])
    if config.frame_size is not None and tuple(config.frame_size) != (o["cols"], o["rows"]):
        w, h = config.frame_size
        raise ConfigError("app", [optics_mismatch(model.manifest.name, o, f"{w}x{h} (app.frame_size)")])
    if config.hfov_deg is not None and abs(config.hfov_deg - float(o["hfov_deg"])) > 0.5:
        raise ConfigError("app", [optics_mismatch(model.manifest.name, o, f"{config.hfov_deg:g}° wide (app.hfov_deg)")])
    return o


class GateApp(App):
    Config = GateAppConfig
    CONSUMES = {"thermal": Role(ThermalFrame), "passage": Role(Passage, PassageHeartbeat, optional=True),
                "signal": Role(OutputsSet, optional=True), "environment": Role(Ambient, optional=True)}
    ALERTS_KEPT = 256  # fever alerts a confirmation may still refer to
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
        self.reference = Reference(config.reference) if config.reference else None
        self.optics = model_optics(self.model, config)
        self.hfov_deg = float(self.optics["hfov_deg"])
        self._optics_error: str | None = None  # frames of another size than the model's: why, once
        self._started: float | None = None  # first frame: the warm-up's start
        self._ambient_c: float | None = None  # the latest sensor ambient reading
        self._air: Ambient | None = None  # the latest environment sensor reading
        self._width = 0  # frame width, pixels
        self._last_frame_mono: float | None = None
        self._window_start: float | None = None
        self.totals = {"screened": 0, "alerts": 0, "entries": 0, "exits": 0, "invalid": 0, "confirmed": 0,
                       "not_confirmed": 0}
        self._outputs: list[tuple[str, SetOutputs]] = []
        self._unconfirmed: dict[str, tuple[str, float]] = {}  # signal ref -> (colour, issued) until read back
        self._buzzer_off_at: float | None = None
        self._signal_fault: str | None = None  # the signal driver's fault, until it recovers
        self._alerts: OrderedDict[str, dict[str, Any]] = OrderedDict()  # screening id -> alert, for confirm
        self._reset_window()

    def _reset_window(self) -> None:
        self._w = {"frames": 0, "screened": 0, "alerts": 0, "entries": 0, "exits": 0, "passage_lost": 0,
                   "bad_frames": 0, "invalid": 0, "signals": 0, "signal_late": 0, "signal_missed": 0,
                   "signal_max_ms": 0}
        self._w_estimates: list[float] = []
        self._w_dead = 0
        self._w_ambient: float | None = None
        self._w_air: tuple[float, float | None] | None = None
        self._frag0, self._fix0 = self.tracker.fragments, self.tracker.fixtures

    # --- the screening pipeline (also run directly by models/fever.py on simulated frames) ------------
    def process_frame(self, frame: np.ndarray, mono: float, ts: float) -> list[Screening]:
        if self._started is None:
            self._started = mono
        self._width = frame.shape[1]
        flag = ""
        if self.reference is not None:
            frame, ref = self.reference.correct(frame, mono)
            flag = ref.reason and "reference_" + ref.reason
        return self.screen(self.tracker.process(frame, mono, ts, flag))

    def tags(self, t: FinishedTrack) -> tuple[tuple[str, ...], float | None, float | None]:
        """(reasons the measurement is not valid, estimated distance, air temperature) for a track."""
        c = self.config
        tags = [t.unusable] if t.unusable else []
        if self._started is not None and t.best_mono - self._started < c.warmup_s:
            tags.append("warm_up")
        dist = None
        size_px = math.sqrt(t.features[4]) - c.head_blur_px  # the head's apparent size, pixels
        if self._width and size_px > 0:
            dist = c.head_size_m / (size_px * 2 * math.tan(math.radians(self.hfov_deg / 2)) / self._width)
            if dist < c.min_distance_m:
                tags.append("too_near")
            elif dist > c.max_distance_m:
                tags.append("too_far")
        if t.faces > 1:
            tags.append("multiple_faces")
        air = None if self._ambient_c is None else self._ambient_c - c.sensor_ambient_offset_k
        rh = None
        if self._air is not None:  # an environment sensor: the air itself, and its humidity
            if t.best_mono - self._air.mono > c.environment_stale_s:
                tags.append("environment_stale")
            air, rh = self._air.temperature_c, self._air.humidity_pct
        if air is not None and air < c.ambient_min_c:
            tags.append("ambient_low")
        elif air is not None and air > c.ambient_max_c:
            tags.append("ambient_high")
        if rh is not None and rh < c.humidity_min_pct:
            tags.append("humidity_low")
        elif rh is not None and rh > c.humidity_max_pct:
            tags.append("humidity_high")
        return tuple(tags), dist, air

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
            out.append(Screening(t, e, normal_cdf(abs(e - thr) / sigma), fever, *self.tags(t)))
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
            if frame.shape != (self.optics["rows"], self.optics["cols"]):
                return self._wrong_optics(frame.shape, reading.source)
            self._last_frame_mono = reading.mono
            self._w["frames"] += 1
            self._w_dead = max(self._w_dead, reading.dead_pixels)
            self._ambient_c = reading.ambient_c
            if reading.ambient_c is not None:
                self._w_ambient = reading.ambient_c
            return self._records(self.process_frame(frame, reading.mono, reading.ts), reading.source)
        if isinstance(reading, OutputsSet):
            self._signal_set(reading)
            return []
        if isinstance(reading, Ambient):
            self._air = reading
            self._w_air = (reading.temperature_c, reading.humidity_pct)
            return []
        if isinstance(reading, Passage):
            n = 1 + reading.lost
            key = "entries" if reading.event == "entry" else "exits"
            self._w[key] += n
            self.totals[key] += n
            self._w["passage_lost"] += reading.lost
        return []

    def _humidity(self) -> dict[str, Any]:
        """Where the screening's air figures come from (only with an environment sensor: its RH too)."""
        if self._air is None:
            return {"ambient_source": "sensor"}
        rh = self._air.humidity_pct
        return {"ambient_source": "environment", "humidity_pct": None if rh is None else round(rh, 1)}

    def _wrong_optics(self, shape: tuple[int, ...], source: str) -> list[RecordIn]:
        """A frame the model was not trained for: never screened; counted, and said once with the fix."""
        self._w["bad_frames"] += 1
        self._w["wrong_optics"] = self._w.get("wrong_optics", 0) + 1
        if self._optics_error is not None:
            return []
        self._optics_error = optics_mismatch(self.model.manifest.name, self.optics, f"{shape[1]}x{shape[0]}")
        return [RecordIn(type="app_error", priority=Priority.ALERT,
                         payload={"error": self._optics_error, "source": source, "key": "app.model"})]

    def _records(self, screenings: list[Screening], source: str) -> list[RecordIn]:
        out: list[RecordIn] = []
        thr = self.config.threshold_c
        for s in screenings:
            t = s.track
            est, conf = round(s.estimate_c, 2), round(s.confidence, 3)
            self._w["screened"] += 1
            self.totals["screened"] += 1
            self._w_estimates.append(s.estimate_c)
            if not s.valid:
                self._w["invalid"] += 1
                self.totals["invalid"] += 1
            validity = {"valid": s.valid, "tags": list(s.tags)}
            sid = f"{self.device_id}:{round(t.best_ts * 1000)}:{t.id}"
            signal = self._signal(sid, s)
            ref = "none" if self.reference is None else t.unusable.removeprefix("reference_") or "ok"
            out.append(RecordIn(type="screening", priority=Priority.EVENT, ts=t.best_ts, payload={
                "screening": sid, "traveller": t.id, "estimate_c": est, "confidence": conf,
                "decision": "fever" if s.fever else "normal", "threshold_c": thr, **validity,
                "reference": ref, "distance_m": None if s.distance_m is None else round(s.distance_m, 2),
                "ambient_c": None if s.ambient_c is None else round(s.ambient_c, 1),
                **self._humidity(),
                "frames": t.frames, "measured_frames": t.good_frames,
                "head_max_c": round(t.features[0], 2), "background_c": round(t.features[3], 2),
                "head_px": round(t.features[4]), "direction": "ltr" if t.direction > 0 else "rtl",
                "hot_object": t.hot_object, "model": self.model.manifest.version, "source": source}))
            if s.fever:
                self._w["alerts"] += 1
                self.totals["alerts"] += 1
                payload: dict[str, Any] = {"screening": sid, "traveller": t.id, "estimate_c": est,
                                           "confidence": conf, "threshold_c": thr, **validity,
                                           "rescreen": not s.valid, "source": source,
                                           "confirm": "secondary measurement with a clinical thermometer"}
                self._alerts[sid] = {"estimate_c": est, "ts": t.best_ts, "threshold_c": thr, "valid": s.valid}
                while len(self._alerts) > self.ALERTS_KEPT:
                    self._alerts.popitem(last=False)
                if self.config.thumbnail_on_alert and t.thumbnail is not None:
                    payload["thumbnail"] = thumbnail(t.thumbnail, self.config.thumbnail_width_px)
                out.append(RecordIn(type="fever_alert", priority=Priority.ALERT, ts=t.best_ts, payload=payload))
            out += signal
        return out

    # --- lane signals ------------------------------------------------------------------------
    def _signal(self, sid: str, s: Screening) -> list[RecordIn]:
        """Ask for the traveller's light; a `signal_missed` record at once if the driver is down (the
        command still goes: the driver sets the newest once it is back)."""
        c = self.config.signal
        if c is None:
            return []
        colour = "red" if s.fever else "amber" if not s.valid or s.confidence < c.rescreen_below_confidence \
            else "green"
        buzzer = colour == "red" and c.buzzer_s > 0
        cmd = SetOutputs(values={"green": colour == "green", "amber": colour == "amber", "red": colour == "red",
                                 "buzzer": buzzer}, ref=sid)
        self._buzzer_off_at = cmd.issued_mono + c.buzzer_s if buzzer else None
        self._outputs.append(("signal", cmd))
        if self._signal_fault is not None:
            return [self._missed(sid, colour, self._signal_fault)]
        self._unconfirmed[sid] = (colour, cmd.issued_mono)
        return []

    def _missed(self, sid: str, colour: str, error: str) -> RecordIn:
        self._w["signal_missed"] += 1
        return RecordIn(type="signal_missed", priority=Priority.ALERT if colour == "red" else Priority.REPORT,
                        payload={"screening": sid, "signal": colour, "error": error})

    def _signal_set(self, r: OutputsSet) -> None:
        """The driver read the light back as set: every signal issued up to this one is settled."""
        c = self.config.signal
        ours = r.ref in self._unconfirmed  # not a buzzer-off, nor the driver restoring after a reopen
        for ref, (_, issued) in list(self._unconfirmed.items()):
            if issued <= r.issued_mono:
                del self._unconfirmed[ref]
        if ours and c is not None:
            ms = round(r.latency_s * 1000)
            self._w["signals"] += 1
            self._w["signal_late"] += r.latency_s > c.late_after_s
            self._w["signal_max_ms"] = max(self._w["signal_max_ms"], ms)

    def take_outputs(self) -> list[tuple[str, SetOutputs]]:
        out, self._outputs = self._outputs, []
        return out

    def command(self, name: str, args: dict[str, Any]) -> tuple[dict[str, Any], list[RecordIn]]:
        if name != "confirm":
            return super().command(name, args)
        try:
            a = Confirm.model_validate(args)
        except ValidationError as exc:
            raise ValueError("confirm: " + "; ".join(f"{'.'.join(map(str, e['loc'])) or 'args'}: {e['msg']}"
                                                     for e in exc.errors())) from None
        alert = self._alerts.get(a.screening)
        if alert is None:
            raise ValueError(f"confirm: no fever alert {a.screening!r} on this unit (it keeps the last "
                             f"{self.ALERTS_KEPT} alerts; give the `screening` id of the fever_alert record)")
        confirmed = a.measured_c >= self.config.confirm_fever_c
        self.totals["confirmed" if confirmed else "not_confirmed"] += 1
        at = time.time() if a.at is None else a.at
        payload = {"screening": a.screening, "measured_c": round(a.measured_c, 2), "confirmed": confirmed,
                   "confirm_fever_c": self.config.confirm_fever_c, "by": a.by, "at": at,
                   "screening_ts": alert["ts"], "estimate_c": alert["estimate_c"],
                   "threshold_c": alert["threshold_c"], "screening_valid": alert["valid"]}
        rec = RecordIn(type="fever_confirmation", priority=Priority.ALERT, ts=at, payload=payload)
        return {"screening": a.screening, "confirmed": confirmed}, [rec]

    def tick(self, now: float) -> list[RecordIn]:
        out: list[RecordIn] = []
        if self._buzzer_off_at is not None and now >= self._buzzer_off_at:
            self._buzzer_off_at = None
            self._outputs.append(("signal", SetOutputs(values={"buzzer": False}, ref="buzzer-off")))
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
            "air_c": None if self._w_air is None else self._w_air[0],
            "humidity_pct": None if self._w_air is None else self._w_air[1],
            "reference": self.reference.summary() if self.reference else "none",
            "threshold_c": self.config.threshold_c, "totals": dict(self.totals)})
        self._reset_window()
        return rec

    def on_fault(self, role: str, fault: DriverFault) -> list[RecordIn]:
        out = super().on_fault(role, fault)
        if role == "signal":  # these lights were never confirmed set: say so, per traveller
            self._signal_fault = str(out[0].payload["error"])
            out += [self._missed(ref, colour, self._signal_fault) for ref, (colour, _) in self._unconfirmed.items()]
            self._unconfirmed.clear()
        if role == "thermal" and self.tracker.tracks:
            out += self._records(self.screen(self.tracker.flush()), role)
        return out

    def on_recovered(self, role: str, down_s: float) -> list[RecordIn]:
        if role == "signal":
            self._signal_fault = None
        return super().on_recovered(role, down_s)

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
