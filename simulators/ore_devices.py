"""Wire-level simulations of the ore station's instruments: a Modbus RTU line with several slaves,
an MT-SICS bench balance, a cross-belt analyser's TCP result server and a radiation portal monitor
pushing ANSI N42.42 documents over TCP. Each speaks the real protocol
on a pty or a loopback socket (simulators.base.Endpoints) and has fault switches for tests and flags.
"""

from __future__ import annotations

import math
import random
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from customs_edge.simulators.base import Conn, DeviceSim, Faults
from customs_edge.simulators.ore_world import OreWorld, PortalOut
from customs_edge.simulators.wire import analyser as analyser_wire
from customs_edge.simulators.wire import modbus as rtu
from customs_edge.simulators.wire import mtsics as sics
from customs_edge.simulators.wire import n42

Tables = dict[str, dict[int, int]]  # table name -> address -> register word (or 0/1 for bits)


@dataclass
class SlaveFaults:
    """Per-slave switches. Counters say how many replies were withheld or damaged."""

    dead: bool = False  # never answers (power lost, address changed)
    timeout_next: int = 0  # withhold the next n replies
    crc_next: int = 0  # damage the CRC of the next n replies
    exception_next: int = 0  # answer the next n requests with an exception
    exception_code: int = 4  # slave device failure
    late_next: int = 0  # answer the next n requests late: after the master gave up waiting
    late_by_s: float = 0.5  # how long after its request a late reply goes out
    timeout_rate: float = 0.0
    crc_rate: float = 0.0
    withheld: int = 0
    damaged: int = 0
    exceptions: int = 0
    late: int = 0


@dataclass
class SlaveModel:
    """A slave: `tables()` gives its current register image."""

    id: int
    name: str
    tables: Callable[[], Tables]
    faults: SlaveFaults = field(default_factory=SlaveFaults)
    requests: int = 0


def put(table: dict[int, int], address: int, dtype: str, value: float | int,
        word_order: Literal["big", "little"] = "big") -> None:
    for i, w in enumerate(rtu.registers(dtype, value, word_order)):
        table[address + i] = w


class ModbusLineSim(DeviceSim):
    """An RS-485 line with one or more slaves answering Modbus RTU read requests (FC 1-4).
    Requests with a bad CRC or for an absent slave get no reply, as on a real line. A late reply
    (SlaveFaults.late_next) goes out late_by_s after its request, and replies keep their order."""

    def __init__(self, slaves: list[SlaveModel], faults: Faults | None = None, seed: int | None = None) -> None:
        super().__init__(faults)
        self.slaves = {s.id: s for s in slaves}
        self.rng = random.Random(seed)
        self.bad_requests = 0

    def slave(self, name: str) -> SlaveModel:
        return next(s for s in self.slaves.values() if s.name == name)

    def respond(self, frame: bytes) -> bytes | None:
        """The reply to one complete, CRC-checked request frame (None: stay silent)."""
        slave = self.slaves.get(frame[0])
        if slave is None:
            return None
        slave.requests += 1
        f = slave.faults
        if f.dead:
            f.withheld += 1
            return None
        if f.timeout_next > 0 or (f.timeout_rate and self.rng.random() < f.timeout_rate):
            f.timeout_next = max(0, f.timeout_next - 1)
            f.withheld += 1
            return None
        fc = frame[1]
        address, count = struct.unpack(">HH", frame[2:6])
        table = rtu.FUNCTIONS.get(fc)
        image = slave.tables().get(table or "", {})
        if f.exception_next > 0:
            f.exception_next -= 1
            f.exceptions += 1
            reply = rtu.exception_reply(slave.id, fc, f.exception_code)
        elif table is None:
            reply = rtu.exception_reply(slave.id, fc, rtu.ILLEGAL_FUNCTION)
        elif not 1 <= count <= rtu.MAX_QUANTITY[fc]:
            reply = rtu.exception_reply(slave.id, fc, rtu.ILLEGAL_DATA_VALUE)
        elif any(a not in image for a in range(address, address + count)):
            reply = rtu.exception_reply(slave.id, fc, rtu.ILLEGAL_DATA_ADDRESS)
        else:
            reply = rtu.read_reply(slave.id, fc, [image[a] for a in range(address, address + count)])
        if f.crc_next > 0 or (f.crc_rate and self.rng.random() < f.crc_rate):
            f.crc_next = max(0, f.crc_next - 1)
            f.damaged += 1
            reply = reply[:-2] + bytes([reply[-2] ^ 0x5A, reply[-1]])
        return reply

    @staticmethod
    def request_length(buf: bytes | bytearray) -> int:
        fc = buf[1]
        if fc in (15, 16):
            return 9 + buf[6] if len(buf) >= 7 else 0
        return 8

    def serve(self, conn: Conn, stop: threading.Event) -> None:
        buf = bytearray()
        last = time.monotonic()
        outbox: list[tuple[float, bytes]] = []  # (when, reply): late replies wait here, in order
        while not stop.is_set() and not conn.closed:
            data = conn.read(min(0.05, max(0.0, outbox[0][0] - time.monotonic())) if outbox else 0.05)
            now = time.monotonic()
            while outbox and outbox[0][0] <= now:
                conn.write(outbox.pop(0)[1])
            if not data:
                if buf and now - last > 0.05:  # a gap ends a frame: drop a fragment
                    self.bad_requests += 1
                    buf.clear()
                continue
            last = now
            buf += data
            while len(buf) >= 8:
                n = self.request_length(buf)
                if not n or len(buf) < n:
                    break
                frame = bytes(buf[:n])
                if rtu.crc16(frame[:-2]) != frame[-2:]:
                    self.bad_requests += 1
                    del buf[:1]  # hunt for the next frame start
                    continue
                del buf[:n]
                reply = self.respond(frame)
                if reply is None or self.faults.paused:
                    continue
                f = self.slaves[frame[0]].faults
                due = now
                if f.late_next > 0:
                    f.late_next -= 1
                    f.late += 1
                    due += f.late_by_s
                if outbox or due > now:  # one reply at a time on the line, in the order asked
                    outbox.append((max(due, outbox[-1][0] if outbox else due), self.faults.mangle(reply)))
                else:
                    conn.write(self.faults.mangle(reply))


