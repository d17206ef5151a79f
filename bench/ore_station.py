"""Ore station agent at real instrument rates: CPU share, memory, and inference time per spectrum.

    python bench/ore_station.py [--duration 90] [--speed 1] [--json]

Starts `customs-edge simulate ore-station` (real time by default: 4,000 t/h, one analyser result a
minute), then, against the same simulator at the same time:
  agent     `customs-edge run --config` with configs/ore-station.yaml: every driver polling at its
            configured rate (Modbus 0.5-1 s, balance 4 Hz, analyser push), the app, the SQLite outbox
            (FULL) and the sync to a local mosquitto (if installed; otherwise the sync just retries);
  raw       a baseline process doing the same wire exchanges with bare pyserial at the same rates
            and decoding nothing: the floor cost of the I/O in Python.
Both are measured from /proc over the same window, after a warm-up that excludes start-up:
  agent_cpu_pct / raw_cpu_pct   share of one core (goal for the agent: < 5 %), and their ratio
  agent_rss_mb / raw_rss_mb     resident memory at the end (goal for the agent: < 70 MB), peak too
  infer_ms                      onnxruntime, one spectrum per call (what the app does once a minute)
  infer_raw_ms                  the same PLS in numpy (preprocess + matmul), the raw baseline, and ratio
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import proc_cpu_s  # noqa: E402


def proc_mem_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB."""
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, kb = line.split()[:2]
            vals[key] = int(kb) / 1024
    return vals.get("VmRSS:", 0.0), vals.get("VmHWM:", 0.0)


def exchanges(urls: dict[str, Any]) -> list[dict[str, Any]]:
    """The wire exchanges the agent's config makes, as plain data for the raw poller:
    [{"url", "interval", "timeout", "exchanges": [[request hex, reply length or 0 for a line]]}]."""
    import yaml

    from customs_edge.drivers.modbus import ModbusRtuConfig, build_request, expected_length, plan_blocks

    cfg = yaml.safe_load((REPO / "configs" / "ore-station.yaml").read_text())
    jobs = []
    for role in ("belt_weigher", "moisture", "belt_portal"):
        mc = ModbusRtuConfig.model_validate({**cfg["drivers"][role], "port": urls[role]["socket"]})
        for s in mc.slaves:
            jobs.append({"url": mc.port, "interval": s.poll_interval_s, "timeout": mc.read_timeout_s,
                         "exchanges": [[build_request(s.id, b).hex(), expected_length(b)]
                                       for b in plan_blocks(s.points)]})
    jobs.append({"url": urls["scale"]["socket"], "interval": cfg["drivers"]["scale"]["poll_interval_s"],
                 "timeout": 0.2, "exchanges": [[b"SI\r\n".hex(), 0]]})
    return jobs


def raw_poller(spec: dict[str, Any], duration: float) -> None:
    """The baseline: the same requests at the same rates, bytes in, nothing decoded; only pyserial."""
    import serial

    ports: dict[str, Any] = {}
    jobs = []
    for j in spec["jobs"]:
        if j["url"] not in ports:
            ports[j["url"]] = serial.serial_for_url(j["url"], timeout=j["timeout"])
        jobs.append((j["interval"], ports[j["url"]], [(bytes.fromhex(r), n) for r, n in j["exchanges"]]))
    analyser = serial.serial_for_url(spec["analyser"], timeout=0)
    due = [time.monotonic()] * len(jobs)
    end = time.monotonic() + duration
    while time.monotonic() < end:
        i = min(range(len(jobs)), key=due.__getitem__)
        wait = due[i] - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, 0.05))
            analyser.read(65536)
            continue
        interval, port, exch = jobs[i]
        due[i] += interval
        for request, n in exch:
            port.reset_input_buffer()
            port.write(request)
            if n:
                port.read(n)
            else:
                port.read_until(b"\r\n", 64)


