"""Identify a specimen from one photograph with any ONNX image classifier described by its manifest.

The manifest is the ordinary model manifest (models.runtime: file sha256, input and output names and
shapes are checked before use) with a `classifier` block:

    "classifier": {
      "subject": "end grain",                        # what a photo must show; the out-of-distribution reason
      "input": {"name": "image", "size": [192, 192],  # H, W after a centre square crop
                "layout": "NCHW", "colour": "RGB",     # channel order the network expects
                "scale": 0.00392156862745098,          # x * scale, then (x - mean) / std per channel
                "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
      "logits": "logits",                             # [N, len(labels)] output, before softmax
      "ood": "ood",                                   # optional [N, 1] output: distance to the training set
      "temperature": 1.3,                             # calibration (fitted on a validation split)
      "min_confidence": 0.6,                          # abstain below this top-1 probability
      "checks": {"size": 256, "min_brightness": 40.0, "max_brightness": 235.0,
                 "min_sharpness": 12.0, "max_ood": 3.5, "max_known": 1.4},
      "labels": [{"label": "dalbergia_nigra", "name": "Dalbergia nigra", "cites": "I",
                  "quarantine_pest": false}, ...]
    }

Brightness is the mean grey level and sharpness the variance of the Laplacian of the centre square at
`checks.size` px; both thresholds, like `max_ood`, come from the training photographs (a lab that
retrains gets its own). A bring-your-own network without an `ood` output skips that check.

    clf = ImageClassifier.load(default_manifest("wood"))
    ident = clf.classify(image_bgr)   # Identification: top3, label or None (abstained) and why, alert
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from customs_edge.core.errors import ModelError
from customs_edge.models.runtime import OnnxModel

TOO_DARK, TOO_BRIGHT, BLURRED, LOW_CONFIDENCE = "too dark", "too bright", "blurred", "low confidence"
UNKNOWN = "unknown species"  # the subject, but unlike every label (a species the model was not trained on)


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    size: tuple[int, int] = Field(description="H, W")
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    colour: Literal["RGB", "BGR"] = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @model_validator(mode="after")
    def _positive(self) -> InputSpec:
        if min(self.size) < 8 or min(self.std) <= 0:
            raise ValueError("size must be >= 8 px and std > 0")
        return self


class Checks(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(256, ge=32)
    min_brightness: float = 0.0
    max_brightness: float = 255.0
    min_sharpness: float = 0.0
    max_ood: float | None = None  # above: not the subject at all ("not end grain")
    max_known: float | None = None  # above (and <= max_ood): the subject, unlike every label ("unknown species")


class LabelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str = Field(min_length=1)
    name: str = ""
    cites: Literal["I", "II", "III"] | None = None
    quarantine_pest: bool = False


class ClassifierSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subject: str = "specimen"
    input: InputSpec
    logits: str
    ood: str | None = None
    temperature: float = Field(1.0, gt=0)
    min_confidence: float = Field(0.5, ge=0, le=1)
    checks: Checks = Field(default_factory=Checks)
    labels: list[LabelSpec] = Field(min_length=2)

    @model_validator(mode="after")
    def _unique(self) -> ClassifierSpec:
        names = [x.label for x in self.labels]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"labels must be unique: {dup} repeated")
        return self


@dataclass(frozen=True)
class Identification:
    top3: tuple[tuple[str, float], ...]  # (label, calibrated probability), best first
    label: str | None  # None: abstained ("unknown - send to the lab")
    abstain_reason: str | None  # "too dark", "too bright", "blurred", "not <subject>", "unknown species",
    #                             "low confidence"
    cites: str | None  # CITES appendix of `label` ("I", "II", "III") or None
    quarantine_pest: bool
    model: str
    version: str
    ms: float  # preprocessing + inference
    measured: dict[str, float] = field(default_factory=dict, compare=False)  # brightness, sharpness, ood

    @property
    def alert(self) -> bool:
        """A CITES-listed species or a quarantine pest was identified (not abstained)."""
        return self.label is not None and (self.cites is not None or self.quarantine_pest)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "abstain_reason": self.abstain_reason,
                "top3": [[k, round(p, 4)] for k, p in self.top3], "cites": self.cites,
                "quarantine_pest": self.quarantine_pest, "alert": self.alert, "model": self.model,
                "version": self.version, "ms": round(self.ms, 2),
                "measured": {k: round(v, 3) for k, v in self.measured.items()}}


def centre_square(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    return image[y0:y0 + s, x0:x0 + s]


def _as_bgr(image: Any) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 BGR image (cv2.imdecode), got "
                         f"{type(image).__name__} {getattr(image, 'dtype', '')}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 16:
        raise ValueError(f"expected an HxWx3 uint8 BGR image of at least 16x16 px, got shape {image.shape}")
    return image[..., :3] if image.shape[2] == 4 else image


def quality(image_bgr: np.ndarray, size: int) -> tuple[float, float]:
    """(mean grey level, variance of the Laplacian) of the centre square resized to `size`."""
    sq = centre_square(_as_bgr(image_bgr))
    grey = cv2.cvtColor(cv2.resize(sq, (size, size), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2GRAY)
    return float(grey.mean()), float(cv2.Laplacian(grey, cv2.CV_32F).var())


def preprocess(image_bgr: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The network's input tensor [1, C, H, W] (or [1, H, W, C]) for one BGR photograph."""
    sq = centre_square(_as_bgr(image_bgr))
    h, w = spec.size
    img = cv2.resize(sq, (w, h), interpolation=cv2.INTER_AREA)
    if spec.colour == "RGB":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    x: np.ndarray = img.astype(np.float32) * np.float32(spec.scale)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    if spec.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x[None])


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e: np.ndarray = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True), np.float64)