# --- the station's slaves, bound to the world ----------------------------------------------------

def weigher_tables(world: OreWorld) -> Callable[[], Tables]:
    """Belt weigher integrator: input 0-1 rate t/h (float32), 2 speed mm/s, 3-4 total in 0.1 t
    (uint32, low word first), 5 status (bit 0 belt running)."""

    def tables() -> Tables:
        s = world.belt()
        ir: dict[int, int] = {}
        put(ir, 0, "float32", s.rate_tph)
        put(ir, 2, "uint16", min(65535, round(s.speed_mps * 1000)))
        put(ir, 3, "uint32", round(s.total_t * 10) % 2**32, "little")
        put(ir, 5, "uint16", 1 if s.running else 0)
        return {"input": ir}

    return tables


def moisture_tables(world: OreWorld) -> Callable[[], Tables]:
    """Microwave moisture analyser: input 0 moisture in 0.01 % (wet basis), 1 material temperature in
    0.1 °C (int16), 2 status (bit 0 no material on the belt)."""

    def tables() -> Tables:
        s = world.belt()
        ir: dict[int, int] = {}
        put(ir, 0, "uint16", max(0, round(s.moisture_pct * 100)))
        put(ir, 1, "int16", round(s.material_c * 10))
        put(ir, 2, "uint16", 0 if s.moisture_pct > 0 else 1)
        return {"input": ir}

    return tables


def belt_tables(world: OreWorld) -> Callable[[], Tables]:
    """Belt PLC: discrete 0 running, 1 metal detected (latched); holding 0 lot number, 1 hold number,
    2 metal detector trips (counter), 3 sampler cutter cycles (counter, wraps at 65536)."""

    def tables() -> Tables:
        s = world.belt()
        return {"discrete": {0: int(s.running), 1: int(s.metal_detected)},
                "holding": {0: s.lot_no % 65536, 1: s.hold_no, 2: s.metal_events % 65536,
                            3: s.cutter_cycles % 65536}}

    return tables


def portal_tables(world: OreWorld) -> Callable[[], Tables]:
    """Radiation portal monitor: input 0-1 gamma count rate cps (float32), 2-3 background cps,
    4 alarm counter; discrete 0 gamma alarm."""

    def tables() -> Tables:
        s = world.belt()
        ir: dict[int, int] = {}
        put(ir, 0, "float32", s.gamma_cps)
        put(ir, 2, "float32", s.gamma_background_cps)
        put(ir, 4, "uint16", s.gamma_alarms % 65536)
        return {"input": ir, "discrete": {0: int(s.gamma_alarm)}}

    return tables


# --- MT-SICS bench balance -----------------------------------------------------------------------

