"""The shipped insect model: trained on photographs simulators.specimens generates, by the same
code as `customs-edge models train insects --images DIR` (training.image_classifier).

    python -m customs_edge.training.train insects      # rebuild models/insects/
    customs-edge models evaluate insects --json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from customs_edge.training import image_classifier as ic

KIND = "insects"
PER_CLASS = 150  # 7 taxa: 1,050 photographs, 20 % of them for validation


def train(out_dir: Path, seed: int = 0) -> Path:
    path = ic.train_on_simulated(KIND, out_dir, seed, PER_CLASS)
    write_golden(path, seed)
    return path


def write_golden(manifest_path: Path, seed: int = 0) -> dict[str, Any]:
    return ic.write_golden(KIND, manifest_path, seed)


def evaluate(seed: int = 1) -> dict[str, Any]:
    return ic.evaluate(KIND, seed)