def inference_figures(reps: int = 2000) -> dict[str, float]:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from customs_edge.models import default_manifest
    from customs_edge.models.runtime import OnnxModel
    from customs_edge.simulators.ore_world import Composition, spectrum
    from customs_edge.training.ore_grade import preprocess

    manifest = default_manifest("ore_grade")
    model = OnnxModel(manifest)
    graph = onnx.load(str(manifest.parent / model.manifest.file)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    x = spectrum(Composition(fe=62.0, sio2=4.5, al2o3=2.2, h2o=8.0), np.random.default_rng(0)).reshape(1, -1)
    for _ in range(50):
        model.predict({"spectrum": x})
    t0 = time.perf_counter()
    for _ in range(reps):
        y = model.predict({"spectrum": x})["assay"]
    infer = (time.perf_counter() - t0) / reps * 1000
    bg, mean, coef, icpt = init["background"], init["x_mean"], init["coef"], init["intercept"]
    t0 = time.perf_counter()
    for _ in range(reps):
        y_raw = (preprocess(x, bg) - mean) @ coef + icpt
    raw = (time.perf_counter() - t0) / reps * 1000
    assert np.allclose(y, y_raw, atol=1e-3)
    return {"infer_ms": round(infer, 4), "infer_raw_ms": round(raw, 4), "infer_ratio": round(infer / raw, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=90.0, help="measured seconds (after the warm-up)")
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--speed", type=float, default=1.0, help="simulator time factor (1: real rates)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("--raw-poller", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.raw_poller:
        raw_poller(json.loads(args.raw_poller), args.duration)
        return
    run(args)


def run(args: argparse.Namespace) -> None:

    import yaml

    from customs_edge.hub.brokers import Mosquitto, mosquitto_path

    work = Path(tempfile.mkdtemp(prefix="bench-ore-"))
    procs: list[subprocess.Popen[Any]] = []
    broker = None
    try:
        sim = subprocess.Popen([sys.executable, "-m", "customs_edge", "simulate", "ore-station",
                                "--seed", str(args.seed), "--speed", str(args.speed), "--no-pty"],
                               stdout=subprocess.PIPE, text=True, cwd=REPO)
        procs.append(sim)
        assert sim.stdout is not None
        urls = json.loads(sim.stdout.readline())["urls"]
        if mosquitto_path():
            broker = Mosquitto(work / "broker", persistence=False).start()
        cfg = yaml.safe_load((REPO / "configs" / "ore-station.yaml").read_text())
        for role, eps in urls.items():
            cfg["drivers"][role]["port"] = eps["socket"]
        cfg["outbox"] = {"path": str(work / "outbox.db"), "synchronous": "FULL"}
        cfg["sync"] = {"port": broker.port if broker else 9, "ack_mode": "broker"}
        cfg["log_level"] = "WARNING"
        (work / "ore.yaml").write_text(yaml.safe_dump(cfg))
        total = args.warmup + args.duration
        agent = subprocess.Popen([sys.executable, "-m", "customs_edge", "run", "--config", str(work / "ore.yaml")],
                                 cwd=REPO, stdout=subprocess.DEVNULL, stderr=(work / "agent.log").open("wb"))
        spec = {"jobs": exchanges(urls), "analyser": urls["analyser"]["socket"]}
        raw = subprocess.Popen([sys.executable, __file__, "--raw-poller", json.dumps(spec),
                                "--duration", str(total + 5)], cwd=REPO)
        procs += [agent, raw]
        time.sleep(args.warmup)
        pids = {"agent": agent.pid, "raw": raw.pid, "sim": sim.pid}
        cpu0 = {k: proc_cpu_s(pid) for k, pid in pids.items()}
        t0 = time.monotonic()
        time.sleep(args.duration)
        wall = time.monotonic() - t0
        cpu = {k: (proc_cpu_s(pid) - cpu0[k]) / wall * 100 for k, pid in pids.items()}
        mem = {k: proc_mem_mb(pid) for k, pid in pids.items()}
        for proc in (agent, raw):
            if proc.poll() is not None:
                raise SystemExit(f"a measured process exited early (see {work}/agent.log)")
        agent.send_signal(signal.SIGTERM)
        agent.wait(15)
        db = sqlite3.connect(work / "outbox.db")
        produced = db.execute("SELECT seq FROM sqlite_sequence WHERE name='records'").fetchone()
        types = dict(db.execute("SELECT type, count(*) FROM records GROUP BY type").fetchall())
        db.close()
    finally:
        for proc in reversed(procs):  # the clients first, the simulator last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if broker:
            broker.stop()

    out: dict[str, Any] = {
        "duration_s": round(wall, 1), "speed": args.speed, "broker": "mosquitto" if broker else "none",
        "agent_cpu_pct": round(cpu["agent"], 2), "raw_cpu_pct": round(cpu["raw"], 2),
        "cpu_ratio": round(cpu["agent"] / max(cpu["raw"], 1e-6), 2),
        "agent_rss_mb": round(mem["agent"][0], 1), "agent_peak_rss_mb": round(mem["agent"][1], 1),
        "raw_rss_mb": round(mem["raw"][0], 1), "rss_ratio": round(mem["agent"][0] / mem["raw"][0], 2),
        "sim_cpu_pct": round(cpu["sim"], 2),
        "records_produced": produced[0] if produced else 0, "records_pending_by_type": types,
        **inference_figures(),
    }
    if args.json:
        print(json.dumps(out))
        return
    print(f"ore station agent over {out['duration_s']} s at speed {args.speed} (broker: {out['broker']})")
    print(f"  CPU    agent {out['agent_cpu_pct']:.2f} % of a core   raw pyserial poller {out['raw_cpu_pct']:.2f} %"
          f"   ratio {out['cpu_ratio']}   (goal < 5 %)")
    print(f"  RSS    agent {out['agent_rss_mb']} MB (peak {out['agent_peak_rss_mb']})   raw {out['raw_rss_mb']} MB"
          f"   ratio {out['rss_ratio']}   (goal < 70 MB)")
    print(f"  infer  {out['infer_ms']} ms per spectrum (onnxruntime, 1 thread)   numpy PLS {out['infer_raw_ms']} ms"
          f"   ratio {out['infer_ratio']}")
    print(f"  simulator {out['sim_cpu_pct']} % of a core; agent produced {out['records_produced']} records")


if __name__ == "__main__":
    main()
