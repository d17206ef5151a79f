"""The gate's world: travellers walking past a 32x24 thermal array, rendered as the sensor would see them.

Geometry (metres, seconds). The sensor (MLX90640 BAB, 55° x 35°) hangs on the lane's side wall at 1.6 m
and looks across the lane at an oblique angle, so each face is seen in three-quarter view while the
traveller crosses the image from left to right. A traveller walks along x at a lateral distance d
(the lane's guide rails keep adults at 0.9-1.6 m; a "child close to the sensor" walks at 0.7-0.95 m).
A point (x, z) at distance d falls on column 15.5 + x / (d * KX) and row 11.5 + (SENSOR_Z - z) / (d * KZ).
Pixels average the scene over their footprint (d*KX by d*KZ metres), so a far face is diluted by the
cooler skin, hair and background around its hottest spot: that is what the model's distance compensation undoes.

Walking makes the head bob (~2 cm at the step frequency), so the hot spot crosses pixel boundaries
from frame to frame. Physiology (simplified, documented in docs/gate.md): inner eye corner (canthus) = core - 0.45 -
0.04 * (28 - ambient) +- 0.1 (per person); the rest of the face is 1.0 + 0.05 * (28 - ambient) +- 0.25 K
cooler than the canthus. Afebrile cores ~ N(36.75, 0.2) truncated to 36.0-37.2; febrile cores ~ U(37.6,
39.5). Confounders: a hot drink (a 45-62 °C cup at the chest or at the mouth), a sun-heated face (skin
+1.5-3.5 K, canthus half of that), a child close to the sensor (small head seen large). Ambient drifts
slowly; pixels carry ~0.1 K noise; a few pixels are dead.

The camera itself reads every pixel off by an offset that drifts slowly (`camera_offset_c` +
`camera_drift_k`, zero by default). An optional blackbody (`blackbody`: a rows x cols box of the frame
at `blackbody_c`) is the external temperature reference that cancels that offset; its faults: it drifts
itself (`blackbody_drift_k_per_h`), it is mounted across the lane so travellers walk in front of it
(`blackbody_behind`), it is missing (switched off or removed) during `blackbody_off`.

Everything is deterministic for a seed. `truth` holds one TravellerTruth per generated traveller.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import IO, Literal

import numpy as np

ROWS, COLS = 24, 32  # the default optics (MLX90640 BAB); a world's own are in `GateWorld.optics`
HFOV_DEG, VFOV_DEG = 55.0, 35.0
KX = 2 * math.tan(math.radians(HFOV_DEG / 2)) / COLS  # pixel width per metre of distance
KZ = 2 * math.tan(math.radians(VFOV_DEG / 2)) / ROWS
SENSOR_Z = 1.6
X_START, X_END = -2.6, 2.6  # the corridor a traveller walks, relative to the sensor axis
X_ENTRY, X_EXIT = -0.9, 0.9  # the passage sensor's entry and exit beams
MIN_GAP_M = 1.0  # a queue: nobody walks closer than this behind the one in front
DEAD_C = -273.15  # what a dead pixel reads

Confounder = Literal["none", "hot_drink", "sun", "child"]


@dataclass(frozen=True)
class Optics:
    """A thermal camera's sensor and lens, as the world renders for it. Sources for the presets: MLX90640
    BAB datasheet (Melexis, 55° x 35°, 32 x 24, up to 64 Hz; 8 Hz used); FLIR Lepton 3.5 datasheet (160 x
    120, 57° HFOV, 71° diagonal, < 9 Hz: 8.7 Hz), the vertical FOV from the aspect; a 384 x 288 17 µm
    microbolometer behind a 7.5 mm lens: 2·atan(384·17 µm / 2 / 7.5 mm) = 47.0° x 36.2°, 25 Hz."""

    name: str
    cols: int
    rows: int
    hfov_deg: float
    vfov_deg: float
    rate_hz: float

    @property
    def kx(self) -> float:
        return 2 * math.tan(math.radians(self.hfov_deg / 2)) / self.cols

    @property
    def kz(self) -> float:
        return 2 * math.tan(math.radians(self.vfov_deg / 2)) / self.rows

    @property
    def scale(self) -> float:
        """Pixels per MLX90640 pixel, horizontally: what pixel-counted limits scale by."""
        return self.cols / COLS

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


MLX90640 = Optics("mlx90640-bab", COLS, ROWS, HFOV_DEG, VFOV_DEG, 8.0)
LEPTON35 = Optics("lepton35", 160, 120, 57.0, round(2 * math.degrees(math.atan(math.tan(math.radians(28.5)) * 0.75)),
                                                    1), 8.7)
IR384 = Optics("ir384-7.5mm", 384, 288, 47.0, 36.2, 25.0)
OPTICS = {o.name: o for o in (MLX90640, LEPTON35, IR384)}


@dataclass(frozen=True)
class WorldParams:
    rate_per_h: float = 1500.0  # travellers per hour (a lane passes 1,000-2,000)
    febrile_share: float = 0.003
    febrile_every: int = 0  # and every n-th traveller for sure (a schedule for demos and tests); 0: none
    hot_drink_share: float = 0.01
    sun_share: float = 0.005  # arrived from outdoors without time to acclimatise
    child_share: float = 0.03
    ambient_c: float = 22.0  # hall air temperature at t = 0
    ambient_drift_k: float = 1.5  # amplitude of the slow drift
    drift_period_s: float = 4 * 3600.0
    noise_k: float = 0.1  # pixel noise, K RMS
    dead_pixels: int = 2
    min_headway_s: float = 0.9  # the gate lets one traveller through at a time
    camera_offset_c: float = 0.0  # the camera's own error, added to every pixel it reads
    camera_drift_k: float = 0.0  # ... drifting slowly by this amplitude
    camera_drift_period_s: float = 3600.0
    blackbody: tuple[int, int, int, int] | None = None  # first row, last+1, first column, last+1
    blackbody_c: float = 35.0  # its set-point
    blackbody_drift_k_per_h: float = 0.0  # fault: the blackbody's own temperature drifts
    blackbody_behind: bool = False  # fault: across the lane, travellers walk in front of it
    blackbody_off: tuple[float, float] | None = None  # fault: missing (off, removed) in [from, to) s
    optics: Optics = MLX90640  # the camera the world is rendered for


@dataclass(frozen=True)
class TravellerTruth:
    id: int
    core_c: float
    febrile: bool
    confounder: Confounder
    distance_m: float
    height_m: float
    speed_mps: float
    t_entry: float  # world seconds at which the entry beam is broken
    t_exit: float  # ... and the exit beam
    t_in_view: float  # first and last instants any part of the traveller can be in view
    t_out_view: float
    canthus_c: float  # surface truth, for diagnostics
    face_c: float

    def to_json(self) -> str:
        return json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()})


@dataclass
class _Person:
    truth: TravellerTruth
    t0: float  # at x = X_START
    v: float
    d: float
    height: float
    rx: float  # head half-width, half-height
    rz: float
    face: float
    canthus: float
    hair: float  # share of the upper head covered by hair or a cap
    torso: float  # where clothing sits between the air (0) and the skin (1)
    cup: tuple[float, float, float] | None = None  # (dx from head centre, z, temperature)
    extra: dict[str, float] = field(default_factory=dict)

    def x(self, t: np.ndarray) -> np.ndarray:
        return X_START + self.v * (t - self.t0)


class GateWorld:
    """Deterministic traveller stream for a seed; render(times) -> float32 (n, 24, 32) frames in °C."""

    def __init__(self, seed: int = 0, params: WorldParams | None = None, truth_file: IO[str] | None = None) -> None:
        self.p = params or WorldParams()
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._noise_rng = np.random.default_rng([seed, 1])
        self.truth: list[TravellerTruth] = []
        self._people: list[_Person] = []
        self._first_live = 0  # index of the first person who may still be in view
        self._next_entry = 2.0 + self.rng.exponential(self._mean_gap())
        self._truth_file = truth_file
        self._phase = float(self.rng.uniform(0, 2 * math.pi))
        r = np.random.default_rng([seed, 2])
        o = self.optics = self.p.optics
        self.rows_n, self.cols_n, self.kx, self.kz = o.rows, o.cols, o.kx, o.kz
        rows = np.arange(o.rows, dtype=np.float32)[:, None] / np.float32(o.scale)
        wall = 0.15 * r.standard_normal((ROWS // 4 + 1, COLS // 4 + 1))
        # blotchy, like a real wall; the same wall whatever the resolution
        wall = cv2_free_resize(np.kron(wall, np.ones((4, 4)))[:ROWS, :COLS], o.rows, o.cols)
        self.wall = (wall + 0.02 * (rows - ROWS / 2)).astype(np.float32)
        n_dead = self.p.dead_pixels
        self.dead = r.choice(o.rows * o.cols, size=n_dead, replace=False) if n_dead else np.array([], dtype=int)
        self._cols = (np.arange(o.cols, dtype=np.float32) - (o.cols - 1) / 2)[None, None, :]
        self._rows = (np.arange(o.rows, dtype=np.float32) - (o.rows - 1) / 2)[None, :, None]

    # --- the world's state -------------------------------------------------------------------
    def _mean_gap(self) -> float:
        return 3600.0 / self.p.rate_per_h

    def ambient(self, t: np.ndarray | float) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        w = 2 * math.pi / self.p.drift_period_s
        return self.p.ambient_c + self.p.ambient_drift_k * (
            0.8 * np.sin(w * t + self._phase) + 0.2 * np.sin(3.1 * w * t + 2 * self._phase))

    def camera_offset(self, t: np.ndarray | float) -> np.ndarray:
        """What the camera adds to every true temperature at world time t (its own slow drift)."""
        p = self.p
        return p.camera_offset_c + p.camera_drift_k * np.sin(2 * math.pi * np.asarray(t) / p.camera_drift_period_s)

    def blackbody_temp(self, t: np.ndarray | float) -> np.ndarray:
        """The blackbody's true temperature (NaN while it is missing)."""
        t = np.asarray(t, dtype=np.float64)
        p = self.p
        temp = p.blackbody_c + p.blackbody_drift_k_per_h * t / 3600.0
        if p.blackbody_off is not None:
            temp = np.where((t >= p.blackbody_off[0]) & (t < p.blackbody_off[1]), np.nan, temp)
        return temp

    def sensor_ambient(self, t: float) -> float:
        """The module's own (die) temperature: a few kelvin above the air."""
        return float(self.ambient(t)) + 3.5

    def ensure(self, t_until: float) -> None:
        """Generate travellers whose entry is before t_until."""
        while self._next_entry <= t_until:
            self._spawn(self._next_entry)
            gap = self.p.min_headway_s + self.rng.exponential(max(1e-3, self._mean_gap() - self.p.min_headway_s))
            self._next_entry += gap

    def _spawn(self, t_entry: float) -> None:
        rng, p = self.rng, self.p
        pid = len(self.truth) + 1
        u = rng.random()
        confounder: Confounder = "none"
        if u < p.child_share:
            confounder = "child"
        elif u < p.child_share + p.hot_drink_share:
            confounder = "hot_drink"
        elif u < p.child_share + p.hot_drink_share + p.sun_share:
            confounder = "sun"
        febrile = bool(rng.random() < p.febrile_share) or (p.febrile_every > 0 and pid % p.febrile_every == 0)
        core = float(rng.uniform(37.6, 39.5))
        while not febrile and not 36.0 <= (core := float(rng.normal(36.75, 0.2))) <= 37.2:
            pass  # a truncated normal: afebrile means <= 37.2 °C
        if confounder == "child":
            d = float(rng.uniform(0.7, 0.95))
            height = float(rng.uniform(1.45, 1.65))
            rx = float(rng.uniform(0.068, 0.076))
            v = float(rng.uniform(0.9, 1.3))
        else:
            d = float(rng.uniform(0.9, 1.6))
            height = float(np.clip(rng.normal(1.70, 0.09), 1.52, 1.95))
            rx = float(rng.uniform(0.074, 0.086))
            v = float(rng.uniform(1.0, 1.6))
        # a queue: never closer than MIN_GAP_M behind the traveller in front
        if self._people:
            front = self._people[-1]
            t_front_end = front.t0 + (X_END - X_START) / front.v
            t_start = t_entry - (X_ENTRY - X_START) / v
            reach = X_END - MIN_GAP_M - X_START
            if t_front_end > t_start and v * (t_front_end - t_start) > reach:
                v = reach / (t_front_end - t_start)
        amb = float(self.ambient(t_entry))
        canthus = core - 0.45 - 0.04 * (28.0 - amb) + float(rng.normal(0, 0.1))
        face = canthus - 1.0 - 0.05 * (28.0 - amb) + float(rng.normal(0, 0.25))
        if confounder == "sun":
            s = float(rng.uniform(1.5, 3.5))
            face += s
            canthus += 0.5 * s
        t0 = t_entry - (X_ENTRY - X_START) / v
        half_view = d * self.kx * self.cols_n / 2 + 0.35
        person = _Person(
            truth=TravellerTruth(
                id=pid, core_c=core, febrile=febrile, confounder=confounder, distance_m=d, height_m=height,
                speed_mps=v, t_entry=t_entry, t_exit=t0 + (X_EXIT - X_START) / v,
                t_in_view=t0 + (-half_view - X_START) / v, t_out_view=t0 + (half_view - X_START) / v,
                canthus_c=canthus, face_c=face),
            t0=t0, v=v, d=d, height=height, rx=rx, rz=rx * 1.4, face=face, canthus=canthus,
            hair=float(rng.uniform(0.3, 0.9)), torso=float(rng.uniform(0.3, 0.55)),
            extra={"bob_m": float(rng.uniform(0.015, 0.025)), "step_hz": float(rng.uniform(1.7, 2.2)),
                   "bob_phase": float(rng.uniform(0, 2 * math.pi))},
        )
        if confounder == "hot_drink":
            at_mouth = rng.random() < 0.25
            z = height - 2.2 * person.rz if at_mouth else height - float(rng.uniform(0.45, 0.6))
            person.cup = (float(rng.uniform(0.6, 1.2)) * person.rx + (0.05 if at_mouth else 0.12), z,
                          float(rng.uniform(45.0, 62.0)))
        self._people.append(person)
        self.truth.append(person.truth)
        if self._truth_file is not None:
            self._truth_file.write(person.truth.to_json() + "\n")
            self._truth_file.flush()

    def passage_events(self, t_from: float, t_to: float) -> list[tuple[float, Literal["entry", "exit"], int]]:
        """(time, 'entry'|'exit', traveller id) for beam crossings in [t_from, t_to), sorted by time."""
        self.ensure(t_to + 1.0)
        out: list[tuple[float, Literal["entry", "exit"], int]] = []
        for tr in self.truth:
            if t_from <= tr.t_entry < t_to:
                out.append((tr.t_entry, "entry", tr.id))
            if t_from <= tr.t_exit < t_to:
                out.append((tr.t_exit, "exit", tr.id))
        out.sort()
        return out

    def in_view(self, t_from: float, t_to: float) -> list[_Person]:
        self.ensure(t_to + 10.0)
        people = self._people
        while self._first_live < len(people) and people[self._first_live].truth.t_out_view < t_from - 60.0:
            self._first_live += 1  # streams forward in time; keep a minute of slack for random access
        return [q for q in people[self._first_live:]
                if q.truth.t_in_view <= t_to and q.truth.t_out_view >= t_from]

    # --- rendering ---------------------------------------------------------------------------
    def render(self, times: np.ndarray, *, noise: bool = True, dead: bool = True) -> np.ndarray:
        """Frames at world times `times` (ascending), float32 (n, rows, cols) °C, as the sensor reads them."""
        times = np.asarray(times, dtype=np.float64)
        n = len(times)
        amb = self.ambient(times).astype(np.float32)
        img = np.empty((n, self.rows_n, self.cols_n), dtype=np.float32)
        img[:] = amb[:, None, None] + self.wall[None]
        if n == 0:
            return img
        if self.p.blackbody_behind:
            self._draw_blackbody(img, times)  # behind the lane: travellers walk in front of it
        people = self.in_view(float(times[0]), float(times[-1]))
        for person in sorted(people, key=lambda q: -q.d):  # far first: near travellers occlude them
            lo = int(np.searchsorted(times, person.truth.t_in_view))
            hi = int(np.searchsorted(times, person.truth.t_out_view, side="right"))
            step = hi - lo if self.cols_n <= COLS else 1  # high resolution: draw only around the traveller
            for a in range(lo, hi, max(1, step)):
                b = min(hi, a + max(1, step))
                self._draw(img[a:b], person, times[a:b], amb[a:b])
        if not self.p.blackbody_behind:
            self._draw_blackbody(img, times)
        if noise and self.p.noise_k > 0:
            img += self._noise_rng.standard_normal(img.shape, dtype=np.float32) * np.float32(self.p.noise_k)
        img += self.camera_offset(times).astype(np.float32)[:, None, None]
        if dead and len(self.dead):
            img.reshape(n, -1)[:, self.dead] = DEAD_C
        return img

    def _draw_blackbody(self, img: np.ndarray, times: np.ndarray) -> None:
        if self.p.blackbody is None:
            return
        r0, r1, c0, c1 = self.p.blackbody  # in the camera's own pixels
        temp = self.blackbody_temp(times).astype(np.float32)
        on = ~np.isnan(temp)  # while missing, the wall behind it shows
        img[on, r0:r1, c0:c1] = temp[on, None, None]

    def _draw(self, img: np.ndarray, q: _Person, t: np.ndarray, amb: np.ndarray) -> None:
        pw, ph = q.d * self.kx, q.d * self.kz  # pixel footprint, metres
        cols, rows = self._cols, self._rows
        if self.cols_n > COLS:  # only the pixels this traveller can touch: beside and above the torso
            xs = q.x(t)
            c0 = max(0, int((float(xs.min()) - 0.35) / pw + (self.cols_n - 1) / 2) - 1)
            c1 = min(self.cols_n, int((float(xs.max()) + 0.35) / pw + (self.cols_n - 1) / 2) + 2)
            r0 = max(0, int((SENSOR_Z - q.height - 0.05) / ph + (self.rows_n - 1) / 2) - 1)
            if c1 <= c0 or r0 >= self.rows_n:
                return
            img, cols, rows = img[:, r0:, c0:c1], cols[:, :, c0:c1], rows[:, r0:, :]
        xc = q.x(t).astype(np.float32)[:, None, None]
        X = cols * np.float32(pw) - xc  # (n, 1, cols): metres from the head's centre line
        bob = q.extra["bob_m"] * np.sin(2 * math.pi * q.extra["step_hz"] * t + q.extra["bob_phase"])
        # (n, rows, 1): height of each row relative to the traveller's standing posture
        Z = np.float32(SENSOR_Z) - rows * np.float32(ph) - bob.astype(np.float32)[:, None, None]
        a_amb = amb[:, None, None]
        soft = np.float32(1.0 / max(pw, ph))

        # torso: a boxy superellipse from the shoulders down
        zs = q.height - 2 * q.rz + 0.02
        tz, trx, trz = zs - 0.35, 0.21, 0.36
        qt = ((X / trx) ** 4 + ((Z - tz) / trz) ** 4) ** 0.25
        a = np.clip(0.5 - (qt - 1) * np.float32(min(trx, trz)) * soft, 0, 1)
        img += a * (a_amb + np.float32(q.torso) * (np.float32(q.face) - a_amb) - img)

        # head: skin ellipse, hair on its upper part, the canthus hot spot facing the walking direction
        zh = q.height - q.rz
        dz = Z - np.float32(zh)
        qh = np.sqrt((X / q.rx) ** 2 + (dz / q.rz) ** 2)
        ah = np.clip(0.5 - (qh - 1) * np.float32(q.rx) * soft, 0, 1)
        img += ah * (np.float32(q.face) - img)
        hair_edge = np.clip((dz - np.float32(0.35 * q.rz)) / np.float32(ph) + 0.5, 0, 1)
        hair_t = np.float32(0.5) * (a_amb + np.float32(q.face))  # halfway between skin and air
        img += (ah * hair_edge * np.float32(q.hair)) * (hair_t - img)
        sig = 0.02
        sx2, sz2 = sig ** 2 + pw ** 2 / 12, sig ** 2 + ph ** 2 / 12
        gain = sig * sig / math.sqrt(sx2 * sz2)  # the pixel-averaged peak of a 2 cm Gaussian
        ex, ez = 0.4 * q.rx, zh + 0.05 * q.rz
        g = np.exp(-((X - np.float32(ex)) ** 2) / np.float32(2 * sx2)
                   - ((Z - np.float32(ez)) ** 2) / np.float32(2 * sz2))
        img += ah * g * np.float32(gain * (q.canthus - q.face))

        if q.cup is not None:
            cdx, cz, ct = q.cup
            r = 0.04
            qc = np.sqrt(((X - np.float32(cdx)) / r) ** 2 + ((Z - np.float32(cz)) / r) ** 2)
            ac = np.clip(0.5 - (qc - 1) * np.float32(r) * soft, 0, 1)
            img += ac * (np.float32(ct) - img)

    def truth_by_id(self) -> dict[int, TravellerTruth]:
        return {t.id: t for t in self.truth}

    def column_of(self, tr: TravellerTruth, t: float) -> float:
        """Image column of a traveller's head centre at world time t."""
        x = X_START + tr.speed_mps * (t - (tr.t_entry - (X_ENTRY - X_START) / tr.speed_mps))
        return (self.cols_n - 1) / 2 + x / (tr.distance_m * self.kx)


def cv2_free_resize(a: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Nearest-neighbour resize (the wall's blotches at another resolution), numpy only."""
    ri = (np.arange(rows) * a.shape[0] // rows)[:, None]
    ci = (np.arange(cols) * a.shape[1] // cols)[None, :]
    return np.asarray(a[ri, ci], dtype=np.float64)