class Bench:
    """The sample-room balance: increments and moisture test portions put on and taken off in cycles
    (wall time, a person's pace). force() pins the displayed weight for tests."""

    def __init__(self, seed: int | None = None, cycle_s: float = 8.0, capacity_g: float = 6200.0) -> None:
        self.rng = random.Random(seed)
        self.cycle_s = cycle_s
        self.capacity_g = capacity_g
        self.t0 = time.monotonic()
        self.zero_offset = 0.0
        self._cycle = -1
        self._load = 0.0
        self._forced: tuple[float, bool] | None = None
        self._lock = threading.Lock()

    def force(self, weight_g: float | None, motion: bool = False) -> None:
        self._forced = None if weight_g is None else (weight_g, motion)

    def sample(self, now: float | None = None) -> tuple[float, bool]:
        """(gross weight in g, motion)."""
        if self._forced is not None:
            return self._forced
        with self._lock:
            t = (time.monotonic() if now is None else now) - self.t0
            cycle, phase = divmod(t, self.cycle_s)
            if int(cycle) != self._cycle:
                self._cycle = int(cycle)
                self._load = round(self.rng.uniform(400.0, 2500.0), 2)
            f = phase / self.cycle_s
            if f < 0.2:
                return 0.0, False
            if f < 0.35:
                k = (f - 0.2) / 0.15
                return round(self._load * (1 + 0.1 * (1 - k) * math.sin(40 * k)), 2), True
            if f < 0.9:
                return self._load, False
            return round(self._load * (1 - (f - 0.9) * 10), 2), True


class SicsBalanceSim(DeviceSim):
    """Answers MT-SICS level-0 commands. Faults.mangle garbles replies (flipped bits, lost bytes)."""

    SERIAL = "B642117519"

    def __init__(self, bench: Bench, faults: Faults | None = None) -> None:
        super().__init__(faults)
        self.bench = bench
        self.commands = 0

    def reply(self, line: bytes) -> bytes:
        try:
            cmd = line.decode("ascii")
        except UnicodeDecodeError:
            return sics.TRANSMISSION_ERROR
        if not cmd.isprintable():
            return sics.TRANSMISSION_ERROR
        weight, motion = self.bench.sample()
        net = weight - self.bench.zero_offset
        if cmd in ("S", "SI"):
            if net > self.bench.capacity_g:
                return sics.status("S", "+")
            if net < -self.bench.capacity_g * 0.02:
                return sics.status("S", "-")
            if cmd == "S" and motion:
                return sics.status("S", "I")  # no stable value within the balance's own timeout
            return sics.weight(net, "g", stable=not motion)
        if cmd == "Z":
            if motion:
                return sics.status("Z", "I")
            if abs(weight) > self.bench.capacity_g * 0.02:
                return sics.status("Z", "+")  # outside the zero-setting range
            self.bench.zero_offset = weight
            return sics.status("Z", "A")
        if cmd == "ZI":  # zero immediately: done, under stable (S) or dynamic (D) conditions
            if abs(weight) > self.bench.capacity_g * 0.02:
                return sics.status("ZI", "+")
            self.bench.zero_offset = weight
            return sics.status("ZI", "D" if motion else "S")
        if cmd in ("@", "I4"):
            if cmd == "@":
                self.bench.zero_offset = 0.0
            return sics.serial_number(self.SERIAL)
        return sics.SYNTAX_ERROR

    def serve(self, conn: Conn, stop: threading.Event) -> None:
        buf = bytearray()
        while not stop.is_set() and not conn.closed:
            data = conn.read(0.05)
            if not data:
                continue
            buf += data
            while True:
                end = buf.find(b"\n")
                if end < 0:
                    if len(buf) > 256:
                        buf.clear()
                    break
                line = bytes(buf[:end]).rstrip(b"\r")
                del buf[: end + 1]
                self.commands += 1
                if self.faults.paused:
                    continue
                conn.write(self.faults.mangle(self.reply(line)))


# --- cross-belt analyser -------------------------------------------------------------------------

class AnalyserSim(DeviceSim):
    """Pushes each new result block of the world's analyser to every connected client, and a $STAT
    line every `stat_every_s` wall seconds. Faults.mangle damages blocks; pause() silences it."""

    def __init__(self, world: OreWorld, stat_every_s: float = 2.0, faults: Faults | None = None) -> None:
        super().__init__(faults)
        self.world = world
        self.stat_every_s = stat_every_s
        self.sent = 0

    def serve(self, conn: Conn, stop: threading.Event) -> None:
        last = self.world.last_seq()
        next_stat = 0.0
        while not stop.is_set() and not conn.closed:
            conn.read(0.1)  # nothing is expected from the client; this also notices a closed socket
            if self.faults.paused:
                continue
            for r in self.world.results_after(last):
                last = r.seq
                block = analyser_wire.result(
                    r.seq, r.ts, r.interval_s, r.tonnes, r.status, r.own, r.counts.astype(int).tolist(),
                    live_time_s=r.interval_s, kev_per_channel=10_000.0 / len(r.counts))
                conn.write(self.faults.mangle(block))
                self.sent += 1
            now = time.monotonic()
            if now >= next_stat:
                next_stat = now + self.stat_every_s
                conn.write(analyser_wire.status_line(time.time(), "RUN", 31.5 + random.uniform(-0.3, 0.3)))


