"""ore-grade model: held-out accuracy with thresholds a broken model fails, retraining from scratch,
and refusal of a tampered or mis-described model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from customs_edge.core.errors import ModelError
from customs_edge.models import default_manifest
from customs_edge.models.runtime import OnnxModel, sha256_file
from customs_edge.training.ore_grade import build_onnx, empty_background, evaluate, fit, preprocess, train

# Held-out limits per output: RMSE and |bias| in percentage points, and the correlation with the
# truth across the lot's minutes (a model that learnt nothing does not follow the holds' changes).
LIMITS = {"Fe": (0.45, 0.3), "SiO2": (0.3, 0.25), "H2O": (0.3, 0.2)}
MIN_R = 0.7


def passes(metrics: dict) -> bool:
    return all(metrics[k]["rmse"] < rmse and abs(metrics[k]["bias"]) < bias and metrics[k]["r"] > MIN_R
               for k, (rmse, bias) in LIMITS.items())


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("ore_grade"), seed=11, n=2500)


def test_shipped_model_meets_limits_on_a_fresh_lot() -> None:
    m = evaluate(seed=5)
    assert m["spectra"] >= 60
    assert passes(m), m


def test_evaluate_is_deterministic() -> None:
    assert evaluate(seed=6) == evaluate(seed=6)


def test_retrained_model_meets_limits(retrained: Path) -> None:
    manifest = json.loads(retrained.read_text())
    assert manifest["name"] == "ore-grade"
    assert manifest["inputs"][0]["shape"] == [None, 1024] and manifest["outputs"][0]["shape"] == [None, 3]
    assert manifest["sha256"] == sha256_file(retrained.parent / manifest["file"])
    assert passes(manifest["metrics"]["held_out"])
    assert passes(evaluate(seed=8, manifest=retrained))
    assert (retrained.parent / "ore_grade.onnx").stat().st_size < 1_000_000


@pytest.fixture(scope="module")
def small_fit() -> dict:
    return fit(n=600, seed=11)


def broken(tmp: Path, src: Path, how: str, small_fit: dict) -> Path:
    """A model with its coefficients broken, and a manifest that matches it."""
    parts = dict(small_fit)
    coef = parts["coef"]
    if how == "shuffled":
        coef = np.random.default_rng(0).permutation(coef)
    elif how == "constant":
        coef = np.zeros_like(coef)
    elif how == "no_background":
        parts["background"] = np.zeros_like(parts["background"])
    (tmp / "ore_grade.onnx").write_bytes(build_onnx(parts["background"], parts["x_mean"], coef, parts["intercept"]))
    manifest = json.loads(src.read_text())
    manifest["sha256"] = sha256_file(tmp / "ore_grade.onnx")
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    return tmp / "manifest.json"


@pytest.mark.parametrize("how", ["intact", "shuffled", "constant", "no_background"])
def test_limits_catch_a_broken_model(tmp_path: Path, retrained: Path, how: str, small_fit: dict) -> None:
    m = evaluate(seed=5, manifest=broken(tmp_path, retrained, how, small_fit))
    assert passes(m) == (how == "intact"), m


def test_onnx_graph_matches_numpy(retrained: Path, small_fit: dict) -> None:
    parts = small_fit
    path = retrained.parent / "check.onnx"
    path.write_bytes(build_onnx(parts["background"], parts["x_mean"], parts["coef"], parts["intercept"]))
    manifest = json.loads(retrained.read_text())
    manifest.update(file="check.onnx", sha256=sha256_file(path))
    (retrained.parent / "check.json").write_text(json.dumps(manifest))
    model = OnnxModel(retrained.parent / "check.json")
    rng = np.random.default_rng(1)
    x = (rng.poisson(400, (4, 1024)) + empty_background(5)).astype(np.float32)
    want = (preprocess(x, parts["background"]) - parts["x_mean"]) @ parts["coef"] + parts["intercept"]
    np.testing.assert_allclose(model.predict({"spectrum": x})["assay"], want, rtol=1e-4, atol=1e-3)


def copy_model(tmp: Path) -> Path:
    src = default_manifest("ore_grade").parent
    for f in src.iterdir():
        shutil.copy(f, tmp / f.name)
    return tmp / "manifest.json"


def test_tampered_model_is_refused(tmp_path: Path) -> None:
    manifest = copy_model(tmp_path)
    onnx = tmp_path / "ore_grade.onnx"
    data = bytearray(onnx.read_bytes())
    data[-10] ^= 0x01
    onnx.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        OnnxModel(manifest)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("inputs", [{"name": "spectrum", "shape": [None, 512], "dtype": "float32"}], "shape"),
    ("outputs", [{"name": "assay", "shape": [None, 4], "dtype": "float32"}], "shape"),
    ("inputs", [{"name": "counts", "shape": [None, 1024], "dtype": "float32"}], "names"),
])
def test_manifest_that_does_not_describe_the_model_is_refused(tmp_path: Path, field: str, value: list,
                                                              match: str) -> None:
    manifest = copy_model(tmp_path)
    doc = json.loads(manifest.read_text())
    doc[field] = value
    manifest.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match=match):
        OnnxModel(manifest)
