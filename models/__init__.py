"""Models trained here from data the repo generates, exported to ONNX with a manifest.

Each model module (e.g. models/ore_grade.py) provides:
  train(out_dir: Path, seed: int = 0) -> Path      # writes <out_dir>/manifest.json and the .onnx file
  evaluate(seed: int = 1) -> dict                  # held-out figures on freshly simulated data
and ships its trained artefacts in models/<module_name>/ (manifest.json + .onnx), rebuilt by
`python -m models.train NAME` (or `all`). The agent loads them with agent.model.OnnxModel.
"""

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent


def default_manifest(module_name: str) -> Path:
    """The shipped manifest of a model module, e.g. default_manifest('ore_grade')."""
    return MODELS_DIR / module_name / "manifest.json"
