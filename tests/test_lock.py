"""requirements.lock (what systemd/install.sh installs with --require-hashes) covers every runtime dependency
of pyproject.toml and the build backend, each pinned with its hashes."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def requirement_name(spec: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    assert m, spec
    return norm(m.group(1))


def lock_entries() -> dict[str, list[str]]:
    """name -> its requirement (logical line, continuations joined), comments dropped."""
    text = re.sub(r"\\\n", " ", LOCK.read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip() if line.lstrip().startswith("#") else line.strip()
        if not line or line.startswith("#"):
            continue
        out.setdefault(requirement_name(line), []).append(line)
    return out


def test_every_runtime_dependency_and_the_build_backend_are_locked() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = {requirement_name(d) for d in project["project"]["dependencies"]}
    wanted |= {requirement_name(d) for d in project["build-system"]["requires"]}
    missing = wanted - set(lock_entries())
    assert not missing, f"not in requirements.lock: {sorted(missing)}: regenerate it (docs/hardening.md)"


def test_every_locked_requirement_is_pinned_with_hashes() -> None:
    entries = lock_entries()
    assert len(entries) > 10
    for name, lines in entries.items():
        assert len(lines) == 1, f"{name} twice"
        line = lines[0]
        assert re.match(r"^[A-Za-z0-9._-]+==[^\s;]+ ", line), f"{name}: not pinned with ==: {line[:80]}"
        hashes = re.findall(r"--hash=sha256:([0-9a-f]+)", line)
        assert hashes and all(len(h) == 64 for h in hashes), f"{name}: no sha256 --hash"


def test_install_sh_installs_from_the_lock_with_hashes_only() -> None:
    text = (ROOT / "systemd" / "install.sh").read_text()
    pip_lines = [line for line in text.splitlines() if "/pip\" install" in line or "/pip install" in line]
    assert any("--require-hashes -r \"$src/requirements.lock\"" in line for line in pip_lines), pip_lines
    assert all("--require-hashes" in line or ("--no-deps" in line and "--no-build-isolation" in line)
               for line in pip_lines), pip_lines
