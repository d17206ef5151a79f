"""Gate lane signal: decision-to-relay latency, against a raw coil write over the same pty, in one run.

    python bench/lane.py [--seconds 600] [--speed 20] [--json]

The relay module is the simulator (`customs-edge simulate relay`, its own process, on a pty). A gate unit
(the production runtime: agent/runtime.Unit, GateApp, drivers/relay.ModbusRelay) screens `--seconds` of a
simulated 2,000 travellers/h lane, its frames fed `--speed` times faster than the camera's 8 Hz (the
frames are rendered beforehand, not timed). For each traveller:
  decision -> relay   from the app's decision (the SetOutputs it issues) until the driver has read the coils
                      back as set (OutputsSet.mono): core thread -> driver thread -> fc 15 write -> fc 01 read
  baseline            the same two exchanges (fc 15 write of 4 coils, fc 01 read-back) sent by bare pyserial
                      on the same pty, one after the other: what the wire and the simulator cost alone
Goal (issue 14): the signal set within 300 ms of the decision; `late` counts those that were not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import percentile  # noqa: E402

COILS = {"green": 0, "amber": 1, "red": 2, "buzzer": 3}


def baseline(port: str, n: int) -> list[float]:
    """Seconds per raw fc 15 write + fc 01 read-back, bare pyserial, replies checked only for length."""
    import serial

    from customs_edge.drivers.modbus import crc16

    out = []
    with serial.serial_for_url(port, baudrate=9600, timeout=1.0) as s:
        for i in range(n):
            write = bytes([1, 15, 0, 0, 0, 4, 1, 1 << (i % 3)])
            read = bytes([1, 1, 0, 0, 0, 4])
            t = time.perf_counter()
            s.write(write + crc16(write))
            ok = len(s.read(8)) == 8
            s.write(read + crc16(read))
            ok = len(s.read(6)) == 6 and ok
            if not ok:
                raise SystemExit("baseline: the simulator did not answer")
            out.append(time.perf_counter() - t)
    return out


def lane(port: str, seconds: float, speed: float, workdir: Path) -> tuple[list[float], int]:
    """(decision-to-relay seconds per signal, screenings) through the production runtime."""
    import numpy as np

    from customs_edge.agent.apps.gate import GateApp
    from customs_edge.agent.config import parse_unit_config
    from customs_edge.agent.runtime import Unit
    from customs_edge.core.outputs import OutputsSet
    from customs_edge.core.readings import Reading, ThermalFrame
    from customs_edge.drivers.base import Driver, DriverConfig
    from customs_edge.drivers.relay import ModbusRelay, RelayConfig
    from customs_edge.simulators.gate_world import GateWorld, WorldParams

    world = GateWorld(5, WorldParams(rate_per_h=2000))
    times = np.arange(0.0, seconds, 1 / 8)
    frames = np.round(world.render(times), 2)

    class Paced(Driver):
        """The rendered frames at `speed` x 8 Hz, as a camera driver would hand them over."""

        Config = DriverConfig
        PRODUCES = (ThermalFrame,)

        def __init__(self) -> None:
            super().__init__("thermal", DriverConfig(driver="paced"))
            self.i, self.next = 0, 0.0
            self.done = False

        def open(self) -> None:
            self.next = time.monotonic()

        def close(self) -> None:
            pass

        def read(self) -> Reading | None:
            if self.i >= len(frames):
                self.done = True
                time.sleep(0.05)
                return None
            time.sleep(max(0.0, self.next - time.monotonic()))
            self.next += 1 / (8 * speed)
            self.i += 1
            return ThermalFrame(source="thermal", pixels=frames[self.i - 1], ambient_c=25.0)

    class Timed(GateApp):
        latencies: list[float] = []

        def feed(self, reading: Reading) -> Any:
            if isinstance(reading, OutputsSet) and reading.ref in self._unconfirmed:
                self.latencies.append(reading.latency_s)
            return super().feed(reading)

    cfg = parse_unit_config({
        "device_id": "bench-lane", "type": "gate",
        "drivers": {"thermal": {"driver": "mlx90640-serial", "port": "/dev/null"},
                    "signal": {"driver": "modbus-relay", "port": port, "coils": COILS}},
        "app": {"warmup_s": 0, "signal": {}}, "outbox": {"path": str(workdir / "outbox.db")},
        "sync": {"port": 9, "connect_timeout_s": 1}})
    app = Timed(cfg.device_id, cfg.app)  # type: ignore[arg-type]
    paced = Paced()
    relay = cfg.drivers["signal"]
    assert isinstance(relay, RelayConfig)
    unit = Unit(cfg, app=app, drivers={"thermal": paced, "signal": ModbusRelay("signal", relay)})
    unit.start()
    try:
        while not paced.done:
            time.sleep(0.1)
        time.sleep(2.0)  # the last tracks close (stale_after_s) and their signals are set
    finally:
        unit.stop()
    return app.latencies, app.totals["screened"]


def run(seconds: float, speed: float) -> dict[str, Any]:
    import logging

    logging.disable(logging.WARNING)  # the unit's sync has no broker here
    sim = subprocess.Popen([sys.executable, "-m", "customs_edge", "simulate", "relay", "--tcp-port", "-1"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert sim.stdout is not None
        port = json.loads(sim.stdout.readline())["urls"]["relay"]["pty"]
        with tempfile.TemporaryDirectory() as tmp:
            latencies, screened = lane(port, seconds, speed, Path(tmp))
        raw = baseline(port, max(200, len(latencies)))
    finally:
        sim.terminate()
        sim.wait(10)
    ms = [x * 1000 for x in latencies]
    raw_ms = [x * 1000 for x in raw]
    return {"screened": screened, "signals": len(ms),
            "decision_to_relay_ms": {"p50": round(percentile(ms, 50), 2), "p99": round(percentile(ms, 99), 2),
                                     "max": round(max(ms), 2) if ms else None},
            "baseline_raw_write_readback_ms": {"p50": round(percentile(raw_ms, 50), 2),
                                               "p99": round(percentile(raw_ms, 99), 2)},
            "late_over_300ms": sum(x > 300 for x in ms), "speed": speed, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=600.0, help="simulated lane time")
    p.add_argument("--speed", type=float, default=20.0, help="frames fed this many times faster than 8 Hz")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    result = run(args.seconds, args.speed)
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
