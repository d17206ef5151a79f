"""The handheld's memory levers (docs/handheld.md, "Memory"; figures: bench/handheld.py unit_rss_mb): model
sessions without onnxruntime's arena, glibc's malloc thresholds fixed, biip's company prefix table compact,
start-up code pages of the big native libraries released. Each test fails without its lever; the ones that
change process-wide state run in a subprocess of their own."""

from __future__ import annotations

import json
import lzma
import os
import random
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from customs_edge.models import default_manifest
from customs_edge.models.runtime import OnnxModel

ROOT = Path(__file__).resolve().parent.parent


def run_py(code: str) -> dict[str, Any]:
    """Run `code` in a fresh interpreter from the repository root; it prints one JSON line, returned."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}  # glibc's defaults
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_model_sessions_run_without_onnxruntimes_cpu_arena() -> None:
    # with the arena, activations freed after an inference stay in onnxruntime's own pool (~12 MB for the two
    # classifiers); without it they go back to malloc, and from there to the kernel (the next test)
    opts = OnnxModel(default_manifest("wood")).session.get_session_options()
    assert opts.enable_cpu_mem_arena is False
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)


ALLOC = """
import ctypes, json
from customs_edge.agent.memory import fixed_malloc_thresholds
fixed = {fixed}
if fixed:
    assert fixed_malloc_thresholds()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
def touch(p, n):
    ctypes.memset(p, 1, n)
big = libc.malloc(8 << 20); touch(big, 8 << 20); libc.free(big)  # a frame-sized block, mapped and unmapped
p = libc.malloc(2 << 20); touch(p, 2 << 20)                       # then a smaller one, freed again
before = anon(); libc.free(p); after = anon()
print(json.dumps({{"returned_kb": before - after}}))
"""


def test_fixed_malloc_thresholds_return_freed_buffers_to_the_kernel() -> None:
    # glibc's default: freeing the 8 MB block raises its mmap threshold to 8 MB, so the 2 MB block comes from
    # the heap and stays resident once freed; with the threshold fixed it is mapped and unmapped
    assert run_py(ALLOC.format(fixed=False))["returned_kb"] < 512
    assert run_py(ALLOC.format(fixed=True))["returned_kb"] >= 1800


def test_the_compact_company_prefix_table_answers_exactly_as_biips_own() -> None:
    from biip import gs1_prefixes
    from biip.gs1_prefixes import GS1CompanyPrefix

    import customs_edge.drivers.scanner  # noqa: F401  (compacts biip's table at import)
    from customs_edge.drivers.gs1_prefixes import CompactTrieNode

    small = gs1_prefixes._GS1_COMPANY_PREFIX_TRIE
    assert isinstance(small, CompactTrieNode)
    data = resources.files("biip") / "gs1_prefixes" / "_company_prefix_trie.json.lzma"
    original = json.loads(lzma.decompress(data.read_bytes()).decode())

    prefixes: list[str] = []  # every prefix in GS1's list, found by walking biip's own dict trie

    def walk(node: Any, path: str) -> None:
        for digit, child in node.items():
            if isinstance(child, dict):
                walk(child, path + digit)
            else:
                prefixes.append(path + digit)

    walk(original, "")
    assert len(prefixes) > 100_000
    rng = random.Random(7)
    values = [p + "".join(rng.choice("0123456789") for _ in range(13 - len(p))) if len(p) < 13 else p
              for p in prefixes]
    values += ["".join(rng.choice("0123456789") for _ in range(rng.randint(1, 18))) for _ in range(20_000)]
    values += ["0", "9", "7044610873466", "12345678901234567890"]
    try:
        gs1_prefixes._GS1_COMPANY_PREFIX_TRIE = original  # biip's answers with its own table ...
        want = [GS1CompanyPrefix.extract(v) for v in values]
    finally:
        gs1_prefixes._GS1_COMPANY_PREFIX_TRIE = small
    got = [GS1CompanyPrefix.extract(v) for v in values]  # ... and with the compact one
    assert got == want
    assert sum(w is None for w in want) > 100 and sum(w is not None for w in want) > 100_000


def test_the_compact_trie_refuses_what_is_not_a_digit_trie() -> None:
    from customs_edge.drivers.gs1_prefixes import compact

    with pytest.raises(ValueError, match="key"):
        compact({"a": 1})
    with pytest.raises(ValueError, match="leaf"):
        compact({"1": [3, "x"]})
    node = compact({"1": {"2": 0, "3": 7}, "4": 5})
    assert "1" in node and "2" not in node and "x" not in node and 1 not in node
    assert node["4"] == 5 and node["1"]["3"] == 7 and node["1"]["2"] == 0 and len(node) == 2
    with pytest.raises(KeyError):
        node["9"]


RELEASE = """
import json
import numpy as np
from customs_edge.agent.memory import release_startup_code
from customs_edge.models import default_manifest
from customs_edge.models.runtime import OnnxModel
def resident(lib):
    kb, cur = 0, ""
    for line in open("/proc/self/smaps"):
        p = line.split()
        if p and "-" in p[0] and not p[0].endswith(":"):
            cur = p[5] if len(p) > 5 else ""
        elif p[0] == "Rss:" and lib in cur:
            kb += int(p[1])
    return kb
