"""Health-quarantine gate: a GY-MCU90640 thermal module and a passage (beam) controller, one world.

    customs-edge simulate gate [--seed N] [--rate-per-h 2000] [--febrile-share 0.003] [--speed 4]
                               [--truth travellers.jsonl] [--corrupt-rate 0.01] [--stall-every 60]
prints {"urls": {"thermal": {"pty": ..., "socket": ...}, "passage": {...}}} and runs until stopped.

The thermal module behaves like the real one: it waits for `A5 35 02` (automatic output) or answers
`A5 35 01` (one frame), takes `A5 25 0x` (refresh rate), and sends 1544-byte frames no faster than its
baud rate allows (460,800 baud: ~30 frames/s; 115,200: ~7). The passage controller sends IN/OUT lines
when a traveller crosses the entry/exit beam, and a heartbeat every second.

--speed k runs the world k times faster AND sends k times as many frames per second, so each traveller
still spans the same number of frames: 2,000 travellers an hour become 2,000 in 60/k minutes.
Faults: --corrupt-rate (bit flips, frames cut short: bytes lost), --stall-every/--stall-for (the module
repeats its last frame: a frozen sensor), --dead-pixels, --noise. The camera's own error:
--camera-offset and --camera-drift (slow, over --camera-drift-period). A blackbody in view
(--blackbody r0,r1,c0,c1 at --blackbody-c) is the reference that cancels it; its faults: --blackbody-drift
(K/h), --blackbody-behind (travellers walk in front of it), --blackbody-off FROM,TO (missing, world s).
--camera lepton35 | ir384 renders the world for a FLIR Lepton 3.5 (160 x 120, 57°, 8.7 Hz) or a 384 x 288
industrial camera (47°, 25 Hz) and streams raw Y16 frames in the framing of simulators/wire/thermal_raw.py
(docs/gate.md) from the moment a client connects; --ffc-every S closes the shutter (flat-field correction,
frames flagged) for --ffc-for seconds every S seconds, as such cameras do.
--environment adds the lane's temperature / humidity transmitter (role `environment`, Modbus RTU, XY-MD02
map; the air is the world's hall, RH --humidity) and --relay the stack light's relay module (role `signal`,
Modbus RTU coils), each on its own endpoints.
Every traveller's truth (core
temperature, febrile, confounder, beam times) is in `world.truth` and, with --truth, a JSON-lines file.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Sequence
from typing import IO

import numpy as np

from customs_edge.simulators.base import (
    Conn,
    DeviceSim,
    Endpoints,
    Faults,
    add_endpoint_args,
    endpoints_from_args,
    run_until_signalled,
)
from customs_edge.simulators.gate_world import MLX90640, OPTICS, GateWorld, WorldParams
from customs_edge.simulators.wire import gymcu90640 as module
from customs_edge.simulators.wire import passage as beams
from customs_edge.simulators.wire import thermal_raw as raw


class WorldClock:
    """World seconds = wall seconds since start x speed. Thread-safe access to the world."""

    def __init__(self, world: GateWorld, speed: float = 1.0) -> None:
        self.world = world
        self.speed = speed
        self.t0 = time.monotonic()
        self.lock = threading.Lock()

    def now(self) -> float:
        return (time.monotonic() - self.t0) * self.speed

    def frame(self, t: float) -> bytes:
        with self.lock:
            pixels = self.world.render(np.array([t]))[0]
            ambient = self.world.sensor_ambient(t)
        return module.frame(pixels, ambient)

    def raw_frame(self, t: float, counter: int, ffc: bool) -> bytes:
        with self.lock:
            pixels = self.world.render(np.array([t]))[0]
            housing = self.world.sensor_ambient(t)
        return raw.frame(pixels, counter, round((time.monotonic() - self.t0) * 1e6), housing, ffc=ffc)

    def events(self, t_from: float, t_to: float) -> list[tuple[float, str, int]]:
        with self.lock:
            return list(self.world.passage_events(t_from, t_to))


class GateFaults(Faults):
    """Adds a stalled module (it repeats its last frame) to the shared fault kinds."""

    def __init__(self, corrupt_rate: float = 0.0, seed: int | None = None) -> None:
        super().__init__(corrupt_rate, seed)
        self._stall_until = 0.0

    def stall(self, seconds: float) -> None:
        self._stall_until = time.monotonic() + seconds

    @property
    def stalled(self) -> bool:
        return time.monotonic() < self._stall_until


class ThermalSim(DeviceSim):
    def __init__(self, clock: WorldClock, *, rate_hz: float = 8.0, baudrate: int = 460800, autostart: bool = False,
                 faults: GateFaults | None = None) -> None:
        self.gfaults = faults or GateFaults()
        super().__init__(self.gfaults)
        self.clock = clock
        self.rate_hz = rate_hz
        self.min_period = module.FRAME_BYTES * 10 / baudrate  # 8N1: ten bits a byte
        self.autostart = autostart
        self.sent = 0
        self.commands: list[tuple[int, int]] = []

    def period(self) -> float:
        return max(1.0 / (self.rate_hz * self.clock.speed), self.min_period)

    def serve(self, conn: Conn, stop: threading.Event) -> None:
        streaming = self.autostart
        pending = bytearray()
        last: bytes | None = None
        next_t = time.monotonic()
        while not stop.is_set() and not conn.closed:
            wait = max(0.0, next_t - time.monotonic()) if streaming else 0.05
            pending += conn.read(min(wait, 0.05))
            query = False
            for cmd, arg in module.commands(pending):
                self.commands.append((cmd, arg))
                if cmd == module.OUTPUT:
                    streaming = arg == module.AUTOMATIC
                    query = arg == module.QUERY
                elif cmd == module.RATE and arg in module.RATE_HZ:
                    self.rate_hz = module.RATE_HZ[arg]
            now = time.monotonic()
            if not (query or (streaming and now >= next_t)):
                continue
            if streaming and now >= next_t:
                next_t = max(next_t + self.period(), now - 1.0)  # fell behind (suspended): do not burst
            if self.faults.paused:
                continue
            if self.gfaults.stalled and last is not None:
                frame = last  # the module repeats itself
            else:
                frame = self.clock.frame(self.clock.now())
                last = frame
            conn.write(self.faults.mangle(frame))
            self.sent += 1


class RawThermalSim(DeviceSim):
    """A radiometric camera streaming raw Y16 frames (wire/thermal_raw.py) at its own rate x speed to every
    client from the moment it connects; it ignores what it is sent. The frame counter is the camera's
    (global), so a client that falls behind sees the gap. Every `ffc_every_s` the shutter closes for
    `ffc_for_s` (flat-field correction): those frames carry the FFC flag."""

    def __init__(self, clock: WorldClock, *, rate_hz: float, faults: GateFaults | None = None,
                 ffc_every_s: float = 0.0, ffc_for_s: float = 0.3) -> None:
        self.gfaults = faults or GateFaults()
        super().__init__(self.gfaults)
        self.clock, self.rate_hz = clock, rate_hz
        self.ffc_every_s, self.ffc_for_s = ffc_every_s, ffc_for_s
        self.counter = 0
        self.sent = 0
        self._lock = threading.Lock()

    def _ffc(self) -> bool:
        e = self.ffc_every_s
        return e > 0 and (time.monotonic() - self.clock.t0) % e < self.ffc_for_s

    def serve(self, conn: Conn, stop: threading.Event) -> None:
        period = 1.0 / (self.rate_hz * self.clock.speed)
        next_t = time.monotonic()
        last: bytes | None = None
        while not stop.is_set() and not conn.closed:
            conn.read(max(0.0, min(0.05, next_t - time.monotonic())))
            now = time.monotonic()
            if now < next_t:
                continue
            next_t = max(next_t + period, now - 1.0)
            with self._lock:
                self.counter += 1
                counter = self.counter
            if self.faults.paused:
                continue
            if self.gfaults.stalled and last is not None:
                data = last
            else:
                data = last = self.clock.raw_frame(self.clock.now(), counter, self._ffc())
            conn.write(self.faults.mangle(data))
            self.sent += 1


class PassageSim(DeviceSim):
    """Entry/exit beam controller: one line per beam break, a heartbeat every second. The controller's
    counters are global; every connected client hears every event from the moment it connected."""

    def __init__(self, clock: WorldClock, faults: Faults | None = None) -> None:
        super().__init__(faults)
        self.clock = clock
        self.entries = 0
        self.exits = 0
        self.log: list[bytes] = []  # every event line so far, in time order
        self._t = 0.0
        self._lock = threading.Lock()

    def advance(self) -> int:
        """Log the beam events up to now; returns the log's length."""
        with self._lock:
            t_now = self.clock.now()
            for _, kind, _ in self.clock.events(self._t, t_now):
                if kind == "entry":
                    self.entries += 1
                    self.log.append(beams.beam("entry", self.entries))
                else:
                    self.exits += 1
                    self.log.append(beams.beam("exit", self.exits))
            self._t = t_now
            return len(self.log)

    def serve(self, conn: Conn, stop: threading.Event) -> None:
        cursor = self.advance()
        last_hb = 0.0
        while not stop.is_set() and not conn.closed:
            conn.read(0.02)  # the controller ignores what it is sent
            end = self.advance()
            lines, cursor = self.log[cursor:end], end
            if self.faults.paused:
                continue
            for line in lines:
                conn.write(self.faults.mangle(line))
            mono = time.monotonic()
            if mono - last_hb >= 1.0:
                last_hb = mono
                conn.write(beams.heartbeat(self.entries, self.exits))


