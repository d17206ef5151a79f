"""Models: ONNX files described by a manifest, loaded through onnxruntime and checked before use.

Manifest (JSON, beside the .onnx file):
  {"name": "ore-grade", "version": "1.0.0", "file": "ore_grade.onnx", "sha256": "...",
   "inputs":  [{"name": "spectrum", "shape": [null, 1024], "dtype": "float32", "units": "counts"}],
   "outputs": [{"name": "assay", "shape": [null, 3], "dtype": "float32", "units": "% Fe, % SiO2, % H2O"}],
   "training": {...free text and figures...}, "metrics": {...held-out figures...}}
A model whose file hash, input/output names or shapes differ from its manifest is refused (ModelError).
`null` in a shape is a free (batch) dimension.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from customs_edge.core.errors import ModelError


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    shape: list[int | None]
    dtype: str = "float32"
    units: str | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    version: str
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    # image classifiers (models.image_classifier): preprocessing, labels and their regulatory status
    classifier: dict[str, Any] | None = None


class Model(Protocol):
    manifest: Manifest

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _same_shape(declared: list[int | None], actual: list[Any]) -> bool:
    if len(declared) != len(actual):
        return False
    return all(d is None or not isinstance(a, int) or d == a for d, a in zip(declared, actual, strict=True))


ONNX_TYPES = {"float32": "tensor(float)", "float64": "tensor(double)", "float16": "tensor(float16)",
              "int64": "tensor(int64)", "int32": "tensor(int32)", "uint8": "tensor(uint8)", "int8": "tensor(int8)",
              "bool": "tensor(bool)"}


class OnnxModel:
    """onnxruntime session on one thread (the agent shares two cores with the drivers)."""

    def __init__(self, manifest_path: str | Path, *, threads: int = 1) -> None:
        manifest_path = Path(manifest_path)
        try:
            self.manifest = Manifest.model_validate(json.loads(manifest_path.read_text()))
            self._dtypes = {t.name: np.dtype(t.dtype) for t in self.manifest.inputs}
        except (OSError, ValueError, TypeError, RecursionError, ValidationError) as exc:
            raise ModelError(f"{manifest_path}: bad manifest: {str(exc)[:300]}") from exc
        path = manifest_path.parent / self.manifest.file
        if not path.is_file():
            raise ModelError(f"{path}: model file missing")
        digest = sha256_file(path)
        if digest != self.manifest.sha256:
            raise ModelError(f"{path}: sha256 {digest[:12]}... does not match manifest {self.manifest.sha256[:12]}...")
        import onnxruntime as ort  # 35 MiB: only units that run a model pay for it

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"{path}: onnxruntime refused the model: {exc}") from exc
        self._check(self.session.get_inputs(), self.manifest.inputs, "input")
        self._check(self.session.get_outputs(), self.manifest.outputs, "output")
        for spec in self.session.get_inputs():
            want = ONNX_TYPES.get(self._dtypes[spec.name].name)
            if spec.type != want:
                raise ModelError(f"{self.manifest.name}: input {spec.name!r} is {spec.type}, manifest says "
                                 f"{self._dtypes[spec.name].name}")

    def _check(self, actual: list[Any], declared: list[TensorSpec], what: str) -> None:
        got = {a.name: a.shape for a in actual}
        want = {d.name: d.shape for d in declared}
        if set(got) != set(want):
            raise ModelError(f"{self.manifest.name}: {what} names {sorted(got)} != manifest {sorted(want)}")
        for name, shape in want.items():
            if not _same_shape(shape, list(got[name])):
                raise ModelError(f"{self.manifest.name}: {what} {name!r} shape {got[name]} != manifest {shape}")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {k: np.asarray(v, dtype=self._dtypes[k]) for k, v in inputs.items()}
        names = [o.name for o in self.manifest.outputs]
        return dict(zip(names, self.session.run(names, feed), strict=True))
