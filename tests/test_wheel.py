"""The wheel as a user gets it: built from this checkout, installed into a fresh venv outside it, and its
demo run from another directory with no PYTHONPATH: one import root with its configs and models as package
data, and every unit type delivering with nothing lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path, PurePosixPath

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
                                    ".hypothesis", "var")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m build --wheel` on a copy of the checkout (the build leaves build/ and *.egg-info behind)."""
    src = tmp_path_factory.mktemp("src") / "customs-edge"
    shutil.copytree(REPO, src, symlinks=True, ignore=NOT_SOURCE)
    dist = tmp_path_factory.mktemp("dist")
    res = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(src)],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (whl,) = dist.glob("customs_edge-*.whl")
    return whl


def test_wheel_has_one_import_root_with_its_configs_and_models(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    roots = {PurePosixPath(n).parts[0] for n in names}
    assert {r for r in roots if not r.endswith(".dist-info")} == {"customs_edge"}, roots
    configs = {n.removeprefix("customs_edge/configs/") for n in names if n.startswith("customs_edge/configs/")}
    assert {p.name for p in (REPO / "configs").glob("*.yaml")} <= configs
    manifests = sorted((REPO / "models").glob("*/manifest.json"))
    assert manifests
    for m in manifests:
        model = m.parent.name
        assert f"customs_edge/models/{model}/manifest.json" in names
        assert f"customs_edge/models/{model}/{json.loads(m.read_text())['file']}" in names


def requirements_of(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(name).decode()).get_all("Requires-Dist") or []


def link_dependencies(wheel: Path, dest: Path) -> None:
    """Link into `dest` the installed files of what the wheel requires (its Requires-Dist without extras,
    transitively) from this interpreter's environment, and nothing else: no download, and a dependency
    the wheel forgot to declare is missing in the venv as it would be for a user."""
    todo, seen = requirements_of(wheel), set()
    while todo:
        req = Requirement(todo.pop())
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        dist = metadata.distribution(name)
        todo += dist.requires or []
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            src = Path(str(dist.locate_file(top)))
            if src.exists() and not (dest / top).exists():
                (dest / top).symlink_to(src)


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_from_anywhere(wheel: Path, tmp_path: Path) -> None:
    assert not tmp_path.is_relative_to(REPO)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=120)
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    deps = tmp_path / "deps"
    deps.mkdir()
    link_dependencies(wheel, deps)
    (site / "dependencies.pth").write_text(f"{deps}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    where = subprocess.run([py, "-c", "import customs_edge; print(customs_edge.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr

    res = subprocess.run([venv / "bin" / "customs-edge", "demo", "--duration", "20", "--json",
                          "--workdir", str(tmp_path / "demo")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=200)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    unit_types = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert sorted(d["type"] for d in out["devices"].values()) == unit_types
    for device_id, d in out["devices"].items():
        assert d["produced"] > 0 and d["lost"] == 0 and d["delivered"] == d["produced"], (device_id, d)
