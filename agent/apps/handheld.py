"""Handheld inspection unit: photograph and identify (wood, insects), scan codes against risk lists, place
every event by GPS, work offline for a shift (docs/handheld.md).

Inputs (CONSUMES, each optional): `camera` Image (the macro camera; frames kept, not processed, until a capture),
`scanner` CodeScan (optional; serial barcode/2-D scanner), `gps` Position (optional; NMEA receiver).

A capture is triggered, never continuous: by the operator command `{"cmd": "capture", "args": {"model":
"wood"|"insects", "note": ...}}` (`customs-edge cmd DEVICE capture`), or by scanning one of the
`trigger_codes` (the scanner's button line: a command barcode on the officer's card or the scanner's own
trigger key programmed to send it). A capture takes the newest camera frame (refused when older than
`max_frame_age_s`), keeps it as an evidence photo (JPEG, content-addressed beside the outbox, agent/photos.py),
runs the model's classifier (top-3, abstain) and decodes the codes in the frame with zxing-cpp (QR, Data
Matrix, EAN/UPC, Code 128, ...). Records:
  identification  EVENT, or ALERT when the label is CITES-listed or a quarantine pest (`alert: true`)
  scan            EVENT per code read (scanner or camera), with the risk list version checked against
  risk_hit        ALERT: a scan matched the risk list; names the entries, the list and its version
  position_summary TELEMETRY every `position_summary_s`: epochs, fixes, losses, HDOP, distance walked
  fix_lost / fix_regained  EVENT when the receiver loses or regains its fix
  capture_failed  REPORT: no fresh frame, or the classifier failed
  risk_list_applied  EVENT: a new list version is in force (received from the hub, or loaded at start)
Every handheld record carries `position`: the last valid fix (lat, lon, hdop, satellites) and its age in
seconds (`fix_age_s`), or `{"fix": null}` before the first fix.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from customs_edge.agent.apps.base import App, AppConfig, Role, StateMismatch
from customs_edge.agent.memory import STARTUP_HEAVY, fixed_malloc_thresholds, release_startup_code
from customs_edge.agent.photos import PhotoSender, PhotoStore
from customs_edge.agent.risklist import MAX_BYTES, RiskListReceiver, RiskListStore, RiskMatcher
from customs_edge.core.readings import CodeScan, Image, Position, Reading
from customs_edge.core.records import Priority, RecordIn

log = logging.getLogger(__name__)

ModelName = Literal["wood", "insects"]
EARTH_M_PER_DEG = 111_320.0
DEFAULT_FORMATS = ("QRCode", "DataMatrix", "EAN13", "EAN8", "UPCA", "UPCE", "Code128", "ITF")


class Identification(Protocol):
    """What models/image_classifier.py's classify() returns (the fields the app reads; read-only)."""

    @property
    def top3(self) -> Any: ...
    @property
    def label(self) -> str | None: ...
    @property
    def abstain_reason(self) -> str | None: ...
    @property
    def cites(self) -> str | None: ...
    @property
    def quarantine_pest(self) -> bool: ...
    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def ms(self) -> float: ...
    @property
    def alert(self) -> bool: ...


class Classifier(Protocol):
    def classify(self, image_bgr: np.ndarray) -> Identification: ...


