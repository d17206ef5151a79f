"""An RS-485 temperature / humidity transmitter (SHT20 class, XY-MD02 register map), from the Modbus
specifications ("MODBUS Application Protocol V1.1b3" 6.4 read input registers) and the XY-MD02's
published map: input register 1 = temperature, int16 °C x 10 (two's complement below 0 °C); input
register 2 = relative humidity, % x 10. Written independently of drivers/environment.py.

The air follows the gate world's hall when given one (`air`: t -> (°C, %)), else the set values
(`temperature_c`, `humidity_pct`) plus a slow drift. The SHT20 resolves 0.01 °C / 0.04 %RH; the module
rounds to 0.1. Faults are the line's (SlaveFaults: dead, timeout_next, crc_next, exception_next).

    customs-edge simulate environment [--temperature 21.0] [--humidity 45] [--slave-id 1]
prints {"urls": {"environment": {"pty": ..., "socket": ...}}} and runs until stopped.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence

from customs_edge.simulators.base import Faults, add_endpoint_args, endpoints_from_args, run_until_signalled
from customs_edge.simulators.ore_devices import ModbusLineSim, SlaveModel, Tables

TEMPERATURE_REG, HUMIDITY_REG = 1, 2


def word(value: float) -> int:
    """A reading x 10 as the 16-bit register word (two's complement for negative temperatures)."""
    return round(value * 10) & 0xFFFF


class EnvironmentSim(ModbusLineSim):
    def __init__(self, slave_id: int = 1, temperature_c: float = 21.0, humidity_pct: float = 45.0,
                 drift_k: float = 0.0, drift_period_s: float = 3600.0, faults: Faults | None = None,
                 air: Callable[[float], tuple[float, float]] | None = None) -> None:
        self.temperature_c, self.humidity_pct = temperature_c, humidity_pct
        self.drift_k, self.drift_period_s = drift_k, drift_period_s
        self.air = air
        self.t0 = time.monotonic()
        super().__init__([SlaveModel(slave_id, "environment", self._tables)], faults)
        self.sensor = self.slaves[slave_id]

    def now(self) -> tuple[float, float]:
        t = time.monotonic() - self.t0
        if self.air is not None:
            return self.air(t)
        drift = self.drift_k * math.sin(2 * math.pi * t / self.drift_period_s)
        return self.temperature_c + drift, self.humidity_pct

    def _tables(self) -> Tables:
        temp, rh = self.now()
        rh = min(100.0, max(0.0, rh))
        return {"input": {TEMPERATURE_REG: word(temp), HUMIDITY_REG: word(rh)}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="customs-edge simulate environment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slave-id", type=int, default=1, help="the transmitter's address (1-247)")
    p.add_argument("--temperature", type=float, default=21.0, help="air temperature, °C")
    p.add_argument("--humidity", type=float, default=45.0, help="relative humidity, %%")
    p.add_argument("--drift", type=float, default=0.0, help="slow temperature drift amplitude, K")
    p.add_argument("--drift-period", type=float, default=3600.0, help="seconds")
    add_endpoint_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sim = EnvironmentSim(args.slave_id, args.temperature, args.humidity, args.drift, args.drift_period,
                         Faults(args.corrupt_rate, args.seed))
    run_until_signalled({"environment": endpoints_from_args(sim, args)}, args=args)
