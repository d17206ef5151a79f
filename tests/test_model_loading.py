"""The model loader refuses every manifest that does not describe its model, always as ModelError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from customs_edge.core.errors import ModelError
from customs_edge.models import default_manifest
from customs_edge.models.runtime import OnnxModel


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    src = default_manifest("ore_grade").parent
    dst = tmp_path / "ore_grade"
    shutil.copytree(src, dst)
    return dst


def edit(model_dir: Path, change: dict) -> Path:
    path = model_dir / "manifest.json"
    m = json.loads(path.read_text())
    m["inputs"][0].update(change)
    path.write_text(json.dumps(m))
    return path


def test_the_shipped_manifest_loads(model_dir: Path) -> None:
    assert OnnxModel(model_dir / "manifest.json").manifest.name == "ore-grade"


@pytest.mark.parametrize("change", [{"dtype": "float64"}, {"dtype": "tensor(float)"}, {"shape": [None, 512]},
                                    {"name": "counts"}])
def test_a_manifest_that_lies_about_its_inputs_is_refused(model_dir: Path, change: dict) -> None:
    with pytest.raises(ModelError):
        OnnxModel(edit(model_dir, change))


@pytest.mark.parametrize("content", [b"\xff\xfe\x00", b"[" * 100_000, b"{}", b"null"])
def test_an_unreadable_manifest_is_a_model_error(model_dir: Path, content: bytes) -> None:
    (model_dir / "manifest.json").write_bytes(content)
    with pytest.raises(ModelError, match="bad manifest"):
        OnnxModel(model_dir / "manifest.json")
