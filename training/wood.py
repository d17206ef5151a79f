"""The shipped wood end-grain model: trained on photographs simulators.specimens generates, by the same
code as `customs-edge models train wood --images DIR` (training.image_classifier).

    python -m customs_edge.training.train wood      # rebuild models/wood/
    customs-edge models evaluate wood --json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from customs_edge.training import image_classifier as ic

KIND = "wood"
PER_CLASS = 100  # 12 species: 1,200 photographs, 20 % of them for validation


def train(out_dir: Path, seed: int = 0) -> Path:
    path = ic.train_on_simulated(KIND, out_dir, seed, PER_CLASS)
    write_golden(path, seed)
    return path


def write_golden(manifest_path: Path, seed: int = 0) -> dict[str, Any]:
    return ic.write_golden(KIND, manifest_path, seed)


def evaluate(seed: int = 1) -> dict[str, Any]:
    return ic.evaluate(KIND, seed)