class HandheldConfig(AppConfig):
    wood_model: Path | None = Field(None, description="wood model manifest; default: the shipped models/wood",
                                    json_schema_extra={"shipped_model": "wood"})
    insects_model: Path | None = Field(None, description="insects model manifest; default: the shipped "
                                                         "models/insects",
                                       json_schema_extra={"shipped_model": "insects"})
    models: list[ModelName] = Field(["wood", "insects"], description="the classifiers this unit loads")
    default_model: ModelName = Field("wood", description="the model a capture uses when it names none")
    trigger_codes: dict[str, ModelName] = Field(
        {"CE-CAPTURE": "wood", "CE-CAPTURE-WOOD": "wood", "CE-CAPTURE-INSECT": "insects"},
        description="scanned text -> capture with that model (the scanner's button line); never a scan record")
    max_frame_age_s: float = Field(2.0, gt=0, description="a capture needs a camera frame at most this old")
    decode_codes: bool = Field(True, description="decode barcodes and 2-D codes in every captured photo")
    code_formats: list[str] = Field(list(DEFAULT_FORMATS), description="zxing-cpp BarcodeFormat names")
    photo_quality: int = Field(90, ge=30, le=100, description="JPEG quality of the evidence photo")
    photo_max_mb: float = Field(1024.0, gt=0, description="cap of the photo store beside the outbox")
    photo_window: int = Field(2, ge=1, le=16, description="photos in flight to the hub at once")
    photo_ack_timeout_s: float = Field(15.0, gt=0, description="no hub ack in this long: the photo is sent again")
    risk_list_max_mb: float = Field(MAX_BYTES / (1 << 20), gt=0, le=256,
                                    description="a risk list larger than this (compressed) is refused")
    position_summary_s: float = Field(60.0, gt=0, description="one position_summary record per interval")
    fix_stale_s: float = Field(30.0, gt=0, description="records say `stale: true` when the last fix is older")


    @field_validator("code_formats")
    @classmethod
    def _formats(cls, v: list[str]) -> list[str]:
        import zxingcpp

        bad = [f for f in v if not isinstance(getattr(zxingcpp.BarcodeFormat, f, None), zxingcpp.BarcodeFormat)]
        if bad:
            raise ValueError(f"unknown zxing-cpp formats {bad}: use names like {', '.join(DEFAULT_FORMATS)}")
        return v