class GateSim:
    """Both devices over one world; what tests build in-process and `main` runs."""

    def __init__(self, seed: int = 0, params: WorldParams | None = None, *, speed: float = 1.0,
                 rate_hz: float = 8.0, baudrate: int = 460800, autostart: bool = False, corrupt_rate: float = 0.0,
                 truth_file: IO[str] | None = None, ffc_every_s: float = 0.0) -> None:
        self.world = GateWorld(seed, params, truth_file=truth_file)
        self.clock = WorldClock(self.world, speed)
        self.faults = GateFaults(corrupt_rate, seed)
        self.thermal: ThermalSim | RawThermalSim
        optics = self.world.optics
        if optics == MLX90640:
            self.thermal = ThermalSim(self.clock, rate_hz=rate_hz, baudrate=baudrate, autostart=autostart,
                                      faults=self.faults)
        else:
            self.thermal = RawThermalSim(self.clock, rate_hz=optics.rate_hz, faults=self.faults,
                                         ffc_every_s=ffc_every_s)
        self.passage = PassageSim(self.clock)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="customs-edge simulate gate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = WorldParams()
    p.add_argument("--rate-per-h", type=float, default=d.rate_per_h, help="travellers per hour (up to 2,000)")
    p.add_argument("--febrile-share", type=float, default=d.febrile_share)
    p.add_argument("--febrile-every", type=int, default=0, metavar="N", help="and every N-th traveller (0: none)")
    p.add_argument("--hot-drink-share", type=float, default=d.hot_drink_share)
    p.add_argument("--sun-share", type=float, default=d.sun_share)
    p.add_argument("--child-share", type=float, default=d.child_share)
    p.add_argument("--ambient", type=float, default=d.ambient_c, help="hall temperature, °C")
    p.add_argument("--ambient-drift", type=float, default=d.ambient_drift_k, help="slow drift amplitude, K")
    p.add_argument("--noise", type=float, default=d.noise_k, help="pixel noise, K RMS")
    p.add_argument("--dead-pixels", type=int, default=d.dead_pixels)
    p.add_argument("--camera-offset", type=float, default=d.camera_offset_c, help="the camera's error, K")
    p.add_argument("--camera-drift", type=float, default=d.camera_drift_k, help="its slow drift amplitude, K")
    p.add_argument("--camera-drift-period", type=float, default=d.camera_drift_period_s, help="seconds")
    p.add_argument("--blackbody", type=_ints, help="r0,r1,c0,c1: the blackbody's box in the frame (rows, columns)")
    p.add_argument("--blackbody-c", type=float, default=d.blackbody_c, help="its temperature, °C")
    p.add_argument("--blackbody-drift", type=float, default=d.blackbody_drift_k_per_h, help="fault: its drift, K/h")
    p.add_argument("--blackbody-behind", action="store_true", help="fault: travellers walk in front of it")
    p.add_argument("--blackbody-off", type=_floats, help="FROM,TO: fault: missing in these world seconds")
    p.add_argument("--camera", choices=[o.name.split("-")[0] for o in OPTICS.values()], default="mlx90640",
                   help="mlx90640 (GY-MCU90640 serial module), lepton35 (160x120) or ir384 (384x288): raw Y16 frames")
    p.add_argument("--ffc-every", type=float, default=0.0, help="raw cameras: seconds between flat-field "
                                                                 "corrections (0: never)")
    p.add_argument("--speed", type=float, default=1.0, help="world time and frame rate multiplier")
    p.add_argument("--rate-hz", type=float, default=8.0, help="refresh rate until the driver sets one")
    p.add_argument("--baud", type=int, default=460800, help="the module's line speed; caps the frame rate")
    p.add_argument("--autostart", action="store_true", help="stream without waiting for A5 35 02")
    p.add_argument("--stall-every", type=float, default=0.0, help="seconds between sensor stalls (0: never)")
    p.add_argument("--stall-for", type=float, default=5.0, help="length of each stall, seconds")
    p.add_argument("--truth", help="write every traveller's ground truth to this JSON-lines file")
    p.add_argument("--environment", action="store_true", help="also serve the lane's temperature / humidity "
                                                               "transmitter (role environment)")
    p.add_argument("--humidity", type=float, default=45.0, help="the hall's relative humidity, %%")
    p.add_argument("--relay", action="store_true", help="also serve the stack light's relay module (role signal)")
    add_endpoint_args(p)
    return p