class AnalyserFileSim:
    """The analyser's vendor software writing result files into a directory: one CSV file per new
    result of the world (`result-<seq>.csv`), written under a temporary name and renamed, as export
    tools do. `write_new()` writes what is new now; start() does it every `every_s` seconds."""

    def __init__(self, world: OreWorld, directory: Path, every_s: float = 1.0) -> None:
        self.world, self.directory, self.every_s = world, directory, every_s
        self.written = 0
        self._last = world.last_seq()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def write_new(self) -> int:
        new = self.world.results_after(self._last)
        for r in new:
            self._last = r.seq
            data = analyser_wire.result_csv([(f"{r.seq:08d}", r.ts, r.tonnes, r.status, r.own)])
            tmp = self.directory / f".result-{r.seq:08d}.tmp"
            tmp.write_bytes(data)
            tmp.rename(self.directory / f"result-{r.seq:08d}.csv")
            self.written += 1
        return len(new)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.write_new()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="analyser-files", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


# --- radiation portal monitor, ANSI N42.42 over TCP -------------------------------------------------

PORTAL_DETECTORS = [n42.Detector("GA", "Gamma A", "Gamma", "PVT"), n42.Detector("GB", "Gamma B", "Gamma", "PVT"),
                    n42.Detector("NA", "Neutron A", "Neutron", "He3"),
                    n42.Detector("NB", "Neutron B", "Neutron", "He3")]


class PortalN42Sim(DeviceSim):
    """A two-sided belt portal (2 gamma PVT panels, 2 He-3 neutron tubes) that pushes one N42.42
    document per occupancy (a belt segment of the world) to every connected client. Counts are Poisson
    draws of the world's mean rates, split over the panels; the background measurement is drawn from
    the background rate over `background_s`. The portal's own alarm rule, per channel: a slice whose
    count rate exceeds background + `sigmas` x its standard deviation (sqrt(background cps / slice s)).
    Faults.mangle damages documents; pause() silences it."""

    def __init__(self, world: OreWorld, faults: Faults | None = None, seed: int | None = None,
                 background_s: float = 60.0, sigmas: float = 8.0, instrument: str = "RPM-BELT-1") -> None:
        super().__init__(faults)
        self.world = world
        self.rng = np.random.default_rng(seed)
        self.background_s = background_s
        self.sigmas = sigmas
        self.instrument = instrument
        self.sent = 0
        self.alarms = 0  # documents with an alarm

    def document(self, occ: PortalOut) -> bytes:
        rng = self.rng
        bg = {"Gamma": occ.gamma_background_cps, "Neutron": occ.neutron_background_cps}

        def counts(gamma_cps: float, neutron_cps: float, seconds: float) -> dict[str, int]:
            rate = {"Gamma": gamma_cps, "Neutron": neutron_cps}
            return {d.id: int(rng.poisson(rate[d.category] * seconds / 2)) for d in PORTAL_DETECTORS}

        background = n42.Slice(occ.start_ts - self.background_s, self.background_s,
                               counts(bg["Gamma"], bg["Neutron"], self.background_s))
        slices = [n42.Slice(occ.start_ts + off, dt, counts(g, nn, dt)) for off, dt, g, nn in occ.steps]
        alarms, thresholds = [], {}
        for category, b in bg.items():
            dets = [d.id for d in PORTAL_DETECTORS if d.category == category]
            dt = min(s.seconds for s in slices)
            thresholds[category] = b + self.sigmas * math.sqrt(b / dt)
            for s in slices:
                cps = sum(s.counts[d] for d in dets) / s.seconds
                if cps > thresholds[category]:
                    alarms.append(n42.Alarm(category, s.start, f"{category} alarm: {cps:.0f} cps > "
                                            f"{thresholds[category]:.0f} cps", dets))
                    break
        self.alarms += bool(alarms)
        return n42.document(uuid=str(uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | occ.no, version=4)),
                            instrument=self.instrument, detectors=PORTAL_DETECTORS, background=background,
                            occupancy=f"Occupancy-{occ.no}", foreground=slices, alarms=alarms,
                            thresholds_cps=thresholds)

    def serve(self, conn: Conn, stop: threading.Event) -> None:
        last = self.world.last_occupancy()
        while not stop.is_set() and not conn.closed:
            conn.read(0.1)  # nothing is expected from the client; this also notices a closed socket
            if self.faults.paused:
                continue
            for occ in self.world.occupancies_after(last):
                last = occ.no
                conn.write(self.faults.mangle(self.document(occ)))
                self.sent += 1
