"""Gate: frames per second the app processes on one core, CPU share at the sensor's real 8 Hz, memory.

    python bench/gate.py [--frames 4800] [--res-frames 1200] [--link-seconds 20] [--json]

Two measurements, both pinned to one core, each with a raw baseline measured in the same run:
  pipeline  N frames of a lane at 2,000 travellers/h from simulators.gate_world (rendered beforehand,
            not timed) go through the wire decoder (Mlx90640Parser on the encoded bytes) and the gate
            app (tracker + ONNX model + records) exactly as the runtime feeds it.
              parse_us, app_us      per frame; fps_one_core = 1e6 / (parse_us + app_us)
              raw_us                baseline: the same frames through numpy's max() (touch every pixel)
              ratio                 (parse_us + app_us) / raw_us
  link      `customs-edge simulate gate` in its own process streams at 8 Hz over a pty for S seconds;
            this process runs the MLX90640 driver + the app on it (as the runtime's threads would).
              link_cpu_pct          share of one core this process used (goal: < 20 %)
              link_raw_cpu_pct      baseline: bare pyserial reading the same stream, decoding nothing
              link_fps              frames the driver delivered per second (goal: >= 8, the sensor's rate)
  resolutions  per camera optics (MLX90640 32x24, Lepton 3.5 160x120, 384x288): N frames of the same lane
            rendered for that camera, encoded in its wire format (GY-MCU90640 frames / raw Y16 frames), decoded
            by its driver's parser and run through the gate app with that optics' model (the tracker alone,
            `app: "tracker only"`, for an optics without a shipped model).
              us_per_frame, fps_one_core, cpu_pct_at_rate (at the camera's own rate), cpu_pct_at_9hz
              raw_us                baseline: numpy's max() over the same frames
  lepton_link  `customs-edge simulate gate --camera lepton35` in its own process streams raw Y16 frames at
            8.7 Hz over TCP; this process runs the thermal-raw driver + the app on them.
              cpu_pct, fps, raw_cpu_pct (bare socket reads of the same stream)
  link_rss_mb            resident memory after the link run: driver, app, tracker, onnxruntime, cv2, numpy
  rss_mb / peak_rss_mb   after the pipeline too (it holds N rendered frames three times over)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import CpuMeter, peak_rss_mb, rss_mb  # noqa: E402


def pin_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import cv2

    cv2.setNumThreads(1)


def pipeline(n_frames: int, seed: int = 3) -> dict[str, Any]:
    import numpy as np

    from customs_edge.agent.apps.gate import GateApp, GateAppConfig
    from customs_edge.core.readings import ThermalFrame
    from customs_edge.drivers.mlx90640 import Mlx90640Parser, encode
    from customs_edge.simulators.gate_world import GateWorld, WorldParams

    world = GateWorld(seed, WorldParams(rate_per_h=2000))
    times = np.arange(n_frames) / 8.0
    frames = world.render(times)
    wire = [encode(f, world.sensor_ambient(float(t))) for f, t in zip(frames, times, strict=True)]

    parser = Mlx90640Parser()
    cpu0 = time.process_time()
    decoded = []
    for raw in wire:
        parser.feed(raw)
        f = parser.next()
        assert f is not None
        decoded.append(f)
    parse_s = time.process_time() - cpu0

    app = GateApp("bench", GateAppConfig(summary_interval_s=60))
    records = 0
    cpu0 = time.process_time()
    for t, f in zip(times.tolist(), decoded, strict=True):
        r = ThermalFrame(source="thermal", mono=t, pixels=f.pixels, ambient_c=f.ambient_c, dead_pixels=f.dead)
        records += len(app.feed(r)) + len(app.tick(t))
    app_s = time.process_time() - cpu0

    cpu0 = time.process_time()
    acc = 0.0
    for f in decoded:
        acc += float(f.pixels.max())
    raw_s = time.process_time() - cpu0

    n = len(decoded)
    parse_us, app_us, raw_us = parse_s / n * 1e6, app_s / n * 1e6, raw_s / n * 1e6
    return {"frames": n, "travellers": sum(1 for tr in world.truth if tr.t_out_view < times[-1]),
            "screened": app.totals["screened"], "records": records,
            "parse_us": round(parse_us, 1), "app_us": round(app_us, 1), "raw_us": round(raw_us, 2),
            "fps_one_core": round(1e6 / (parse_us + app_us)), "ratio": round((parse_us + app_us) / raw_us, 1),
            "cpu_pct_at_8hz": round(8 * (parse_us + app_us) / 1e4, 2)}


def resolutions(n_frames: int, seed: int = 3) -> dict[str, Any]:
    import numpy as np

    from customs_edge.agent.apps.gate import GateApp, GateAppConfig
    from customs_edge.agent.apps.gate_tracker import Tracker
    from customs_edge.core.readings import ThermalFrame
    from customs_edge.drivers.mlx90640 import Mlx90640Parser, encode
    from customs_edge.drivers.thermal_raw import RawFrameParser
    from customs_edge.models import MODELS_DIR
    from customs_edge.simulators.gate_world import OPTICS, GateWorld, WorldParams
    from customs_edge.simulators.wire import thermal_raw
    from customs_edge.training.fever import model_dir_name

    out: dict[str, Any] = {}
    for optics in OPTICS.values():
        n = max(50, round(n_frames / max(1.0, optics.scale)))  # fewer frames of the big ones
        world = GateWorld(seed, WorldParams(rate_per_h=2000, optics=optics))
        times = np.arange(n) / optics.rate_hz
        frames = world.render(times)
        if optics.cols == 32:
            wire = [encode(f, world.sensor_ambient(float(t))) for f, t in zip(frames, times, strict=True)]
        else:
            wire = [thermal_raw.frame(f, i, round(t * 1e6), world.sensor_ambient(float(t)))
                    for i, (f, t) in enumerate(zip(frames, times, strict=True))]
        manifest = MODELS_DIR / model_dir_name(optics) / "manifest.json"
        app = GateApp("bench", GateAppConfig(summary_interval_s=60, model=manifest)) if manifest.exists() else None
        tracker = Tracker()
        parser: Any = Mlx90640Parser() if optics.cols == 32 else RawFrameParser()
        cpu0 = time.process_time()
        screened = 0
        for raw, t in zip(wire, times.tolist(), strict=True):
            parser.feed(raw)
            f = parser.next()
            if app is not None:
                r = ThermalFrame(source="thermal", mono=t, pixels=f.pixels, ambient_c=f.ambient_c if optics.cols == 32
                                 else f.housing_c, dead_pixels=f.dead)
                screened += sum(x.type == "screening" for x in app.feed(r))
            else:
                screened += len(tracker.process(f.pixels, t, t))
        used = time.process_time() - cpu0
        cpu0 = time.process_time()
        acc = 0.0
        for f in frames:
            acc += float(f.max())
        raw_s = time.process_time() - cpu0
        us = used / n * 1e6
        out[optics.name] = {
            "size": f"{optics.cols}x{optics.rows}", "frames": n, "rate_hz": optics.rate_hz,
            "app": "gate app + model" if app is not None else "tracker only", "screened": screened,
            "us_per_frame": round(us, 1), "fps_one_core": round(1e6 / us, 1),
            "cpu_pct_at_rate": round(optics.rate_hz * us / 1e4, 2), "cpu_pct_at_9hz": round(9 * us / 1e4, 2),
            "raw_us": round(raw_s / n * 1e6, 2)}
    return out


def lepton_link(seconds: float) -> dict[str, Any]:
    import socket

    from customs_edge.agent.apps.gate import GateApp, GateAppConfig
    from customs_edge.drivers.thermal_raw import ThermalRaw, ThermalRawConfig
    from customs_edge.models import default_manifest

    def simulator() -> tuple[subprocess.Popen[str], str]:
        proc = subprocess.Popen([sys.executable, "-m", "customs_edge", "simulate", "gate", "--seed", "3",
                                 "--rate-per-h", "2000", "--camera", "lepton35", "--no-pty", "--tcp-port", "0"],
                                stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert proc.stdout is not None
        return proc, json.loads(proc.stdout.readline())["urls"]["thermal"]["socket"]

    out: dict[str, Any] = {}
    proc, url = simulator()
    try:
        app = GateApp("bench", GateAppConfig(summary_interval_s=10, model=default_manifest("fever_lepton35")))
        drv = ThermalRaw("thermal", ThermalRawConfig(port=url, width=160, height=120))
        drv.open()
        warm = time.monotonic() + 2.0
        while time.monotonic() < warm:
            r = drv.read()
            if r is not None:
                app.feed(r)
        f0, meter = drv.stats.frames, CpuMeter().start()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            r = drv.read()
            if r is not None:
                app.feed(r)
            app.tick(time.monotonic())
        out["lepton_link_cpu_pct"] = round(100 * meter.stop(), 2)
        out["lepton_link_fps"] = round((drv.stats.frames - f0) / seconds, 2)
        out["lepton_link_corrupt"] = drv.stats.corrupt
        drv.close()
    finally:
        proc.terminate()
        proc.wait(5)
    proc, url = simulator()
    try:
        host, port = url.removeprefix("socket://").rsplit(":", 1)
        s = socket.create_connection((host, int(port)))
        s.settimeout(0.2)
        n, meter = 0, CpuMeter().start()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                n += len(s.recv(65536))
            except TimeoutError:
                pass
        out["lepton_link_raw_cpu_pct"] = round(100 * meter.stop(), 2)
        out["lepton_link_raw_fps"] = round(n / (32 + 160 * 120 * 2 + 4) / seconds, 2)
        s.close()
    finally:
        proc.terminate()
        proc.wait(5)
    return out


def link(seconds: float) -> dict[str, Any]:
    import serial

    from customs_edge.agent.apps.gate import GateApp, GateAppConfig
    from customs_edge.drivers.mlx90640 import (
        CMD_MODE,
        CMD_RATE,
        MODE_AUTO,
        RATE_ARGS,
        Mlx90640Config,
        Mlx90640Serial,
        command,
    )

    def simulator() -> tuple[subprocess.Popen[str], str]:
        proc = subprocess.Popen([sys.executable, "-m", "customs_edge", "simulate", "gate", "--seed", "3",
                                 "--rate-per-h", "2000", "--tcp-port", "-1"],
                                stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert proc.stdout is not None
        return proc, json.loads(proc.stdout.readline())["urls"]["thermal"]["pty"]

    out: dict[str, Any] = {}
    proc, port = simulator()
    try:
        app = GateApp("bench", GateAppConfig(summary_interval_s=10))
        drv = Mlx90640Serial("thermal", Mlx90640Config(port=port, rate_hz=8))
        drv.open()
        warm = time.monotonic() + 2.0
        while time.monotonic() < warm:
            r = drv.read()
            if r is not None:
                app.feed(r)
        f0, meter = drv.stats.frames, CpuMeter().start()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            r = drv.read()
            if r is not None:
                app.feed(r)
            app.tick(time.monotonic())
        out["link_cpu_pct"] = round(100 * meter.stop(), 2)
        out["link_fps"] = round((drv.stats.frames - f0) / seconds, 2)
        out["link_corrupt"] = drv.stats.corrupt
        drv.close()
    finally:
        proc.terminate()
        proc.wait(5)

    proc, port = simulator()
    try:
        s = serial.serial_for_url(port, timeout=0.2)
        s.write(command(CMD_RATE, RATE_ARGS[8.0]) + command(CMD_MODE, MODE_AUTO))
        warm = time.monotonic() + 2.0
        while time.monotonic() < warm:
            s.read(max(1544, s.in_waiting))
        n, meter = 0, CpuMeter().start()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            n += len(s.read(max(1544, s.in_waiting)))
        out["link_raw_cpu_pct"] = round(100 * meter.stop(), 2)
        out["link_raw_fps"] = round(n / 1544 / seconds, 2)
        out["link_cpu_ratio"] = round(out["link_cpu_pct"] / max(out["link_raw_cpu_pct"], 0.01), 1)
        s.close()
    finally:
        proc.terminate()
        proc.wait(5)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=4800, help="frames through the pipeline (4,800 = 10 min at 8 Hz)")
    p.add_argument("--link-seconds", type=float, default=20.0, help="0 skips the real-link measurement")
    p.add_argument("--res-frames", type=int, default=1200, help="frames per optics (fewer for the larger ones)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    pin_one_core()
    result: dict[str, Any] = {}
    if args.link_seconds > 0:
        result.update(link(args.link_seconds))
        result["link_rss_mb"] = round(rss_mb(), 1)  # driver + app + model, before the pipeline's frame arrays
    result.update(pipeline(args.frames))
    result["resolutions"] = resolutions(args.res_frames)
    if args.link_seconds > 0:
        result.update(lepton_link(args.link_seconds))
    result["rss_mb"], result["peak_rss_mb"] = round(rss_mb(), 1), round(peak_rss_mb(), 1)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v}")


if __name__ == "__main__":
    main()
