"""End to end over real links: the gate simulator on a pty and a loopback socket, both drivers, the app;
and `customs-edge simulate gate` as a technician runs it."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from customs_edge.agent.apps.gate import GateApp, GateAppConfig
from customs_edge.core.errors import DriverFault
from customs_edge.core.records import RecordIn
from customs_edge.drivers.base import Driver
from customs_edge.drivers.mlx90640 import Mlx90640Config, Mlx90640Serial
from customs_edge.drivers.passage import PassageConfig, PassageSensor
from customs_edge.simulators.base import Endpoints
from customs_edge.simulators.gate import GateSim
from customs_edge.simulators.gate_world import WorldParams


def pump(drv: Driver, out: queue.Queue, stop: threading.Event) -> None:
    """What the runtime does: one thread per driver calling read() in a loop."""
    drv.open()
    try:
        while not stop.is_set():
            try:
                r = drv.read()
            except DriverFault as exc:
                out.put(exc)
                continue
            if r is not None:
                out.put(r)
    finally:
        drv.close()


def test_travellers_pass_end_to_end_through_drivers_and_app() -> None:
    params = WorldParams(rate_per_h=2000, febrile_share=0.2, sun_share=0, hot_drink_share=0, child_share=0)
    sim = GateSim(41, params, speed=3.0)
    with Endpoints(sim.thermal, use_pty=True, tcp_port=None) as t_urls, \
            Endpoints(sim.passage, use_pty=False, tcp_port=0) as p_urls:
        q: queue.Queue = queue.Queue()
        stop = threading.Event()
        drivers = [Mlx90640Serial("thermal", Mlx90640Config(port=t_urls["pty"])),
                   PassageSensor("passage", PassageConfig(port=p_urls["socket"]))]
        threads = [threading.Thread(target=pump, args=(d, q, stop), daemon=True) for d in drivers]
        app = GateApp("gate-link", GateAppConfig(summary_interval_s=1e9))
        recs: list[RecordIn] = []
        for t in threads:
            t.start()
        w_start = sim.clock.now()
        deadline = time.monotonic() + 9.0
        faults = []
        while time.monotonic() < deadline:
            try:
                item = q.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(item, DriverFault):
                faults.append(item)
            else:
                recs += app.feed(item)
            recs += app.tick(time.monotonic())
        w_end = sim.clock.now()
        stop.set()
        for t in threads:
            t.join(5)
    recs += app.close()
    assert not faults
    screenings = [r for r in recs if r.type == "screening"]
    # travellers wholly inside the window (first frame after connect .. last before stop)
    inside = [tr for tr in sim.world.truth if tr.t_in_view > w_start + 0.5 and tr.t_out_view < w_end - 0.5]
    overlapping = [tr for tr in sim.world.truth if tr.t_out_view > w_start and tr.t_in_view < w_end]
    assert len(inside) >= 6
    assert len(inside) <= len(screenings) <= len(overlapping)
    febrile = sum(tr.febrile for tr in inside)
    alerts = sum(r.type == "fever_alert" for r in recs)
    assert febrile <= alerts <= sum(tr.febrile for tr in overlapping)
    assert drivers[0].stats.frames > 8 * 3 * 6  # ~24 frames/s at 3x
    assert app.totals["entries"] >= len(inside)


def test_simulate_gate_cli_serves_both_roles_and_writes_truth(tmp_path: Path) -> None:
    truth = tmp_path / "truth.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "customs_edge", "simulate", "gate", "--seed", "5", "--speed", "10",
                             "--rate-per-h", "2000", "--truth", str(truth), "--corrupt-rate", "0.05"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        urls = json.loads(proc.stdout.readline())["urls"]
        assert set(urls) == {"thermal", "passage"}  # without --environment and --relay
        assert urls["thermal"]["pty"].startswith("/dev/") and urls["passage"]["socket"].startswith("socket://")
        th = Mlx90640Serial("thermal", Mlx90640Config(port=urls["thermal"]["socket"]))
        ps = PassageSensor("passage", PassageConfig(port=urls["passage"]["pty"]))
        th.open()
        ps.open()
        kinds: dict[str, int] = {}
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline and (kinds.get("thermal_frame", 0) < 30 or kinds.get("passage", 0) < 2):
            for d in (th, ps):
                r = d.read()
                if r is not None:
                    kinds[r.KIND] = kinds.get(r.KIND, 0) + 1
        th.close()
        ps.close()
        assert kinds.get("thermal_frame", 0) >= 30 and kinds.get("passage", 0) >= 2
    finally:
        proc.terminate()
        proc.wait(5)
    assert proc.returncode == 0
    rows = [json.loads(line) for line in truth.read_text().splitlines()]
    assert rows and {"id", "core_c", "febrile", "confounder", "t_entry", "t_exit"} <= set(rows[0])
    assert [r["id"] for r in rows] == list(range(1, len(rows) + 1))
