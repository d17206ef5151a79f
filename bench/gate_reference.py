"""Gate: what the blackbody reference costs per frame, against the same app without it, in one run.

    python bench/gate_reference.py [--frames 4800] [--json]

N frames of a 2,000 travellers/h lane with a drifting camera and a blackbody (simulators.gate_world,
rendered beforehand, not timed) go through GateApp.feed twice on one core: once with `reference`
configured (correction, blanking, rolling statistics, validity tags) and once without (the baseline).
  app_us / baseline_us   per frame; ratio = app_us / baseline_us; fps_one_core = 1e6 / app_us
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.gate import pin_one_core  # noqa: E402


def run(n_frames: int, seed: int = 3) -> dict[str, Any]:
    import numpy as np

    from customs_edge.agent.apps.gate import GateApp, GateAppConfig
    from customs_edge.agent.apps.gate_reference import ReferenceConfig
    from customs_edge.core.readings import ThermalFrame
    from customs_edge.simulators.gate_world import GateWorld, WorldParams
    from customs_edge.training.fever import BLACKBODY

    world = GateWorld(seed, WorldParams(rate_per_h=2000, camera_offset_c=1.5, camera_drift_k=1.0,
                                        blackbody=BLACKBODY))
    times = np.arange(n_frames) / 8.0
    frames = np.round(world.render(times), 2)
    readings = [ThermalFrame(source="thermal", mono=float(t), pixels=f, ambient_c=25.0)
                for t, f in zip(times, frames, strict=True)]
    r0, r1, c0, c1 = BLACKBODY
    timings: dict[str, float] = {}
    screened: dict[str, int] = {}
    for name, ref in (("baseline", None), ("app", ReferenceConfig(rows=(r0, r1), cols=(c0, c1), setpoint_c=35.0))):
        app = GateApp("bench", GateAppConfig(summary_interval_s=60, reference=ref))
        start = time.perf_counter()
        for r in readings:
            app.feed(r)
            app.tick(r.mono)
        timings[name] = (time.perf_counter() - start) / n_frames * 1e6
        screened[name] = app.totals["screened"]
    return {"frames": n_frames, "app_us": round(timings["app"], 1), "baseline_us": round(timings["baseline"], 1),
            "ratio": round(timings["app"] / timings["baseline"], 2), "fps_one_core": round(1e6 / timings["app"]),
            "screened": screened["app"], "screened_baseline": screened["baseline"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=4800)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    pin_one_core()
    result = run(args.frames)
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