class Capture(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: ModelName | None = None
    note: str | None = Field(None, max_length=500)


def load_classifier(name: str, manifest: Path | None) -> Classifier:
    """The image classifier of a manifest (default: the shipped one); ImportError/OSError/ModelError if none."""
    from customs_edge.models import default_manifest
    from customs_edge.models.image_classifier import ImageClassifier

    clf: Classifier = ImageClassifier.load(manifest or default_manifest(name))
    return clf


class HandheldApp(App):
    Config = HandheldConfig
    CONSUMES = {"camera": Role(Image, optional=True), "scanner": Role(CodeScan, optional=True),
                "gps": Role(Position, optional=True)}
    STATE_VERSION = 1
    config: HandheldConfig

    def __init__(self, device_id: str, config: HandheldConfig) -> None:
        super().__init__(device_id, config)
        fixed_malloc_thresholds()  # frames and activations go back to the kernel when freed (agent/memory.py)
        self.classifiers: dict[str, Classifier] = {}
        self.model_errors: dict[str, str] = {}
        for name in config.models:
            try:
                self.classifiers[name] = load_classifier(
                    name, config.wood_model if name == "wood" else config.insects_model)
            except Exception as exc:
                if (config.wood_model if name == "wood" else config.insects_model) is not None:
                    raise  # a model the config names must load: the unit refuses to start
                self.model_errors[name] = f"{type(exc).__name__}: {exc}"[:300]
                log.error("no %s model: captures are kept as photos but not identified", name,
                          extra={"error": self.model_errors[name]})
        for lib in STARTUP_HEAVY:  # start-up code, ~25 MB resident, ~8 MB used again (agent/memory.py)
            release_startup_code(lib)
        for kind, clf in self.classifiers.items():  # the unit's health message lists their versions
            setattr(self, f"{kind}_onnx", getattr(clf, "model", None))
        self._formats: Any = None
        self.frame: Image | None = None
        self.fix: dict[str, Any] | None = None  # the last valid fix: lat, lon, hdop, satellites, ts (wall)
        self._fix_mono: float | None = None
        self._had_fix: bool | None = None
        self.photos: PhotoStore | None = None
        self.photo_sender: PhotoSender | None = None
        self.risk: RiskListStore | None = None
        self._sidelines: list[Any] | None = None
        self._risk_seen: tuple[str, int] | None = None
        self.totals = dict.fromkeys(("captures", "identified", "abstained", "id_alerts", "scans", "camera_codes",
                                     "risk_hits", "capture_failed", "no_risk_list"), 0)
        self._reset_window(None)

    # --- beside the records: photos and risk lists ------------------------------------------------
    def sidelines(self, outbox_path: str, topic_prefix: str) -> list[Any]:
        if self._sidelines is None:
            c = self.config
            self.photos = PhotoStore(Path(f"{outbox_path}.photos"), c.photo_max_mb)
            self.photo_sender = PhotoSender(self.photos, self.device_id, topic_prefix, window=c.photo_window,
                                            ack_timeout_s=c.photo_ack_timeout_s)
            self.risk = RiskListStore(Path(f"{outbox_path}.risk-list.gz"), int(c.risk_list_max_mb * (1 << 20)))
            self._sidelines = [RiskListReceiver(self.risk, topic_prefix), self.photo_sender]
        return self._sidelines

    # --- inputs ---------------------------------------------------------------------------------
    def feed(self, reading: Reading) -> list[RecordIn]:
        if isinstance(reading, Image):
            self.frame = reading  # kept, not processed: a capture takes it
            return []
        if isinstance(reading, Position):
            return self._position(reading)
        if isinstance(reading, CodeScan):
            model = self.config.trigger_codes.get(reading.text)
            if model is not None and reading.valid:
                return self.capture(model, trigger=f"scanner:{reading.text}")[1]
            return self._scan(reading, "scanner", None)
        return []

    def command(self, name: str, args: dict[str, Any]) -> tuple[dict[str, Any], list[RecordIn]]:
        if name != "capture":
            return super().command(name, args)
        try:
            a = Capture.model_validate(args)
        except ValidationError as exc:
            raise ValueError("capture: " + "; ".join(f"{'.'.join(map(str, e['loc'])) or 'args'}: {e['msg']}"
                                                     for e in exc.errors())) from None
        return self.capture(a.model or self.config.default_model, trigger="command", note=a.note)

    def on_fault(self, role: str, fault: Any) -> list[RecordIn]:
        return [_placed(r, self.position()) for r in super().on_fault(role, fault)]

    def on_recovered(self, role: str, down_s: float) -> list[RecordIn]:
        return [_placed(r, self.position()) for r in super().on_recovered(role, down_s)]

    # --- position -------------------------------------------------------------------------------
    def _reset_window(self, now: float | None) -> None:
        self._w_start = now
        self._w: dict[str, Any] = {"epochs": 0, "valid": 0, "fix_lost": 0, "fix_regained": 0}
        self._w_hdop: list[float] = []
        self._w_sats: list[int] = []
        self._w_dist = 0.0
        self._w_prev: tuple[float, float] | None = None

    def _position(self, p: Position) -> list[RecordIn]:
        if self._w_start is None:
            self._w_start = p.mono
        self._w["epochs"] += 1
        out: list[RecordIn] = []
        if p.valid and p.lat is not None and p.lon is not None:
            self._w["valid"] += 1
            if p.hdop is not None:
                self._w_hdop.append(p.hdop)
            if p.satellites is not None:
                self._w_sats.append(p.satellites)
            if self._w_prev is not None:
                self._w_dist += _metres(self._w_prev, (p.lat, p.lon))
            self._w_prev = (p.lat, p.lon)
            self.fix = {"lat": round(p.lat, 7), "lon": round(p.lon, 7), "hdop": p.hdop, "satellites": p.satellites,
                        "quality": p.quality, "ts": p.ts}
            self._fix_mono = p.mono
        if self._had_fix is not None and p.valid != self._had_fix:
            key = "fix_regained" if p.valid else "fix_lost"
            self._w[key] += 1
            out.append(RecordIn(type=key, priority=Priority.EVENT, ts=p.ts, payload={
                "quality": p.quality, "satellites": p.satellites, "position": self.position()}))
        self._had_fix = p.valid
        return out

    def position(self) -> dict[str, Any]:
        """The last good position and its age, as every handheld record carries it."""
        if self.fix is None:
            return {"fix": None}
        age = time.monotonic() - self._fix_mono if self._fix_mono is not None else time.time() - self.fix["ts"]
        return {**{k: v for k, v in self.fix.items() if k != "ts"}, "fix_age_s": round(max(0.0, age), 1),
                "stale": age > self.config.fix_stale_s}

    # --- captures -------------------------------------------------------------------------------
    def capture(self, model: str, *, trigger: str, note: str | None = None) -> tuple[dict[str, Any], list[RecordIn]]:
        capture_id = uuid.uuid4().hex[:16]
        frame = self.frame
        age = None if frame is None else time.monotonic() - frame.mono
        if frame is None or age is None or age > self.config.max_frame_age_s:
            self.totals["capture_failed"] += 1
            why = "no camera frame yet" if frame is None else f"newest camera frame is {age:.1f} s old"
            rec = RecordIn(type="capture_failed", priority=Priority.REPORT, payload={
                "capture": capture_id, "trigger": trigger, "reason": why, "position": self.position()})
            return {"capture": capture_id, "ok": False, "reason": why}, [rec]
        self.totals["captures"] += 1
        img = np.ascontiguousarray(frame.pixels)
        photo, photo_bytes, refused = self._keep_photo(img)
        out: list[RecordIn] = []
        ident = self._identify(model, img)
        codes: list[dict[str, Any]] = []
        if self.config.decode_codes:
            for scan in self.decode_frame(img):
                self.totals["camera_codes"] += 1
                codes.append({"text": scan.text, "symbology": scan.symbology})
                out += self._scan(scan, "camera", capture_id)
        alert = bool(ident.get("alert"))
        self.totals["id_alerts"] += alert
        payload = {"capture": capture_id, "trigger": trigger, "note": note, **ident, "alert": alert,
                   "photo": photo, "photo_bytes": photo_bytes, "photo_refused": refused,
                   "frame": {"width": frame.width, "height": frame.height, "age_s": round(age, 3)},
                   "codes": codes, "position": self.position()}
        rec = RecordIn(type="identification", priority=Priority.ALERT if alert else Priority.EVENT,
                       ts=frame.ts, payload=payload)
        result = {"capture": capture_id, "ok": True, "label": ident.get("label"), "alert": alert, "photo": photo,
                  "abstain_reason": ident.get("abstain_reason"), "codes": codes}
        return result, [rec, *out]

    def _keep_photo(self, img: np.ndarray) -> tuple[str | None, int, str | None]:
        import cv2

        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, self.config.photo_quality])
        if not ok:
            return None, 0, "encode failed"
        data = buf.tobytes()
        if self.photos is None:
            return None, len(data), "no photo store"
        sha = self.photos.put(data)
        return sha, len(data), None if sha else "cap"

    def _identify(self, model: str, img: np.ndarray) -> dict[str, Any]:
        clf = self.classifiers.get(model)
        if clf is None:
            why = self.model_errors.get(model, f"model {model!r} not loaded (app.models)")
            self.totals["abstained"] += 1
            return {"model": model, "version": None, "label": None, "top3": [],
                    "abstain_reason": f"no model: {why}", "cites": None, "quarantine_pest": False, "ms": 0.0}
        r = clf.classify(img)
        self.totals["identified" if r.label is not None else "abstained"] += 1
        return {"model": r.model, "version": r.version, "label": r.label, "top3": _plain(r.top3),
                "abstain_reason": r.abstain_reason, "cites": r.cites, "quarantine_pest": bool(r.quarantine_pest),
                "ms": round(float(r.ms), 2), "alert": bool(r.alert)}

    def decode_frame(self, img: np.ndarray) -> list[CodeScan]:
        """Codes zxing-cpp finds in a frame, as CodeScans (GS1 content parsed like the scanner's)."""
        import cv2
        import zxingcpp

        from customs_edge.drivers.scanner import decode

        if self._formats is None:
            self._formats = [getattr(zxingcpp.BarcodeFormat, name) for name in self.config.code_formats]
        grey = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        found = zxingcpp.read_barcodes(grey, formats=self._formats, text_mode=zxingcpp.TextMode.Plain)
        return [decode(f"{b.symbology_identifier}{b.text}", "camera") for b in found if b.valid]

    # --- scans and risk lists ---------------------------------------------------------------------
    def _scan(self, scan: CodeScan, via: str, capture_id: str | None) -> list[RecordIn]:
        self.totals["scans"] += 1
        matcher = self.risk.current if self.risk is not None else None
        if matcher is None:
            self.totals["no_risk_list"] += 1
        hits = matcher.match(gtin=scan.gtin, serial=scan.serial, batch=scan.batch, text=scan.text) \
            if matcher is not None and scan.valid else []
        payload = {"via": via, "capture": capture_id, "text": scan.text, "symbology": scan.symbology,
                   "symbology_name": scan.symbology_name, "gs1": scan.gs1, "gtin": scan.gtin, "batch": scan.batch,
                   "serial": scan.serial, "expiry": scan.expiry, "ais": dict(scan.ais), "valid": scan.valid,
                   "error": scan.error, "risk_list": _list_ref(matcher), "risk_hits": len(hits),
                   "position": self.position()}
        out = [RecordIn(type="scan", priority=Priority.EVENT, ts=scan.ts, payload=payload)]
        if hits:
            self.totals["risk_hits"] += 1
            out.append(RecordIn(type="risk_hit", priority=Priority.ALERT, ts=scan.ts, payload={
                **payload, "hits": [{"kind": h.kind, "key": h.key, "tag": h.tag, "action": h.action} for h in hits],
                "action": hits[0].action}))
        return out

    def tick(self, now: float) -> list[RecordIn]:
        out: list[RecordIn] = []
        cur = self.risk.current if self.risk is not None else None
        if cur is not None and (cur.name, cur.version) != self._risk_seen:
            self._risk_seen = (cur.name, cur.version)
            out.append(RecordIn(type="risk_list_applied", priority=Priority.EVENT, payload={
                **cur.describe(), "position": self.position()}))
        if self._w_start is not None and now - self._w_start >= self.config.position_summary_s:
            out.append(self._summary(now))
            self._reset_window(now)
        return out

    def _summary(self, now: float) -> RecordIn:
        h, s = self._w_hdop, self._w_sats
        photos = self.photos.snapshot() if self.photos is not None else None
        return RecordIn(type="position_summary", priority=Priority.TELEMETRY, payload={
            **self._w, "interval_s": round(now - (self._w_start or now), 1), "distance_m": round(self._w_dist, 1),
            "hdop_mean": round(sum(h) / len(h), 2) if h else None, "hdop_max": max(h) if h else None,
            "satellites_mean": round(sum(s) / len(s), 1) if s else None, "position": self.position(),
            "totals": dict(self.totals), "photos": photos,
            "risk_list": _list_ref(self.risk.current if self.risk is not None else None)})

    def close(self) -> list[RecordIn]:
        return [self._summary(time.monotonic())] if self._w_start is not None and self._w["epochs"] else []

    # --- state ----------------------------------------------------------------------------------
    def snapshot(self) -> bytes | None:
        return self.pack_state({"fix": self.fix, "totals": self.totals})

    def restore(self, blob: bytes) -> None:
        s = self.unpack_state(blob)
        fix, totals = s.get("fix"), s.get("totals")
        if fix is not None and not (isinstance(fix, dict) and isinstance(fix.get("ts"), int | float)):
            raise StateMismatch("handheld state: fix without ts")
        if not isinstance(totals, dict):
            raise StateMismatch("handheld state: totals")
        self.fix, self._fix_mono = fix, None  # its age now runs on the wall clock
        self.totals.update({k: int(v) for k, v in totals.items() if k in self.totals})