def _ints(text: str) -> tuple[int, int, int, int]:
    v = [int(x) for x in text.split(",")]
    if len(v) != 4:
        raise argparse.ArgumentTypeError("give four integers: first row, last row + 1, first column, last column + 1")
    return v[0], v[1], v[2], v[3]


def _floats(text: str) -> tuple[float, float]:
    v = [float(x) for x in text.split(",")]
    if len(v) != 2:
        raise argparse.ArgumentTypeError("give two numbers: FROM,TO (world seconds)")
    return v[0], v[1]


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not 0 < args.rate_per_h <= 4000:
        raise SystemExit("--rate-per-h must be in (0, 4000]")
    params = WorldParams(rate_per_h=args.rate_per_h, febrile_share=args.febrile_share, febrile_every=args.febrile_every,
                         hot_drink_share=args.hot_drink_share, sun_share=args.sun_share, child_share=args.child_share,
                         ambient_c=args.ambient, ambient_drift_k=args.ambient_drift, noise_k=args.noise,
                         dead_pixels=args.dead_pixels, camera_offset_c=args.camera_offset,
                         camera_drift_k=args.camera_drift, camera_drift_period_s=args.camera_drift_period,
                         blackbody=args.blackbody, blackbody_c=args.blackbody_c,
                         blackbody_drift_k_per_h=args.blackbody_drift, blackbody_behind=args.blackbody_behind,
                         blackbody_off=args.blackbody_off,
                         optics=next(o for o in OPTICS.values() if o.name.split("-")[0] == args.camera))
    truth = open(args.truth, "w") if args.truth else None  # noqa: SIM115 - lives as long as the process
    sim = GateSim(args.seed or 0, params, speed=args.speed, rate_hz=args.rate_hz, baudrate=args.baud,
                  autostart=args.autostart, corrupt_rate=args.corrupt_rate, truth_file=truth,
                  ffc_every_s=args.ffc_every)
    if args.stall_every > 0:
        def stalls() -> None:
            while True:
                time.sleep(args.stall_every)
                sim.faults.stall(args.stall_for)
        threading.Thread(target=stalls, name="stalls", daemon=True).start()
    thermal = endpoints_from_args(sim.thermal, args)
    passage = Endpoints(sim.passage, use_pty=not args.no_pty, tcp_port=None if args.tcp_port < 0 else 0,
                        link=f"{args.link}-passage" if args.link else None)
    sets = {"thermal": thermal, "passage": passage}
    tcp = None if args.tcp_port < 0 else 0
    if args.environment:
        from customs_edge.simulators.environment import EnvironmentSim

        world, clock, rh = sim.world, sim.clock, args.humidity
        env = EnvironmentSim(air=lambda _t: (float(world.ambient(clock.now())), rh))
        sets["environment"] = Endpoints(env, use_pty=not args.no_pty, tcp_port=tcp,
                                        link=f"{args.link}-environment" if args.link else None)
    if args.relay:
        from customs_edge.simulators.relay import RelaySim

        sets["signal"] = Endpoints(RelaySim(), use_pty=not args.no_pty, tcp_port=tcp,
                                   link=f"{args.link}-signal" if args.link else None)
    run_until_signalled(sets)
