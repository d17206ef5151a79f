"""What a simulated fleet costs its own machine: CPU per unit-record of `customs-edge fleet simulate`
(agent/simfleet.py), beside the hub's and mosquitto's CPU per record in the same run.

    python bench/simfleet.py [--units 100] [--rate 5] [--processes 1] [--warmup 8] [--seconds 15] [--json]

A real mosquitto (persistence off) and one `customs-edge hub` worker on SQLite; `--processes` simulator
processes share `--units` units at `--rate` records/s each. After `--warmup` s (the connect storm, key files),
for `--seconds`: the CPU (user + system, from /proc) each process used, divided by the records acked in that
window (the simulators' own latency files count them). CPU time holds when other work shares the cores,
unlike wall time: `sim_cpu_us_per_record` says how many unit-records/s one core of simulators can drive
(10^6 / it). Baselines in the same run: the hub's and mosquitto's CPU per record (the work being measured
when bench/hub.py runs the fleet).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import proc_cpu_s as cpu_s
from bench.hub import ENV, Workers, log, machine_cpu_s, sim_dir, stop_all
from customs_edge.hub.brokers import Mosquitto


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    broker = Mosquitto(work / "broker", persistence=False).start()
    ws = Workers(1, str(work / "hub.db"), broker.port, work)
    per = [args.units // args.processes + (1 if p < args.units % args.processes else 0) for p in range(args.processes)]
    files = [work / f"lat-{p}.json" for p in range(args.processes)]
    units_dir = sim_dir(work, "units")
    sims = [subprocess.Popen(
        [sys.executable, "-m", "customs_edge", "fleet", "simulate", "--units", str(n), "--rate", str(args.rate),
         "--prefix", f"cpu{p}", "--broker", f"127.0.0.1:{broker.port}", "--workdir", str(units_dir / str(p)),
         "--duration", str(args.warmup + args.seconds + 2), "--warmup", str(args.warmup), "--latencies", str(f),
         "--every", "1000000", "--json", *args.sim_args], env=ENV, stdout=subprocess.PIPE,
        stderr=(work / f"sim-{p}.log").open("wb"))
        for p, (n, f) in enumerate(zip(per, files, strict=True))]
    mosq = broker.proc.pid if getattr(broker, "proc", None) else None
    try:
        t0 = time.monotonic()
        time.sleep(args.warmup)
        s0, h0, m0, a0 = sum(cpu_s(s.pid) for s in sims), ws.cpu_s(), cpu_s(mosq) if mosq else 0.0, machine_cpu_s()
        w0 = time.monotonic()
        time.sleep(args.seconds)
        s1, h1, m1, a1 = sum(cpu_s(s.pid) for s in sims), ws.cpu_s(), cpu_s(mosq) if mosq else 0.0, machine_cpu_s()
        w1 = time.monotonic()
        load = os.getloadavg()[0]
        for s in sims:
            s.wait(args.warmup + args.seconds + 60)
        finals = [json.loads((s.stdout.read() if s.stdout else b"").decode().splitlines()[-1]) for s in sims]
        # records acked from the warmup on, over a window a little longer than ours (the sims run 2 s on):
        # scaled to ours by the acked rate
        lat = [x for f in files for x in json.loads(f.read_text())]
        window = sum(f["latency_window_s"] for f in finals) / len(finals)
        acked = len(lat) / window * (w1 - w0)
    finally:
        stop_all(sims, ws, broker, units_dir, work)
    lat.sort()
    out = {"units": args.units, "processes": args.processes, "rate_per_unit": args.rate,
           "offered_records_per_s": args.units * args.rate, "acked_records_per_s": round(acked / (w1 - w0)),
           "sim_cpu_us_per_record": round((s1 - s0) / acked * 1e6, 1),
           "sim_cores": round((s1 - s0) / (w1 - w0), 2),
           "hub_cpu_us_per_record": round((h1 - h0) / acked * 1e6, 1),
           "mosquitto_cpu_us_per_record": round((m1 - m0) / acked * 1e6, 1) if mosq else None,
           "ack_latency_p50_ms": lat[len(lat) // 2] if lat else None,
           "ack_latency_p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
           "connected_at_end": sum(f["connected"] for f in finals), "pending_at_end": sum(f["pending"] for f in finals),
           "other_work_cores": round(max(0.0, (a1 - a0) - (s1 - s0) - (h1 - h0) - (m1 - m0)) / (w1 - w0), 2),
           "seconds": round(w1 - w0, 1), "since_start_s": round(w1 - t0, 1), "loadavg_1m": load}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=100)
    ap.add_argument("--rate", type=float, default=5.0)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--warmup", type=float, default=8.0)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--sim-arg", dest="sim_args", action="append", default=[],
                    help="passed on to `fleet simulate` (repeat: --sim-arg=--put-every --sim-arg=0.2)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from customs_edge.agent.simfleet import raise_fd_limit

    raise_fd_limit()
    out: dict[str, Any] = {"cores": os.cpu_count(), "loadavg_1m_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench-simfleet-") as tmp:
        out.update(measure(args, Path(tmp)))
    log(f"simfleet: {out}")
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
