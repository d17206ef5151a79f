"""The shipped ONNX models (package data: models/<name>/manifest.json + .onnx) and the runtime that loads
them (customs_edge.models.runtime.OnnxModel: hash, input and output shapes checked against the manifest).

They are built by customs_edge.training (`python -m customs_edge.training.train NAME|all`) from data the
simulators generate. This package imports nothing but customs_edge.core.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

MODELS_DIR = Path(str(files(__name__)))


def default_manifest(module_name: str) -> Path:
    """The shipped manifest of a model, e.g. default_manifest('ore_grade')."""
    return MODELS_DIR / module_name / "manifest.json"