def _placed(r: RecordIn, position: dict[str, Any]) -> RecordIn:
    return RecordIn(type=r.type, priority=r.priority, ts=r.ts, payload={**r.payload, "position": position})


def _list_ref(m: RiskMatcher | None) -> dict[str, Any] | None:
    return None if m is None else {"name": m.name, "version": m.version}


def _metres(a: tuple[float, float], b: tuple[float, float]) -> float:
    import math

    dn = (b[0] - a[0]) * EARTH_M_PER_DEG
    de = (b[1] - a[1]) * EARTH_M_PER_DEG * math.cos(math.radians(a[0]))
    return math.hypot(dn, de)


def _plain(x: Any) -> Any:
    """top3 as JSON: [(label, p), ...] or a list of objects with label/confidence fields."""
    out = []
    for item in x or []:
        if isinstance(item, tuple | list) and len(item) == 2:
            out.append({"label": str(item[0]), "p": round(float(item[1]), 4)})
        elif isinstance(item, dict):
            out.append({k: (round(float(v), 4) if isinstance(v, float) else v) for k, v in item.items()})
        else:
            label = getattr(item, "label", str(item))
            p = getattr(item, "confidence", getattr(item, "p", None))
            out.append({"label": label, "p": None if p is None else round(float(p), 4)})
    return out
