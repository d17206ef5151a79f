"""CPU an agent uses while its broker is unreachable, beside an idle Python process in the same run.

    python bench/idle.py [--seconds 20] [--what sync|unit] [--json]

Two child processes run side by side for the same window:
  baseline  a Python process whose one extra thread waits on an event: the floor of an idle process
  sync      the agent's sync thread with a real SQLite outbox and a broker port nothing listens on
            (default backoff, 0.5 s to 30 s); the main thread commits 10 records every second and
            wakes the sync, as the unit's core does
  unit      a whole scale unit (driver, app, outbox, sync) reading a simulated Toledo scale at 50
            frames/s, the simulator running in this parent process, the broker down
Each child measures its own process CPU time over the window (after its setup) and prints it; the
parent prints cpu_pct (share of one core, %) of both and the sync's connection attempts; for a unit,
also each thread's share (/proc/self/task), so the sync's part can be told from the driver's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CpuMeter
from customs_edge.hub.brokers import free_port


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds used so far by each live thread of this process, by thread name (Linux /proc)."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for t in threading.enumerate():
        try:
            fields = Path(f"/proc/self/task/{t.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[t.name] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def child(what: str, seconds: float, port: int, scale_url: str, workdir: Path) -> dict[str, Any]:
    stop = threading.Event()
    if what == "baseline":
        waiter = threading.Thread(target=stop.wait)
        waiter.start()
        meter = CpuMeter().start()
        time.sleep(seconds)
        out: dict[str, Any] = {"cpu_pct": 100 * meter.stop()}
        stop.set()
        return out
    from customs_edge.agent.config import SyncConfig, parse_unit_config
    from customs_edge.agent.outbox import SqliteOutbox
    from customs_edge.agent.runtime import Unit
    from customs_edge.agent.sync import Sync
    from customs_edge.core.records import RecordIn

    if what == "sync":
        outbox = SqliteOutbox(workdir / "outbox.db")
        sync = Sync("bench", outbox, SyncConfig(port=port), outbox_path=workdir / "outbox.db")
        thread = threading.Thread(target=sync.run, args=(stop,))
        thread.start()
        meter = CpuMeter().start()
        t_end = time.monotonic() + seconds
        while (left := t_end - time.monotonic()) > 0:
            time.sleep(min(1.0, left))
            outbox.put([RecordIn(type="bench", payload={"i": i}) for i in range(10)])
            sync.wake.set()
        out = {"cpu_pct": 100 * meter.stop(), "sync": sync.stats.__dict__.copy()}
        stop.set()
        thread.join(5)
        outbox.close()
        return out
    cfg = parse_unit_config({
        "device_id": "bench-idle", "type": "scale",
        "drivers": {"scale": {"driver": "toledo-continuous", "port": scale_url}},
        "outbox": {"path": str(workdir / "outbox.db")}, "sync": {"port": port}})
    unit = Unit(cfg)
    unit.start()
    time.sleep(2.0)  # the driver connected and reads
    meter, before = CpuMeter().start(), thread_cpu_s()
    time.sleep(seconds)
    share = meter.stop()
    per_thread = {k: round(100 * (v - before.get(k, 0.0)) / seconds, 3) for k, v in thread_cpu_s().items()}
    out = {"cpu_pct": 100 * share, "sync": unit.sync.stats.__dict__.copy(), "committed": unit.committed,
           "threads_cpu_pct": per_thread}
    unit.stop()
    return out


def run(seconds: float, what: str) -> dict[str, Any]:
    port = free_port()  # nothing listens there: connection refused at once, as with a stopped broker
    with tempfile.TemporaryDirectory() as tmp:
        sim = None
        url = ""
        if what == "unit":
            from customs_edge.simulators.base import Endpoints
            from customs_edge.simulators.scale import ScaleSim, ScaleWorld

            sim = Endpoints(ScaleSim(ScaleWorld(seed=3, cycle_s=5.0), rate_hz=50))
            url = sim.start()["socket"]
        procs = {}
        for name in ("baseline", what):
            work = Path(tmp) / name
            work.mkdir()
            procs[name] = subprocess.Popen(
                [sys.executable, __file__, "--child", name, "--seconds", str(seconds), "--port", str(port),
                 "--scale-url", url, "--workdir", str(work)], stdout=subprocess.PIPE, text=True)
        results = {}
        for name, p in procs.items():
            stdout, _ = p.communicate(timeout=seconds + 60)
            if p.returncode:
                raise SystemExit(f"{name} child failed with exit code {p.returncode}")
            results[name] = json.loads(stdout.strip().splitlines()[-1])
        if sim:
            sim.stop()
    agent = results[what]
    return {"what": what, "seconds": seconds, "broker": f"127.0.0.1:{port} (closed)",
            "cpu_pct": round(agent["cpu_pct"], 3), "baseline_cpu_pct": round(results["baseline"]["cpu_pct"], 3),
            "connect_attempts": agent["sync"]["connect_failures"],
            **({"records_committed": agent["committed"], "threads_cpu_pct": agent["threads_cpu_pct"]}
               if what == "unit" else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--what", choices=["sync", "unit"], default="sync")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=["baseline", "sync", "unit"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--scale-url", default="", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.seconds, args.port, args.scale_url, args.workdir)))
        return
    result = run(args.seconds, args.what)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>18}: {v}")


if __name__ == "__main__":
    main()
