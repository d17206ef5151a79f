"""Identification time per photograph on one core, beside decoding the same JPEG (the baseline every
unit pays anyway), measured in the same run.

    python bench/identify.py [--photos 60] [--json]

For each shipped image classifier (wood, insects): a 640x480 JPEG the handheld's camera would deliver
is decoded (baseline), then identified (ImageClassifier.classify: quality checks, centre crop, resize,
normalise, ONNX inference on one thread, calibration, abstention). Figures are wall-clock and process
CPU ms per photo (median, p95); the goal is < 50 ms per photo including preprocessing.
`identify_figures()` is what bench/handheld.py calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2
import numpy as np

from bench.common import percentile
from customs_edge.models import default_manifest
from customs_edge.models.image_classifier import ImageClassifier
from customs_edge.simulators import specimens


def _timed(fn: Any, items: list[Any]) -> tuple[list[float], list[float], list[Any]]:
    wall, cpu, out = [], [], []
    for x in items:
        w0, c0 = time.perf_counter(), time.process_time()
        out.append(fn(x))
        wall.append((time.perf_counter() - w0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    return wall, cpu, out


def _fig(values: list[float]) -> dict[str, float]:
    return {"median": round(percentile(values, 50), 2), "p95": round(percentile(values, 95), 2)}


def identify_figures(photos: int = 60, kinds: tuple[str, ...] = ("wood", "insects")) -> dict[str, Any]:
    """{kind: {"identify_ms", "identify_cpu_ms", "decode_ms" (baseline), "abstained"}} on one core."""
    cv2.setNumThreads(1)
    out: dict[str, Any] = {}
    for kind in kinds:
        clf = ImageClassifier.load(default_manifest(kind), threads=1)
        labels = specimens.labels(kind)
        jpegs = []
        for n in range(photos):
            img = (specimens.wood_image if kind == "wood" else specimens.insect_image)(
                labels[n % len(labels)], 90_000 + n, 640, 480)
            jpegs.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1])
        clf.classify(cv2.imdecode(jpegs[0], cv2.IMREAD_COLOR))  # warm-up
        dw, dc, images = _timed(lambda b: cv2.imdecode(b, cv2.IMREAD_COLOR), jpegs)
        iw, ic, idents = _timed(clf.classify, images)
        out[kind] = {"photos": photos, "size": "640x480", "identify_ms": _fig(iw), "identify_cpu_ms": _fig(ic),
                     "decode_ms_baseline": _fig(dw), "decode_cpu_ms_baseline": _fig(dc),
                     "abstained": sum(1 for i in idents if i.label is None),
                     "goal_ms": 50.0}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=60)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    figures = identify_figures(a.photos)
    if a.json:
        print(json.dumps(figures, indent=2))
    else:
        for kind, f in figures.items():
            print(f"{kind}: identify {f['identify_ms']['median']} ms (cpu {f['identify_cpu_ms']['median']} ms, "
                  f"p95 {f['identify_ms']['p95']}), JPEG decode {f['decode_ms_baseline']['median']} ms")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