class ImageClassifier:
    """An ONNX image classifier whose manifest carries preprocessing, labels and regulatory status."""

    def __init__(self, model: OnnxModel, spec: ClassifierSpec) -> None:
        self.model = model
        self.spec = spec
        self.labels = [x.label for x in spec.labels]
        self._status = {x.label: x for x in spec.labels}

    @classmethod
    def load(cls, manifest_path: str | Path, *, threads: int = 1) -> ImageClassifier:
        """Load and check (models.runtime: sha256, names, shapes; here: the classifier block against them).
        Raises ModelError naming what is wrong."""
        model = OnnxModel(manifest_path, threads=threads)
        m = model.manifest
        if m.classifier is None:
            raise ModelError(f"{manifest_path}: no 'classifier' block: not an image classifier manifest "
                             f"(see models/image_classifier.py for its fields)")
        try:
            spec = ClassifierSpec.model_validate(m.classifier)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
            raise ModelError(f"{manifest_path}: bad classifier block: {problems}") from exc
        inputs = {t.name: t.shape for t in m.inputs}
        outputs = {t.name: t.shape for t in m.outputs}
        if spec.input.name not in inputs:
            raise ModelError(f"{m.name}: classifier input {spec.input.name!r} is not a model input {sorted(inputs)}")
        h, w = spec.input.size
        want: list[int | None] = [None, 3, h, w] if spec.input.layout == "NCHW" else [None, h, w, 3]
        got = inputs[spec.input.name]
        if len(got) != 4 or any(g is not None and g != x for g, x in zip(got, want, strict=True)):
            raise ModelError(f"{m.name}: input {spec.input.name!r} shape {got} does not fit size {[h, w]} "
                             f"{spec.input.layout} (want {want})")
        if spec.logits not in outputs:
            raise ModelError(f"{m.name}: classifier logits {spec.logits!r} is not a model output {sorted(outputs)}")
        n = outputs[spec.logits][-1]
        if n != len(spec.labels):
            raise ModelError(f"{m.name}: output {spec.logits!r} has {n} classes but the manifest lists "
                             f"{len(spec.labels)} labels")
        if spec.ood is not None and spec.ood not in outputs:
            raise ModelError(f"{m.name}: classifier ood {spec.ood!r} is not a model output {sorted(outputs)}")
        return cls(model, spec)

    @property
    def name(self) -> str:
        return self.model.manifest.name

    @property
    def version(self) -> str:
        return self.model.manifest.version

    def status(self, label: str) -> LabelSpec:
        return self._status[label]

    def raw(self, image_bgr: np.ndarray) -> tuple[np.ndarray, float | None]:
        """(logits [C], ood distance or None) for one photograph: no checks, no calibration."""
        x = preprocess(image_bgr, self.spec.input)
        out = self.model.predict({self.spec.input.name: x})
        ood = float(out[self.spec.ood].reshape(-1)[0]) if self.spec.ood else None
        return out[self.spec.logits].reshape(-1), ood

    def classify(self, image_bgr: np.ndarray) -> Identification:
        """Top-3 with calibrated probabilities, or an abstention with its reason (the top-3 is kept
        for the lab either way). Raises ValueError only for something that is not an image."""
        t0 = time.perf_counter()
        spec, ck = self.spec, self.spec.checks
        brightness, sharpness = quality(image_bgr, ck.size)
        logits, ood = self.raw(image_bgr)
        p = softmax(logits, spec.temperature)
        order = np.argsort(-p)[:3]
        top3 = tuple((self.labels[i], float(p[i])) for i in order)
        reason: str | None = None
        if brightness < ck.min_brightness:
            reason = TOO_DARK
        elif brightness > ck.max_brightness:
            reason = TOO_BRIGHT
        elif sharpness < ck.min_sharpness:
            reason = BLURRED
        elif ood is not None and ck.max_ood is not None and not ood <= ck.max_ood:
            reason = f"not {spec.subject}"
        elif ood is not None and ck.max_known is not None and not ood <= ck.max_known:
            reason = UNKNOWN
        elif top3[0][1] < spec.min_confidence:
            reason = LOW_CONFIDENCE
        label = None if reason else top3[0][0]
        st = self._status.get(label) if label else None
        measured = {"brightness": brightness, "sharpness": sharpness}
        if ood is not None:
            measured["ood"] = ood
        return Identification(top3=top3, label=label, abstain_reason=reason, cites=st.cites if st else None,
                              quarantine_pest=st.quarantine_pest if st else False, model=self.name,
                              version=self.version, ms=(time.perf_counter() - t0) * 1000.0, measured=measured)
