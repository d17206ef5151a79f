"""The iron-ore sampling station: every instrument of one station, coherent with one simulated belt.

    customs-edge simulate ore-station [--seed N] [--speed 60] [--lot-t 1200] [--holds 3] ...

prints {"urls": {"belt_weigher": {...}, "moisture": {...}, "belt_portal": {...}, "scale": {...},
"analyser": {"socket": ...}}} (the role names of configs/ore-station.yaml) and runs until SIGTERM.

Roles and wires:
  belt_weigher  Modbus RTU, slave 1: belt weigher integrator (rate, speed, totalised tonnes)
  moisture      Modbus RTU, slave 2: microwave moisture analyser on the belt
  belt_portal   Modbus RTU, one line, two slaves: 3 belt PLC (running, metal detector, lot/hold
                numbers), 4 radiation portal monitor (gamma cps, alarm)
  scale         MT-SICS bench balance in the sample room
  analyser      cross-belt PGNAA analyser, result blocks over TCP (socket URL only)
  radiation_portal  with --n42-portal: the radiation portal monitor as ANSI N42.42 documents, one per
                belt segment occupancy, pushed over TCP (socket URL only; driver n42-portal). The
                Modbus portal slave keeps answering either way.

Time runs `--speed` times faster than the wall clock for the belt and the analyser (default 60: a
simulated hour per minute, so a demo-sized lot of 1,200 t at 4,000 t/h passes in ~20 s). Fault flags:
--modbus-timeout-rate / --modbus-crc-rate (per reply), --sics-garble-rate, --analyser-corrupt-rate,
--analyser-drift (own Fe assay bias, % per simulated hour), --detector-drift (gain, per hour),
--dead NAME[@SECONDS] (weigher, moisture, belt, portal, scale, analyser: dead from the start or after
SECONDS of wall time; radiation_portal too), the event rates --stops-per-h, --gamma-per-h,
--metal-per-h, --neutron-per-h, and the schedules --gamma-every, --metal-every, --neutron-every (an
event for sure every SIM_S simulated seconds, as the demo runs it).
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Sequence

from customs_edge.simulators.base import Endpoints, Faults, add_endpoint_args, run_until_signalled
from customs_edge.simulators.ore_devices import (
    AnalyserSim,
    Bench,
    ModbusLineSim,
    PortalN42Sim,
    SicsBalanceSim,
    SlaveModel,
    belt_tables,
    moisture_tables,
    portal_tables,
    weigher_tables,
)
from customs_edge.simulators.ore_world import OreWorld, WorldConfig

SLAVES = {"weigher": 1, "moisture": 2, "belt": 3, "portal": 4}
SILENT = ("scale", "analyser", "radiation_portal")  # instruments that go silent when dead


class OreStation:
    """The world and its instrument simulators; `endpoints()` exposes them per role."""

    def __init__(self, cfg: WorldConfig | None = None, *, bench_cycle_s: float = 8.0,
                 line_faults: Faults | None = None, analyser_stat_s: float = 2.0, n42_portal: bool = False) -> None:
        self.world = OreWorld(cfg or WorldConfig())
        seed = self.world.cfg.seed
        lf = line_faults or Faults()
        self.weigher = SlaveModel(1, "weigher", weigher_tables(self.world))
        self.moisture = SlaveModel(2, "moisture", moisture_tables(self.world))
        self.belt = SlaveModel(3, "belt", belt_tables(self.world))
        self.portal = SlaveModel(4, "portal", portal_tables(self.world))
        self.lines = {
            "belt_weigher": ModbusLineSim([self.weigher], Faults(lf.corrupt_rate, seed), seed),
            "moisture": ModbusLineSim([self.moisture], Faults(lf.corrupt_rate, seed), seed),
            "belt_portal": ModbusLineSim([self.belt, self.portal], Faults(lf.corrupt_rate, seed), seed),
        }
        self.bench = Bench(seed, cycle_s=bench_cycle_s)
        self.scale = SicsBalanceSim(self.bench, Faults(lf.corrupt_rate, seed))
        self.analyser = AnalyserSim(self.world, analyser_stat_s, Faults(lf.corrupt_rate, seed))
        self.n42_portal = PortalN42Sim(self.world, Faults(lf.corrupt_rate, seed), seed) if n42_portal else None

    def slave(self, name: str) -> SlaveModel:
        return {"weigher": self.weigher, "moisture": self.moisture, "belt": self.belt, "portal": self.portal}[name]

    def sims(self) -> dict[str, tuple[object, bool]]:
        """role -> (simulator, served on a pty too)."""
        extra = {"radiation_portal": (self.n42_portal, False)} if self.n42_portal else {}
        return {**{role: (sim, True) for role, sim in self.lines.items()},
                "scale": (self.scale, True), "analyser": (self.analyser, False), **extra}

    def endpoints(self, use_pty: bool = True) -> dict[str, Endpoints]:
        return {role: Endpoints(sim, use_pty=use_pty and pty, tcp_port=0)  # type: ignore[arg-type]
                for role, (sim, pty) in self.sims().items()}

    def kill(self, name: str) -> None:
        """A dead instrument: a Modbus slave stops answering, the balance or the analyser goes silent."""
        if name in SLAVES:
            self.slave(name).faults.dead = True
        elif name == "scale":
            self.scale.faults.pause(1e9)
        elif name == "analyser":
            self.analyser.faults.pause(1e9)
        elif name == "radiation_portal" and self.n42_portal:
            self.n42_portal.faults.pause(1e9)
        else:
            raise ValueError(f"unknown instrument {name!r}; one of {[*SLAVES, *SILENT]}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="customs-edge simulate ore-station", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speed", type=float, default=60.0, help="simulated seconds per wall second")
    p.add_argument("--lot-t", type=float, default=1200.0, help="tonnes per lot")
    p.add_argument("--holds", type=int, default=3, help="holds (sub-lots) per lot")
    p.add_argument("--rate-tph", type=float, default=4000.0, help="nominal belt rate, t/h")
    p.add_argument("--stops-per-h", type=float, default=0.5)
    p.add_argument("--gamma-per-h", type=float, default=0.3)
    p.add_argument("--metal-per-h", type=float, default=0.4)
    p.add_argument("--gamma-every", type=float, default=0.0, metavar="SIM_S",
                   help="and a gamma alarm for sure every SIM_S simulated seconds (0: never)")
    p.add_argument("--metal-every", type=float, default=0.0, metavar="SIM_S",
                   help="and tramp metal for sure every SIM_S simulated seconds (0: never)")
    p.add_argument("--neutron-per-h", type=float, default=0.0)
    p.add_argument("--neutron-every", type=float, default=0.0, metavar="SIM_S",
                   help="a neutron source past the portal for sure every SIM_S simulated seconds (0: never)")
    p.add_argument("--n42-portal", action="store_true",
                   help="also serve the radiation portal as ANSI N42.42 documents (role radiation_portal)")
    p.add_argument("--moisture-mean", type=float, default=8.0, help="mean lot moisture, %% wet basis")
    p.add_argument("--fe-mean", type=float, default=62.0)
    p.add_argument("--modbus-timeout-rate", type=float, default=0.0, help="share of Modbus replies withheld")
    p.add_argument("--modbus-crc-rate", type=float, default=0.0, help="share of Modbus replies with a bad CRC")
    p.add_argument("--sics-garble-rate", type=float, default=0.0, help="share of MT-SICS replies garbled")
    p.add_argument("--analyser-corrupt-rate", type=float, default=0.0, help="share of result blocks damaged")
    p.add_argument("--analyser-drift", type=float, default=0.0, help="own Fe assay bias, %% per simulated hour")
    p.add_argument("--detector-drift", type=float, default=0.0, help="relative gain drift per simulated hour")
    p.add_argument("--bench-cycle", type=float, default=8.0, help="wall seconds per bench weighing")
    p.add_argument("--dead", action="append", default=[], metavar="NAME[@SECONDS]",
                   help="an instrument that stops answering (weigher, moisture, belt, portal, scale, analyser)")
    add_endpoint_args(p)
    return p


def station_from_args(args: argparse.Namespace) -> OreStation:
    cfg = WorldConfig(seed=args.seed or 0, speed=args.speed, rate_tph=args.rate_tph, lot_t=args.lot_t,
                      holds=args.holds, stops_per_h=args.stops_per_h, gamma_alarms_per_h=args.gamma_per_h,
                      metal_per_h=args.metal_per_h, gamma_every_s=args.gamma_every, metal_every_s=args.metal_every,
                      neutron_per_h=args.neutron_per_h, neutron_every_s=args.neutron_every,
                      analyser_drift_pct_per_h=args.analyser_drift,
                      detector_drift_per_h=args.detector_drift, moisture_mean=args.moisture_mean,
                      fe_mean=args.fe_mean)
    st = OreStation(cfg, bench_cycle_s=args.bench_cycle, line_faults=Faults(args.corrupt_rate, args.seed),
                    n42_portal=args.n42_portal)
    for s in (st.weigher, st.moisture, st.belt, st.portal):
        s.faults.timeout_rate = args.modbus_timeout_rate
        s.faults.crc_rate = args.modbus_crc_rate
    st.scale.faults.corrupt_rate = args.sics_garble_rate or args.corrupt_rate
    st.analyser.faults.corrupt_rate = args.analyser_corrupt_rate or args.corrupt_rate
    for spec in args.dead:
        name, _, after = spec.partition("@")
        if after:
            threading.Timer(float(after), st.kill, args=(name,)).start()
        else:
            st.kill(name)
    return st


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for spec in args.dead:
        name = spec.partition("@")[0]
        if name not in [*SLAVES, *SILENT]:
            build_parser().error(f"--dead {name}: one of {', '.join([*SLAVES, *SILENT])}")
    st = station_from_args(args)
    eps: dict[str, Endpoints] = {}
    for i, (role, (sim, pty)) in enumerate(st.sims().items()):
        port = None if args.tcp_port < 0 and pty else (args.tcp_port + i if args.tcp_port > 0 else 0)
        link = f"{args.link}-{role}" if args.link and pty and not args.no_pty else None
        eps[role] = Endpoints(sim, use_pty=pty and not args.no_pty, tcp_port=port, link=link)  # type: ignore[arg-type]
    run_until_signalled(eps, {"speed": args.speed, "lot_t": args.lot_t})