m = OnnxModel(default_manifest("wood"))
x = {t.name: np.random.default_rng(1).random([1, *t.shape[1:]]).astype(np.float32) for t in m.manifest.inputs}
before = m.predict(x)
kb0 = resident("onnxruntime_pybind11_state")
released = release_startup_code("onnxruntime_pybind11_state")
kb1 = resident("onnxruntime_pybind11_state")
after = m.predict(x)
same = all(np.array_equal(before[k], after[k]) for k in before)
print(json.dumps({"released_kb": released >> 10, "kb0": kb0, "kb1": kb1, "same": same,
                  "again": release_startup_code("no-such-library")}))
"""


def test_released_startup_code_comes_back_from_the_file_and_inference_is_unchanged() -> None:
    r = run_py(RELEASE)
    assert r["released_kb"] > 4096 and r["kb1"] < r["kb0"] - 4096, r
    assert r["same"] is True  # the same outputs, bit for bit, from the code mapped back in
    assert r["again"] == 0


def test_the_handheld_app_applies_the_levers(monkeypatch: pytest.MonkeyPatch) -> None:
    from customs_edge.agent.apps import handheld

    calls: list[str] = []
    monkeypatch.setattr(handheld, "fixed_malloc_thresholds", lambda: calls.append("thresholds") or True)
    monkeypatch.setattr(handheld, "release_startup_code", lambda lib: calls.append(lib) or 0)
    handheld.HandheldApp("hh-mem", handheld.HandheldConfig(models=["wood"]))
    assert calls[0] == "thresholds"
    assert "onnxruntime_pybind11_state" in calls and "cv2.abi3" in calls


def test_a_handheld_without_models_or_camera_pays_for_neither_onnxruntime_nor_opencv() -> None:
    # onnxruntime is ~30 MB and OpenCV ~15 MB of a unit's RSS (docs/handheld.md, "Memory"): a scanner-only unit
    # (models: [], no camera) must not import them; nor the simulators, the hub or the training code
    r = run_py("""
import json, sys
from customs_edge.agent.apps.handheld import HandheldApp, HandheldConfig
app = HandheldApp("hh-scan-only", HandheldConfig(models=[]))
heavy = ("onnxruntime", "cv2", "zxingcpp", "customs_edge.models.image_classifier", "customs_edge.simulators.handheld",
         "customs_edge.hub.service", "customs_edge.training.image_classifier")
print(json.dumps({"imported": [m for m in heavy if m in sys.modules]}))
""")
    assert r["imported"] == []
