"""CPU cost of health telemetry on a unit, beside an empty loop measured in the same run.

    python bench/health.py [--calls 2000] [--pending 10000]

One health message as the sync makes it when due: HealthSampler.sample() (a real SQLite outbox holding
`--pending` records, /proc and statvfs reads, the thermal zones, three drivers, two models) and its JSON
encoding. Prints JSON: CPU time per message (process time, µs) beside the same loop calling a no-op,
and what that costs at the default interval (60 s) and at 1 s, in % of one core (the goal: < 0.5 %).
A driver going up or down adds one message each time; the MQTT publish itself is not included.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from customs_edge.agent.config import parse_unit_config
from customs_edge.agent.health import HealthSampler
from customs_edge.agent.outbox import SqliteOutbox
from customs_edge.core.records import RecordIn


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    cpu0 = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - cpu0) / calls * 1e6


def run(calls: int, pending: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "outbox.db"
        cfg = parse_unit_config({"device_id": "bench", "type": "scale", "outbox": {"path": str(path)},
                                 "drivers": {"scale": {"driver": "toledo-continuous", "port": "/dev/null"}}})
        outbox = SqliteOutbox(path, device_id="bench")
        for i in range(0, pending, 1000):
            outbox.put([RecordIn(type="bench", payload={"i": j}) for j in range(i, min(pending, i + 1000))])
        drivers = {r: {"up": True, "frames": 123456, "corrupt": 3, "faults": 1, "opened": 2, "bytes_in": 9 << 20}
                   for r in ("scale", "camera", "gps")}
        sampler = HealthSampler(cfg, outbox, lambda: drivers, lambda: {"ore-grade": "1.0.0", "fever": "2.1.0"})
        message = sampler.sample((0.001, 0.002)).model_dump_json()

        def health() -> object:
            return sampler.sample((0.001, 0.002)).model_dump_json()

        def noop() -> object:
            return None

        health()  # warm: imports, first statements prepared
        baseline_us = per_call_us(noop, calls)
        sample_us = per_call_us(health, calls)
        outbox.close()
    return {"calls": calls, "pending_records": pending, "message_bytes": len(message),
            "baseline_us": round(baseline_us, 3), "sample_us": round(sample_us, 1),
            "cpu_pct_at_60s": round(100 * sample_us / 60e6, 6), "cpu_pct_at_1s": round(100 * sample_us / 1e6, 4),
            "goal_cpu_pct": 0.5}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--pending", type=int, default=10000, help="records waiting in the outbox")
    ap.add_argument("--json", action="store_true", help="(the output is always JSON)")
    args = ap.parse_args()
    print(json.dumps(run(args.calls, args.pending), indent=2))


if __name__ == "__main__":
    main()
