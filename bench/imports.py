"""Resident memory a unit pays for what it imports, stage by stage, each in a fresh interpreter.

    python bench/imports.py [--json]

Explains an agent's RSS (bench/ore_station.py, bench/gate.py): the interpreter alone, the libraries
every unit loads (numpy, pydantic, paho with ssl, pyserial, yaml, sqlite3), our runtime, a unit type's
drivers and app, and onnxruntime with a model session. The raw baseline is the bare interpreter.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ORE = ("import customs_edge.agent.runtime, customs_edge.agent.apps.ore, customs_edge.drivers.modbus, "
       "customs_edge.drivers.mtsics, customs_edge.drivers.analyser")
STAGES: list[tuple[str, str]] = [
    ("python", "pass"),
    ("+ numpy", "import numpy"),
    ("+ pydantic", "import numpy, pydantic"),
    ("+ paho-mqtt (imports ssl)", "import numpy, pydantic, paho.mqtt.client"),
    ("+ pyserial, yaml, sqlite3", "import numpy, pydantic, paho.mqtt.client, serial, yaml, sqlite3"),
    ("+ customs-edge runtime", "import customs_edge.agent.runtime"),
    ("+ ore-station drivers and app", f"{ORE}"),
    ("+ onnxruntime", f"{ORE}, onnxruntime"),
    ("+ ore-grade model session", f"{ORE}\nfrom customs_edge.models.runtime import OnnxModel\n"
                                  "from customs_edge.models import default_manifest\n"
                                  "m = OnnxModel(default_manifest('ore_grade'))"),
]

PROBE = "\n{code}\nprint([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])"


def rss_kb(code: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE.format(code=code)], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    prev = None
    for name, code in STAGES:
        kb = rss_kb(code)
        rows.append({"stage": name, "rss_mb": round(kb / 1024, 1),
                     "added_mb": round((kb - prev) / 1024, 1) if prev is not None else None})
        prev = kb
    if args.json:
        print(json.dumps({"stages": rows, "baseline_mb": rows[0]["rss_mb"]}, indent=2))
        return
    for r in rows:
        added = f"{r['added_mb']:+6.1f}" if r["added_mb"] is not None else "      "
        print(f"{r['stage']:<32} {r['rss_mb']:6.1f} MB {added}")


if __name__ == "__main__":
    main()
