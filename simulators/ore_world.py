"""The simulated iron-ore unloading belt: one world that every station instrument reads from.

A ship's lot (a few holds) passes the belt. Each hold has its own true Fe / SiO2 / Al2O3 / moisture,
which drift slowly within the hold. The belt runs at a nominal rate with noise, stops now and then,
trips on tramp metal (the metal detector latches until restart), and the radiation portal raises a
gamma alarm occasionally (and, when configured, a neutron alarm). The portal sees the belt as a run
of occupancies, one per `portal_segment_s` of running belt (PortalOut: the mean gamma and neutron
count rates per step, from which an N42.42 portal draws its counts). A cross-belt PGNAA analyser
integrates the material of each minute into a 1,024-channel gamma spectrum computed from the true
composition (capture lines of H, Si, Fe, Al, Ca, O with escape peaks, a Compton continuum, the source
background, Poisson noise and detector gain drift) and reports its own assays. Time is simulated
time: `speed` simulated seconds pass per wall second.

`spectrum()` is also what models/ore_grade.py trains on: the model never sees the world's truth
except through spectra generated the same way.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

CHANNELS = 1024
KEV_PER_CHANNEL = 10_000.0 / CHANNELS  # 0-10 MeV
# Prompt-gamma lines (MeV) and relative yields per element; Fe 7.631/7.646 is the Fe doublet.
LINES: dict[str, list[tuple[float, float]]] = {
    "H": [(2.223, 1.0)],
    "Si": [(3.539, 0.65), (4.934, 0.60), (2.093, 0.2)],
    "Fe": [(7.646, 0.49), (7.631, 0.54), (6.018, 0.19), (5.920, 0.19), (4.218, 0.05)],
    "Al": [(7.724, 0.27), (1.779, 1.0), (3.034, 0.1)],
    "Ca": [(6.420, 0.4), (1.943, 0.7)],
    "O": [(6.129, 0.7), (7.115, 0.1)],
}
# counts per minute for a unit mass fraction at nominal belt load (calibrates peak heights)
SENSITIVITY = {"H": 9.0e6, "Si": 2.2e6, "Fe": 1.6e6, "Al": 1.3e6, "Ca": 1.0e6, "O": 2.0e5}
NOMINAL_T_PER_MIN = 4000.0 / 60.0


@dataclass(frozen=True)
class Composition:
    """Assays in percent: Fe, SiO2, Al2O3, P, S on a dry basis; h2o (moisture) on a wet basis."""

    fe: float
    sio2: float
    al2o3: float
    h2o: float
    p: float = 0.07
    s: float = 0.02
    cao: float = 0.1

    def as_dict(self) -> dict[str, float]:
        return {"Fe": self.fe, "SiO2": self.sio2, "Al2O3": self.al2o3, "P": self.p, "S": self.s,
                "H2O": self.h2o}

    def mass_fractions(self) -> dict[str, float]:
        """Element mass fractions of the wet material the neutrons see."""
        dry = 1.0 - self.h2o / 100.0
        fe2o3 = self.fe / 0.6994
        oxygen = (fe2o3 - self.fe) + self.sio2 * 0.5326 + self.al2o3 * 0.4707 + self.cao * 0.2853
        return {"H": self.h2o / 100.0 * 0.1119, "Si": dry * self.sio2 / 100.0 * 0.4674,
                "Fe": dry * self.fe / 100.0, "Al": dry * self.al2o3 / 100.0 * 0.5293,
                "Ca": dry * self.cao / 100.0 * 0.7147, "O": dry * oxygen / 100.0 + self.h2o / 100.0 * 0.8881}


def channel_energies(gain: float = 1.0, offset_kev: float = 0.0) -> np.ndarray:
    """Energy (keV) at the centre of each channel for a detector gain factor and offset."""
    return (np.arange(CHANNELS) + 0.5) * KEV_PER_CHANNEL * gain + offset_kev


def _peaks(energies: np.ndarray, lines: list[tuple[float, float]]) -> np.ndarray:
    """Unit-yield shape of an element's lines on a NaI detector (7 % FWHM at 662 keV, ~1/sqrt(E)),
    with single and double escape peaks for lines above 3 MeV; integrates to ~sum of yields."""
    e_mev = energies / 1000.0
    width = energies[1] - energies[0]
    out = np.zeros_like(energies)
    for energy, y in lines:
        parts = [(energy, y)]
        if energy > 3.0:
            parts += [(energy - 0.511, 0.45 * y), (energy - 1.022, 0.2 * y)]
        for e, w in parts:
            sigma = 0.07 * math.sqrt(0.662 * e) / 2.355
            out += w * np.exp(-0.5 * ((e_mev - e) / sigma) ** 2) * (width / 1000.0) / (sigma * math.sqrt(2 * math.pi))
    return out


def spectrum_mean(comp: Composition, load: float = 1.0, gain: float = 1.0, offset_kev: float = 0.0,
                  live_time_s: float = 60.0) -> np.ndarray:
    """Expected counts per channel (before Poisson noise) for one analysis interval.
    `load`: belt loading relative to nominal (the count rate of the material scales with it)."""
    e = channel_energies(gain, offset_kev)
    frac = comp.mass_fractions()
    t = live_time_s / 60.0
    lam = np.zeros(CHANNELS)
    for el, lines in LINES.items():
        lam += SENSITIVITY[el] * frac[el] * _peaks(e, lines)
    # Compton continuum of the material and the fixed background of the source and structure
    continuum = 2.0e3 * np.exp(-e / 1500.0) + 60.0 * np.exp(-e / 4000.0)
    background = 150.0 * np.exp(-e / 900.0) + 8.0
    return t * (load * (lam + continuum) + background)


def spectrum(comp: Composition, rng: np.random.Generator, load: float = 1.0, gain: float = 1.0,
             offset_kev: float = 0.0, live_time_s: float = 60.0) -> np.ndarray:
    """Counts per channel with Poisson noise (float32, what the analyser transmits)."""
    return rng.poisson(spectrum_mean(comp, load, gain, offset_kev, live_time_s)).astype(np.float32)


@dataclass
class AnalysisOut:
    """One analyser result as the simulator produced it, with the truth kept for tests."""

    seq: int
    ts: float
    interval_s: float
    tonnes: float
    status: str
    truth: Composition | None
    own: dict[str, float]  # the analyser's own assays
    counts: np.ndarray
    gain: float
    lot_no: int
    hold_no: int


@dataclass
class BeltState:
    running: bool = False
    rate_tph: float = 0.0
    speed_mps: float = 0.0
    total_t: float = 0.0
    lot_no: int = 1
    hold_no: int = 1
    lot_t: float = 0.0  # tonnes of the current lot so far
    moisture_pct: float = 0.0  # what the microwave analyser measures now (0 when the belt is empty)
    material_c: float = 22.0
    gamma_cps: float = 0.0
    gamma_background_cps: float = 110.0
    gamma_alarm: bool = False
    gamma_alarms: int = 0
    neutron_cps: float = 0.0  # mean neutron count rate at the portal now
    neutron_background_cps: float = 3.0
    neutron_events: int = 0
    metal_detected: bool = False
    metal_events: int = 0
    stops: int = 0
    cutter_cycles: int = 0  # the primary sampler's cutter-cycle counter (the belt PLC counts the cuts)
    cuts_missed: int = 0  # increments due that the cutter did not take (fault)


@dataclass
class PortalOut:
    """One portal occupancy: a belt segment. `steps`: (seconds since `start_ts`, seconds, mean gamma
    cps, mean neutron cps) per integration step; backgrounds are the mean rates without a source."""

    no: int
    start_ts: float  # wall clock (UTC unix) of the segment's start
    steps: list[tuple[float, float, float, float]]
    gamma_background_cps: float
    neutron_background_cps: float
    lot_no: int
    hold_no: int


@dataclass
class WorldConfig:
    seed: int = 0
    speed: float = 60.0  # simulated seconds per wall second
    rate_tph: float = 4000.0
    belt_speed_mps: float = 4.5
    lot_t: float = 1200.0  # tonnes per lot (a ship's lot is far bigger; this is a demo-sized lot)
    holds: int = 3
    lot_gap_s: float = 300.0  # belt stopped between lots (ship change), simulated seconds
    analysis_interval_s: float = 60.0
    stops_per_h: float = 0.5
    gamma_alarms_per_h: float = 0.3
    metal_per_h: float = 0.4
    # A schedule on top of the rates: a gamma alarm / tramp metal for sure every this many simulated
    # seconds, the first at that time (a metal trip waits for the belt to run). 0: the rates alone.
    gamma_every_s: float = 0.0
    metal_every_s: float = 0.0
    neutron_per_h: float = 0.0  # a neutron source passing the portal
    neutron_every_s: float = 0.0
    portal_segment_s: float = 60.0  # belt seconds per portal occupancy
    analyser_drift_pct_per_h: float = 0.0  # bias of the analyser's own Fe assay, growing
    detector_drift_per_h: float = 0.0  # relative gain drift of the detector (stabiliser off)
    moisture_noise_pct: float = 0.15
    sampler_increment_t: float = 25.0  # the primary sampler cuts every this many tonnes of the lot (mass basis)
    miss_cut_every: int = 0  # fault: the cutter misses every n-th increment of a lot (0: never)
    fe_mean: float = 62.0
    moisture_mean: float = 8.0


class OreWorld:
    """Thread-safe; every accessor first advances simulated time to now."""

    STEP_S = 5.0  # integration step, simulated seconds

    def __init__(self, cfg: WorldConfig | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg or WorldConfig()
        self.clock = clock
        self.wall_clock = wall_clock
        self.rng = np.random.default_rng(self.cfg.seed)
        self._lock = threading.RLock()
        self._t0 = clock()
        self.t = 0.0  # simulated seconds since start
        self.state = BeltState()
        self.results: deque[AnalysisOut] = deque(maxlen=16)
        self._seq = 0
        self._acc_t = 0.0
        self._acc_sum = np.zeros(4)
        self._next_analysis = self.cfg.analysis_interval_s
        self._stop_until = 0.0
        self._gap_until = 0.0
        self._gamma_until = 0.0
        self._gamma_episode_until = 0.0
        self._hold_base: list[Composition] = []
        self._walk = np.zeros(4)
        self.gain = 1.0
        self.lot_truth: dict[int, np.ndarray] = {}  # lot_no -> [tonnes, sum t*Fe, t*SiO2, t*Al2O3, t*H2O]
        self._force_gamma = self._force_metal = self._force_neutron = False
        self._miss_cuts = 0
        self._neutron_until = 0.0
        self.portal: deque[PortalOut] = deque(maxlen=16)
        self._segment: PortalOut | None = None
        self._portal_no = 0
        self._new_lot()
        self.state.running = True

    # --- the lot -------------------------------------------------------------------------------
    def _new_lot(self) -> None:
        c, r = self.cfg, self.rng
        fe = c.fe_mean + r.normal(0, 1.2)
        h2o = c.moisture_mean + r.normal(0, 0.8)
        self._hold_base = []
        for _ in range(c.holds):
            hf = float(np.clip(fe + r.normal(0, 0.8), 55.0, 67.0))
            self._hold_base.append(Composition(
                fe=hf, sio2=float(np.clip(4.5 - 0.6 * (hf - 62.0) + r.normal(0, 0.5), 1.5, 11.0)),
                al2o3=float(np.clip(2.2 + r.normal(0, 0.35), 0.8, 4.0)),
                h2o=float(np.clip(h2o + r.normal(0, 0.6), 2.0, 13.0)),
                p=float(np.clip(0.07 + r.normal(0, 0.01), 0.02, 0.15)),
                s=float(np.clip(0.02 + r.normal(0, 0.005), 0.005, 0.08))))
        self._walk = np.zeros(4)
        self.state.lot_t = 0.0
        self.state.hold_no = 1

    def truth(self) -> Composition:
        """The composition of the material on the belt now."""
        base = self._hold_base[min(self.state.hold_no, len(self._hold_base)) - 1]
        w = self._walk
        return replace(base, fe=float(np.clip(base.fe + w[0], 50, 68)),
                       sio2=float(np.clip(base.sio2 + w[1], 1.0, 12.0)),
                       al2o3=float(np.clip(base.al2o3 + w[2], 0.5, 5.0)),
                       h2o=float(np.clip(base.h2o + w[3], 1.0, 14.0)))

    # --- time ----------------------------------------------------------------------------------
    def now_sim(self) -> float:
        return (self.clock() - self._t0) * self.cfg.speed

    def advance(self, to: float | None = None) -> None:
        with self._lock:
            target = self.now_sim() if to is None else to
            while self.t < target:
                dt = min(self.STEP_S, target - self.t)
                self._step(dt)
                self.t += dt

    def _p(self, per_h: float, dt: float) -> bool:
        return per_h > 0 and self.rng.random() < per_h * dt / 3600.0

    def _scheduled(self, every_s: float, dt: float) -> bool:
        """A multiple of `every_s` falls in this step (t, t + dt]."""
        return every_s > 0 and (self.t + dt) // every_s > self.t // every_s

    def _latch_s(self, sim_s: float) -> float:
        """A latched signal lasts `sim_s` simulated seconds but at least 2 wall seconds, so a poller
        at any demo speed sees it."""
        return max(sim_s, 2.0 * self.cfg.speed)

    def _step(self, dt: float) -> None:
        c, s, r = self.cfg, self.state, self.rng
        t = self.t
        # events
        self._force_gamma |= self._scheduled(c.gamma_every_s, dt)
        self._force_metal |= self._scheduled(c.metal_every_s, dt)
        if s.running and self._p(c.stops_per_h, dt):
            self._stop_until = t + r.uniform(60, 240)
            s.stops += 1
        if s.running and (self._force_metal or self._p(c.metal_per_h, dt)):
            self._force_metal = False
            s.metal_detected = True  # the detector trips the belt and latches until restart
            s.metal_events += 1
            self._stop_until = max(self._stop_until, t + self._latch_s(120))
            s.stops += 1
        if t >= self._gamma_episode_until and (self._force_gamma or self._p(c.gamma_alarms_per_h, dt)):
            self._force_gamma = False
            self._gamma_until = t + r.uniform(20, 60)
            self._gamma_episode_until = t + self._latch_s(120)
        running = t >= self._stop_until and t >= self._gap_until
        if running and not s.running:
            s.metal_detected = False  # operator cleared the trip and restarted
        s.running = running
        # gamma: background plus a source passing when an episode is on
        source = self._gamma_source(t)
        s.gamma_cps = max(0.0, s.gamma_background_cps + source + r.normal(0, math.sqrt(s.gamma_background_cps)))
        alarm = t < self._gamma_episode_until
        if alarm and not s.gamma_alarm:
            s.gamma_alarms += 1
        s.gamma_alarm = alarm
        self._portal_step(t, dt)
        # belt
        if s.running:
            s.rate_tph = max(0.0, c.rate_tph * (1 + 0.08 * math.sin(t / 97.0) + r.normal(0, 0.02)))
            s.speed_mps = c.belt_speed_mps * (1 + r.normal(0, 0.002))
        else:
            s.rate_tph, s.speed_mps = 0.0, 0.0
        tonnes = s.rate_tph * dt / 3600.0
        s.total_t += tonnes
        step = c.sampler_increment_t
        for k in range(int(s.lot_t // step) + 1, int((s.lot_t + tonnes) // step) + 1):
            self._cut(k)
        s.lot_t += tonnes
        self._walk = 0.995 * self._walk + r.normal(0, [0.05, 0.04, 0.015, 0.04]) * math.sqrt(dt / 5.0)
        truth = self.truth()
        if tonnes > 0:
            self._acc_t += tonnes
            comp = np.array([truth.fe, truth.sio2, truth.al2o3, truth.h2o])
            self._acc_sum += tonnes * comp
            lt = self.lot_truth.setdefault(s.lot_no, np.zeros(5))
            lt += np.concatenate([[tonnes], tonnes * comp])
            s.moisture_pct = truth.h2o + r.normal(0, c.moisture_noise_pct) + 0.1
            s.material_c = 22.0 + r.normal(0, 0.2)
        else:
            s.moisture_pct = 0.0
        hold = min(c.holds, 1 + int(s.lot_t / (c.lot_t / c.holds)))
        if hold != s.hold_no:
            s.hold_no = hold
            self._walk = np.zeros(4)
        if s.lot_t >= c.lot_t and t >= self._gap_until:
            self._gap_until = t + c.lot_gap_s  # ship change: next lot after the gap
            s.lot_no += 1
            self._new_lot()
        self.gain *= 1 + c.detector_drift_per_h * dt / 3600.0
        if t + dt >= self._next_analysis:
            self._analysis(t + dt)
            self._next_analysis += c.analysis_interval_s

    def _cut(self, k: int) -> None:
        """The sampler's k-th increment of the lot falls due: the cutter cycles, unless it misses."""
        s = self.state
        if self._miss_cuts > 0 or (self.cfg.miss_cut_every and k % self.cfg.miss_cut_every == 0):
            self._miss_cuts = max(0, self._miss_cuts - 1)
            s.cuts_missed += 1
        else:
            s.cutter_cycles += 1

    def _gamma_source(self, t: float) -> float:
        """The extra gamma count rate of a source passing the portal (0 outside an episode)."""
        return 900.0 * math.exp(-((t - (self._gamma_until - 30)) / 15.0) ** 2) if t < self._gamma_until else 0.0

    def _portal_step(self, t: float, dt: float) -> None:
        """A neutron source passes (rate or schedule); the portal records the step of a running belt."""
        c, s = self.cfg, self.state
        self._force_neutron |= self._scheduled(c.neutron_every_s, dt)
        if t >= self._neutron_until and (self._force_neutron or self._p(c.neutron_per_h, dt)):
            self._force_neutron = False
            self._neutron_until = t + 30.0
            s.neutron_events += 1
        s.neutron_cps = s.neutron_background_cps + (40.0 if t < self._neutron_until else 0.0)
        source = self._gamma_source(t)
        seg = self._segment
        if not s.running:
            if seg is not None:
                self.portal.append(seg)
                self._segment = None
            return
        if seg is None:
            self._portal_no += 1
            wall = self.wall_clock() - (self.now_sim() - t) / c.speed
            seg = self._segment = PortalOut(self._portal_no, wall, [], s.gamma_background_cps,
                                            s.neutron_background_cps, s.lot_no, s.hold_no)
        offset = sum(step[1] for step in seg.steps)
        seg.steps.append((offset, dt, s.gamma_background_cps + source, s.neutron_cps))
        if offset + dt >= c.portal_segment_s:
            self.portal.append(seg)
            self._segment = None

    def _analysis(self, t: float) -> None:
        c, r = self.cfg, self.rng
        self._seq += 1
        tonnes = self._acc_t
        load = tonnes / (NOMINAL_T_PER_MIN * c.analysis_interval_s / 60.0)
        truth: Composition | None = None
        own: dict[str, float] = {}
        if tonnes > 0.05 * NOMINAL_T_PER_MIN:
            fe, sio2, al2o3, h2o = (self._acc_sum / tonnes).tolist()
            truth = replace(self.truth(), fe=fe, sio2=sio2, al2o3=al2o3, h2o=h2o)
            status = "OK"
            bias = c.analyser_drift_pct_per_h * t / 3600.0
            own = {"Fe": fe + bias + r.normal(0, 0.25), "SiO2": sio2 + r.normal(0, 0.2),
                   "Al2O3": al2o3 + r.normal(0, 0.1), "P": truth.p + r.normal(0, 0.005),
                   "S": truth.s + r.normal(0, 0.003), "H2O": h2o + r.normal(0, 0.3)}
            counts = spectrum(truth, r, load=load, gain=self.gain * (1 + r.normal(0, 0.001)))
        else:
            status = "NOLOAD"
            empty = Composition(fe=0.0, sio2=0.0, al2o3=0.0, h2o=0.0, p=0.0, s=0.0, cao=0.0)
            counts = spectrum(empty, r, load=0.0, gain=self.gain)
        wall = self.wall_clock() - (self.now_sim() - t) / c.speed
        self.results.append(AnalysisOut(self._seq, wall, c.analysis_interval_s, tonnes, status, truth, own,
                                        counts, self.gain, self.state.lot_no, self.state.hold_no))
        self._acc_t = 0.0
        self._acc_sum = np.zeros(4)

    # --- what instruments read -----------------------------------------------------------------
    def trigger_gamma(self) -> None:
        """A source passes the portal at the next step (tests, drills)."""
        with self._lock:
            self._force_gamma = True

    def trigger_neutron(self) -> None:
        """A neutron source passes the portal at the next step (tests, drills)."""
        with self._lock:
            self._force_neutron = True

    def occupancies_after(self, no: int) -> list[PortalOut]:
        """The portal occupancies completed after occupancy `no`."""
        with self._lock:
            self.advance()
            return [o for o in self.portal if o.no > no]

    def last_occupancy(self) -> int:
        with self._lock:
            self.advance()
            return self.portal[-1].no if self.portal else 0

    def miss_cuts(self, n: int = 1) -> None:
        """The cutter misses the next `n` increments (tests, drills: a jammed cutter)."""
        with self._lock:
            self._miss_cuts += n

    def trigger_metal(self) -> None:
        with self._lock:
            self._force_metal = True

    def lot_mean(self, lot_no: int) -> dict[str, float]:
        """The true tonnage-weighted composition of a lot so far."""
        with self._lock:
            lt = self.lot_truth[lot_no]
            return {"tonnes": float(lt[0]), "fe": float(lt[1] / lt[0]), "sio2": float(lt[2] / lt[0]),
                    "al2o3": float(lt[3] / lt[0]), "h2o": float(lt[4] / lt[0])}

    def belt(self) -> BeltState:
        with self._lock:
            self.advance()
            return replace(self.state)

    def results_after(self, seq: int) -> list[AnalysisOut]:
        with self._lock:
            self.advance()
            return [r for r in self.results if r.seq > seq]

    def last_seq(self) -> int:
        with self._lock:
            self.advance()
            return self._seq


def simulate_lot(seed: int, lots: int = 1, **overrides: float) -> list[AnalysisOut]:
    """Every analyser result (with the truth) of `lots` lots, produced without waiting."""
    clock = [0.0]
    cfg = WorldConfig(seed=seed, speed=1.0, gamma_alarms_per_h=0.0, metal_per_h=0.0, **overrides)  # type: ignore[arg-type]
    world = OreWorld(cfg, clock=lambda: clock[0], wall_clock=lambda: 1.7e9 + clock[0])
    out: list[AnalysisOut] = []
    while world.state.lot_no <= lots:
        clock[0] += 600.0
        world.advance()
        out += [r for r in world.results if not out or r.seq > out[-1].seq]
    return [r for r in out if r.lot_no <= lots]
