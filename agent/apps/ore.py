"""Iron-ore sampling and supervision station: lots, ISO 3082 increments (mass, time or stratified random
basis, confirmed by the sampler's cutter), local grade inference,
assessment, alerts. Uploads summaries and events, never every poll.

Inputs (typed readings; point names are configurable under `points:`):
  belt_weigher  Registers: total_t (totaliser), rate_tph, speed_mps    -> tonnage, increments
  belt_portal   Registers: running, lot_no, hold_no, metal_detected     -> lot / sub-lot, foreign matter
                Registers: gamma_cps, gamma_alarm                       -> radiation alerts
  radiation_portal  PortalOccupancy (optional role; driver n42-portal: ANSI N42.42 documents, one per
                occupancy, gamma and neutron channels)                   -> radiation alerts with evidence
  moisture      Registers: moisture_pct (optional role)                 -> moisture (microwave, wet basis)
  analyser      Analysis (spectrum + the analyser's own assay)          -> ore-grade model: Fe, SiO2, H2O
                or Registers (modbus-tcp result registers, names under `analyser_registers`): each new
                result counter is a result without a spectrum           -> the analyser's own assay
  scale         Weight, MT-SICS or Toledo (optional role)               -> settled bench weighings
                (agent/apps/settle.py, the scale app's rules)
A point that is absent or flagged (a float register that decoded to NaN or inf) is skipped: one such
glitch must not poison a lot's estimates.
A lot opens and closes with the lot number the belt PLC publishes; a sub-lot is a ship's hold.

Records:
  increment            EVENT   a primary increment taken (ISO 3082): every `increment_t` tonnes, every
                               `increment_s` s of running belt, or at a random point in each stratum
                               (`basis`); with `points.cutter_cycle`, once the cutter cycled
  missed_increment     EVENT   an increment due without a cutter cycle within `cutter_window_s`: not counted
  ore_analysis         EVENT   each analyser result: the local model's assay and the analyser's own
  bench_weighing       EVENT   a settled weighing in the sample room
  radiation_alarm      ALERT   gamma alarm rising edge, or a portal occupancy with a gamma or neutron
                               alarm (payload `occupancy`: its id, counts, background, thresholds):
                               the lot is put on hold at once
  foreign_matter       ALERT   metal detector trip
  analyser_disagreement EVENT  local model and analyser differ in Fe for `check_count` results in a row
  instrument_fault / instrument_recovered  REPORT  a Modbus slave stopped / resumed answering
  ore_interval         TELEMETRY per `summary_interval_s`: tonnage, rate, moisture, gamma, counts
  lot_report           REPORT  at lot close: per lot and sub-lot estimates +- U95, decision and reasons
  lot_hold             ALERT   when a closed lot's decision is hold
  lot_interim          REPORT  at agent shutdown, the open lot's figures so far (decision "open")

Assessment (lot and each sub-lot): hold if a gamma or neutron alarm occurred (the report lists the
alarmed occupancies' evidence under `radiation_evidence`), or if moisture exceeds
`moisture_hold_fraction` x `tml_pct` (IMSBC transportable moisture limit); otherwise resample if fewer
primary increments than required (the configured minimum, or n = (2 sigma_W / precision_fe)^2 from the
lot's measured Fe variation), the Fe precision not shown, or no grade estimate; otherwise pass. Flags (do not
change the decision): Fe below `fe_min_pct`, moisture within U95 of the limit, foreign matter,
analyser disagreement. Estimates are tonnage-weighted means; U95 = 2 sqrt(s^2 / n_eff + bias^2) with s
the weighted spread of the per-minute values and bias the model's held-out bias from its manifest.
"""

from __future__ import annotations

import math
import random
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from customs_edge.agent.apps.base import App, AppConfig, Role
from customs_edge.agent.apps.settle import Settle
from customs_edge.core.readings import (
    AnalyserStatus,
    Analysis,
    Assay,
    PortalOccupancy,
    Reading,
    Registers,
    SlaveError,
    Weight,
)
from customs_edge.core.records import Priority, RecordIn


class OrePoints(BaseModel):
    """Names of the Modbus points (as in the drivers' register maps) the app reads."""

    model_config = ConfigDict(extra="forbid")
    # the role each point is read from (the config loader checks the names against the drivers' points)
    ROLES: ClassVar[dict[str, str]] = {
        "total_t": "belt_weigher", "rate_tph": "belt_weigher", "speed_mps": "belt_weigher",
        "moisture_pct": "moisture", "running": "belt_portal", "lot_no": "belt_portal",
        "hold_no": "belt_portal", "metal": "belt_portal", "gamma_cps": "belt_portal", "gamma_alarm": "belt_portal",
        "cutter_cycle": "belt_portal"}
    total_t: str = "total_t"
    rate_tph: str = "rate_tph"
    speed_mps: str = "speed_mps"
    moisture_pct: str = "moisture_pct"
    running: str = "running"
    lot_no: str = "lot_no"
    hold_no: str = "hold_no"
    metal: str = "metal_detected"
    gamma_cps: str = "gamma_cps"
    gamma_alarm: str = "gamma_alarm"
    cutter_cycle: str | None = Field(None, description="the sampler's cutter-cycle counter (or bit) from the "
                                     "belt PLC; unset: increments are counted unverified")


class AnalyserRegisters(BaseModel):
    """Names of the analyser's result points (modbus-tcp driver, role `analyser`). A poll repeats the
    latest result: only a changed `result_counter` is a new result. An element whose point is absent or
    flagged is not reported; without `tonnes` the result's Fe is recorded but not weighed into the lot."""

    model_config = ConfigDict(extra="forbid")
    result_counter: str = "result_no"
    tonnes: str = "tonnes"
    fe: str = "fe"
    sio2: str = "sio2"
    al2o3: str = "al2o3"
    p: str = "p"
    s: str = "s"
    h2o: str = "h2o"


class OreAppConfig(AppConfig):
    model_manifest: Path | None = Field(None, description="ore-grade manifest; default: the shipped model",
                                        json_schema_extra={"shipped_model": "ore_grade"})
    basis: Literal["mass", "time", "stratified"] = Field("mass", description="ISO 3082 sampling: mass "
                                                         "(systematic, per increment_t), time (per increment_s "
                                                         "of running belt) or stratified random")
    stratify_by: Literal["mass", "time"] = Field("mass", description="stratified: strata of increment_t "
                                                 "tonnes or increment_s seconds")
    seed: int | None = Field(None, description="stratified: seed of the random points (tests); unset: random")
    increment_t: float = Field(25.0, gt=0, description="tonnes between primary increments (mass basis)")
    increment_s: float = Field(22.5, gt=0, description="seconds of running belt between increments (time basis)")
    precision_fe: float | None = Field(None, gt=0, description="sampling precision beta_S asked for Fe, % "
                                       "absolute (95 %): sizes the lot's increments from the measured "
                                       "quality variation; unset: the configured minimum alone")
    cutter_window_s: float = Field(10.0, gt=0, description="a cutter cycle within this many seconds of an "
                                   "increment falling due confirms it; none: missed_increment")
    min_increments_lot: int = Field(40, ge=1, description="primary increments a lot needs (ISO 3082 table)")
    min_increments_sublot: int = Field(12, ge=1)
    tml_pct: float = Field(10.0, gt=0, le=40, description="transportable moisture limit of the cargo, % wet")
    moisture_hold_fraction: float = Field(0.9, gt=0, le=1.0, description="hold above this fraction of TML")
    fe_min_pct: float = Field(62.0, ge=0, le=72, description="contract minimum Fe, % dry")
    summary_interval_s: float = Field(60.0, gt=0)
    check_fe_pct: float = Field(1.0, gt=0, description="model vs analyser Fe difference worth flagging")
    check_count: int = Field(3, ge=1, description="... for this many results in a row")
    bench_settle_readings: int = Field(3, ge=1)
    bench_min_g: float = Field(50.0, ge=0)
    bench_deadband_g: float = Field(1.0, ge=0, description="as the scale app's deadband (agent/apps/settle.py)")
    points: OrePoints = OrePoints()
    analyser_registers: AnalyserRegisters = AnalyserRegisters()
    max_step_t: float = Field(1000.0, gt=0, description="a totaliser step larger than this between two "
                              "readings is a misread: skipped and counted, not turned into increments")
    max_sublots: int = Field(32, ge=1, description="a lot's sub-lots (holds); more hold numbers are refused")


@dataclass
class Series:
    """A weighted mean and spread kept as running sums (West's algorithm): constant memory however long
    a lot runs. Non-finite values and non-positive or non-finite weights are ignored."""

    n: int = 0
    w_sum: float = 0.0
    w2_sum: float = 0.0
    mean: float = 0.0
    s: float = 0.0  # sum of w * (x - mean_old) * (x - mean_new)

    def add(self, value: float, weight: float) -> None:
        if not (math.isfinite(value) and math.isfinite(weight) and weight > 0):
            return
        self.n += 1
        self.w_sum += weight
        self.w2_sum += weight * weight
        old = self.mean
        self.mean += (weight / self.w_sum) * (value - old)
        self.s += weight * (value - old) * (value - self.mean)

    def estimate(self, bias: float = 0.0) -> dict[str, Any] | None:
        if not self.n:
            return None
        var = max(0.0, self.s / self.w_sum)
        n_eff = self.w_sum ** 2 / self.w2_sum
        u95 = 2.0 * math.sqrt(var / n_eff + bias ** 2)
        return {"value": round(self.mean, 3), "u95": round(u95, 3), "n": self.n}


@dataclass
class Variation:
    """The within-strata standard deviation of a quality characteristic, estimated as a running sum
    from successive results (the variogram at lag one, ISO 3084): slow trends between strata (holds,
    drifts) do not inflate it, as the lot's overall spread would."""

    last: float | None = None
    d2: float = 0.0
    n: int = 0  # differences summed

    def add(self, value: float) -> None:
        if not math.isfinite(value):
            return
        if self.last is not None:
            self.d2 += (value - self.last) ** 2
            self.n += 1
        self.last = value

    def sigma(self) -> float | None:
        return math.sqrt(self.d2 / (2 * self.n)) if self.n else None


@dataclass
class Part:
    """A lot or a sub-lot: what its assessment needs."""

    tonnes: float = 0.0
    run_s: float = 0.0  # seconds of running belt (time-basis sampling)
    increments: int = 0  # primary increments taken (confirmed by the cutter when its point is configured)
    missed: int = 0  # increments due whose cut the cutter never confirmed
    fe_var: Variation = field(default_factory=Variation)
    fe: Series = field(default_factory=Series)
    sio2: Series = field(default_factory=Series)
    h2o_model: Series = field(default_factory=Series)
    moisture: Series = field(default_factory=Series)  # microwave analyser, weighted by belt rate
    fe_analyser: Series = field(default_factory=Series)
    gamma_alarms: int = 0
    gamma_max_cps: float = 0.0
    neutron_alarms: int = 0
    radiation_evidence: list[dict[str, Any]] = field(default_factory=list)  # alarmed occupancies, the first few
    foreign_matter: int = 0
    disagreements: int = 0
    analyses: int = 0
    bench_weighings: int = 0


@dataclass
class Lot:
    lot_no: int
    lot_id: str
    opened: float
    whole: Part = field(default_factory=Part)
    sublots: dict[int, Part] = field(default_factory=dict)
    hold_no: int = 1
    strata: int = 0  # strata (sampling intervals) whose increment has fallen due
    due: float = -1.0  # tonnes or running seconds of the lot at which the next increment is due (-1: not drawn)
    last_cut_t: float = 0.0  # lot tonnes at the last increment (the mass the next one represents)
    pending: list[dict[str, Any]] = field(default_factory=list)  # due increments awaiting the cutter

    @property
    def sub(self) -> Part:
        return self.sublots.setdefault(self.hold_no, Part())


class Interval:
    def __init__(self, start: float) -> None:
        self.start = start
        self.tonnes = 0.0
        self.rates: list[float] = []
        self.running: list[bool] = []
        self.moisture: list[float] = []
        self.gamma: list[float] = []
        self.increments = 0
        self.analyses = 0
        self.bench = 0
        self.errors = 0


class OreStationApp(App):
    Config = OreAppConfig
    CONSUMES = {"belt_weigher": Role(Registers, SlaveError), "belt_portal": Role(Registers, SlaveError),
                "analyser": Role(Analysis, AnalyserStatus, Registers, SlaveError),
                "moisture": Role(Registers, SlaveError, optional=True), "scale": Role(Weight, optional=True),
                "radiation_portal": Role(PortalOccupancy, optional=True)}
    EVIDENCE_KEPT = 8  # alarmed occupancies listed per lot report (all of them are ALERT records)
    CUTTER_WRAP = 65536  # a cutter-cycle counter is a 16-bit register
    MAX_RUN_GAP_S = 10.0  # running-belt time between two readings further apart than this is not counted
    STATE_VERSION = 2  # 2: sampling basis, running time, cutter confirmation, quality variation
    config: OreAppConfig

    def __init__(self, device_id: str, config: OreAppConfig) -> None:
        super().__init__(device_id, config)
        from customs_edge.models import default_manifest
        from customs_edge.models.runtime import OnnxModel

        self.model = OnnxModel(config.model_manifest or default_manifest("ore_grade"))
        self._channels = int(self.model.manifest.inputs[0].shape[-1] or 0)
        held = self.model.manifest.metrics.get("held_out", {})
        self._bias = {k: abs(float(held.get(k, {}).get("bias", 0.0))) for k in ("Fe", "SiO2", "H2O")}
        self.p = config.points
        self.lot: Lot | None = None
        self.lots_closed = 0
        self._last_total: float | None = None
        self._rate = 0.0
        self._gamma_alarm = False
        self._metal = False
        self._disagree_run = 0
        self._down: set[tuple[str, str]] = set()
        self.bench = Settle(config.bench_settle_readings, config.bench_min_g, config.bench_deadband_g)
        self._interval: Interval | None = None
        self._seed = config.seed if config.seed is not None else secrets.randbits(63)
        self._run_ts: float | None = None  # the last reading of a running belt
        self._cutter_last: float | None = None
        self._spare_cuts: list[float] = []  # cutter cycles seen before their increment fell due (mono)
        self._result_no: int | None = None  # the analyser's result counter last taken (result registers)

    # --- inputs --------------------------------------------------------------------------------
    def feed(self, reading: Reading) -> list[RecordIn]:
        if self._interval is None:
            self._interval = Interval(reading.mono)
        match reading:
            case Registers() if reading.source == "analyser":
                return self._result_registers(reading)
            case Registers():
                return self._recovered(reading) + self._registers(reading)
            case SlaveError():
                return self._slave_error(reading)
            case Analysis():
                return self._analysis(reading)
            case Weight():
                return self._bench(reading)
            case PortalOccupancy():
                return self._occupancy(reading)
        return []

    def _recovered(self, r: Registers) -> list[RecordIn]:
        key = (r.source, r.slave)
        if key not in self._down:
            return []
        self._down.discard(key)
        return [RecordIn(type="instrument_recovered", priority=Priority.REPORT,
                         payload={"driver": r.source, "slave": key[1]})]

    def _result_registers(self, r: Registers) -> list[RecordIn]:
        """The analyser's latest result in registers: a changed counter (up, or back after a reset) is a
        new result, recorded as a result without a spectrum; a repeat of the counter is the same result.
        Without a trustworthy counter a result cannot be told from a repeat: an instrument_fault (once)."""
        names = self.config.analyser_registers
        point = r.points.get(names.result_counter)
        counter = r.number(names.result_counter)
        if counter is None or counter < 0 or counter != int(counter):
            why = (f"no point named {names.result_counter!r} (points: {', '.join(sorted(r.points))}): name the "
                   "result counter's point in app.analyser_registers.result_counter" if point is None else
                   f"result counter {names.result_counter!r} is {point.error or point.value}, not a count")
            return self._slave_error(SlaveError(source=r.source, slave=r.slave, slave_id=r.slave_id, error=why,
                                                ts=r.ts, mono=r.mono))
        out = self._recovered(r)
        if int(counter) == self._result_no:
            return out
        self._result_no = int(counter)
        n = r.number
        assay = Assay(fe=n(names.fe), sio2=n(names.sio2), al2o3=n(names.al2o3), p=n(names.p), s=n(names.s),
                      h2o=n(names.h2o))
        return out + self._analysis(Analysis(
            source=r.source, ts=r.ts, mono=r.mono, seq=self._result_no, status="OK", analysed_at=r.ts,
            interval_s=0.0, tonnes=r.number(names.tonnes) or 0.0, assay=assay))

    def _registers(self, r: Registers) -> list[RecordIn]:
        p, out = self.p, []
        iv = self._interval
        assert iv is not None
        cycles = r.number(p.cutter_cycle) if p.cutter_cycle else None
        if cycles is not None:  # before a lot change: a cut counted in this poll belongs to the lot closing
            out += self._cutter(cycles, r.mono)
        lot_no = r.number(p.lot_no)
        if lot_no is not None:
            out += self._lot_number(int(lot_no), int(r.number(p.hold_no) or 1), r.ts)
        running = r.flag(p.running)
        if running is not None:
            iv.running.append(running)
            out += self._running(running, r.ts, r.mono)
        rate = r.number(p.rate_tph)
        if rate is not None:
            self._rate = max(0.0, rate)
            iv.rates.append(self._rate)
        total = r.number(p.total_t)
        if total is not None:
            out += self._tonnage(total, r.mono)
        m = r.number(p.moisture_pct)
        if m is not None and m > 0 and self._rate > 0:  # 0: no material under the sensor
            iv.moisture.append(m)
            if self.lot:
                self.lot.whole.moisture.add(m, self._rate)
                self.lot.sub.moisture.add(m, self._rate)
        cps = r.number(p.gamma_cps)
        if cps is not None:
            iv.gamma.append(cps)
            for part in self._parts():
                part.gamma_max_cps = max(part.gamma_max_cps, cps)
        alarm = r.flag(p.gamma_alarm)
        if alarm is not None:
            if alarm and not self._gamma_alarm:
                out.append(self._radiation(cps, r.ts))
            self._gamma_alarm = alarm
        metal = r.flag(p.metal)
        if metal is not None:
            if metal and not self._metal:
                for part in self._parts():
                    part.foreign_matter += 1
                out.append(RecordIn(type="foreign_matter", priority=Priority.ALERT, ts=r.ts, payload={
                    **self._where(), "detector": f"{r.source}/{r.slave}",
                    "reason": "tramp metal detected on the belt; belt tripped"}))
            self._metal = metal
        return out + self._expire(r.mono)

    def _parts(self) -> list[Part]:
        return [self.lot.whole, self.lot.sub] if self.lot else []

    def _where(self) -> dict[str, Any]:
        if not self.lot:
            return {"lot_id": None, "sublot": None, "lot_t": None}
        return {"lot_id": self.lot.lot_id, "sublot": self.lot.hold_no, "lot_t": round(self.lot.whole.tonnes, 1)}

    def _radiation(self, cps: float | None, ts: float) -> RecordIn:
        for part in self._parts():
            part.gamma_alarms += 1
        return RecordIn(type="radiation_alarm", priority=Priority.ALERT, ts=ts, payload={
            **self._where(), "gamma_cps": cps, "decision": "hold",
            "reason": "radiation portal gamma alarm: lot on hold pending inspection"})

    def _occupancy(self, r: PortalOccupancy) -> list[RecordIn]:
        """An N42.42 portal occupancy: its gamma rate joins the interval; an alarm holds the lot at once."""
        assert self._interval is not None
        if r.gamma_cps is not None:
            self._interval.gamma.append(r.gamma_cps)
            for part in self._parts():
                part.gamma_max_cps = max(part.gamma_max_cps, r.gamma_cps)
        if not r.alarm:
            return []
        evidence = r.evidence()
        channels = [c for c, on in (("gamma", r.gamma_alarm), ("neutron", r.neutron_alarm)) if on]
        for part in self._parts():
            part.gamma_alarms += r.gamma_alarm
            part.neutron_alarms += r.neutron_alarm
            if len(part.radiation_evidence) < self.EVIDENCE_KEPT:
                part.radiation_evidence.append(evidence)
        return [RecordIn(type="radiation_alarm", priority=Priority.ALERT, ts=r.ts, payload={
            **self._where(), "gamma_cps": r.gamma_cps, "neutron_cps": r.neutron_cps, "channels": channels,
            "occupancy": evidence, "decision": "hold",
            "reason": f"radiation portal {' and '.join(channels)} alarm in occupancy {r.occupancy_id}: "
                      "lot on hold pending inspection"})]

    def _lot_number(self, lot_no: int, hold_no: int, ts: float) -> list[RecordIn]:
        out: list[RecordIn] = []
        if self.lot is None or lot_no != self.lot.lot_no:
            if self.lot is not None:
                out += self._close_lot(final=True)
            when = datetime.fromtimestamp(ts, UTC).strftime("%Y%m%dT%H%MZ")
            self.lot = Lot(lot_no, f"{self.device_id}-L{lot_no}-{when}", ts)
        if hold_no in self.lot.sublots or len(self.lot.sublots) < self.config.max_sublots:
            self.lot.hold_no = hold_no
        elif self._interval is not None:
            self._interval.errors += 1  # a flapping or garbled hold register: stay on the current sub-lot
        return out

    def _tonnage(self, total: float, mono: float) -> list[RecordIn]:
        last, self._last_total = self._last_total, total
        if last is None or total < last:  # first reading, or the totaliser was reset
            return []
        delta = total - last
        assert self._interval is not None
        if delta > self.config.max_step_t:
            self._interval.errors += 1  # a misread (or a restart of the count): no burst of increments
            return []
        self._interval.tonnes += delta
        if self.lot is None or delta <= 0:
            return []
        self.lot.whole.tonnes += delta
        self.lot.sub.tonnes += delta
        return self._sample(mono) if self._plan()[0] == "mass" else []

    # --- sampling (ISO 3082) ----------------------------------------------------------------------
    def _plan(self) -> tuple[str, float, bool]:
        """(what the strata are measured in: mass or time, the stratum size, a random point in each)."""
        c = self.config
        by = c.stratify_by if c.basis == "stratified" else c.basis
        return by, c.increment_t if by == "mass" else c.increment_s, c.basis == "stratified"

    def _running(self, running: bool, ts: float, mono: float) -> list[RecordIn]:
        """Seconds of running belt between the readings' timestamps (polls further apart than
        MAX_RUN_GAP_S, e.g. across a restart, or out of order, add nothing)."""
        last, self._run_ts = self._run_ts, (ts if running else None)
        if self.lot is None or last is None or not running or not 0 < ts - last <= self.MAX_RUN_GAP_S:
            return []
        self.lot.whole.run_s += ts - last
        self.lot.sub.run_s += ts - last
        return self._sample(mono) if self._plan()[0] == "time" else []

    def _sample(self, mono: float) -> list[RecordIn]:
        """The increments that fell due: systematic at the end of each stratum, or stratified random at a
        point drawn per stratum from (seed, lot, stratum), so a restart draws the same points."""
        lot, out = self.lot, list[RecordIn]()
        assert lot is not None
        by, step, stratified = self._plan()
        while True:
            k = lot.strata + 1
            if lot.due < 0:
                u = random.Random(f"{self._seed}:{lot.lot_id}:{k}").random() if stratified else 1.0
                lot.due = (k - 1 + u) * step
            if (lot.whole.tonnes if by == "mass" else lot.whole.run_s) < lot.due:
                return out
            inc: dict[str, Any] = {
                "lot_id": lot.lot_id, "sublot": lot.hold_no, "basis": self.config.basis, "stratum": k,
                "at_t" if by == "mass" else "at_s": round(lot.due, 1),
                "lot_t": round(lot.whole.tonnes, 1), "run_s": round(lot.whole.run_s, 1),
                "rate_tph": round(self._rate, 1), "represents_t": round(lot.whole.tonnes - lot.last_cut_t, 2)}
            if stratified:
                inc["stratum_span"] = [round((k - 1) * step, 1), round(k * step, 1)]
            lot.strata, lot.due, lot.last_cut_t = k, -1.0, lot.whole.tonnes
            if not self.p.cutter_cycle:
                out.append(self._taken(inc, "unverified"))
            elif self._spare_cuts and mono - self._spare_cuts[0] <= self.config.cutter_window_s:
                out.append(self._taken(inc, "confirmed", self._spare_cuts.pop(0) - mono))
            else:
                lot.pending.append({**inc, "due_mono": mono})

    def _taken(self, inc: dict[str, Any], cutter: str, delay_s: float | None = None) -> RecordIn:
        assert self.lot is not None and self._interval is not None
        sub = self.lot.sublots.setdefault(int(inc["sublot"]), Part())
        self.lot.whole.increments += 1
        sub.increments += 1
        self._interval.increments += 1
        inc.pop("due_mono", None)
        extra = {} if delay_s is None else {"cutter_delay_s": round(delay_s, 2)}
        return RecordIn(type="increment", priority=Priority.EVENT, payload={
            **inc, "number": self.lot.whole.increments, "sublot_number": sub.increments, "cutter": cutter,
            **extra})

    def _cutter(self, value: float, mono: float) -> list[RecordIn]:
        """The cutter-cycle point: a counter (16-bit, wraps) or a bit; each advance (rising edge) is a
        cut, confirming the oldest increment awaiting one; a cut before its increment fell due waits
        `cutter_window_s` for it. A counter that goes back (PLC restart) is a new baseline, no cut."""
        last, self._cutter_last = self._cutter_last, value
        if last is not None and value < last and last > self.CUTTER_WRAP - 1024 and value < 1024:
            last -= self.CUTTER_WRAP  # the 16-bit counter wrapped
        if last is None or value <= last:  # first reading, no cut, a bit falling, a counter reset
            return []
        cuts = int(value - last)
        out = []
        for _ in range(min(cuts, 64)):
            if self.lot is not None and self.lot.pending:
                inc = self.lot.pending.pop(0)
                out.append(self._taken(inc, "confirmed", mono - float(inc["due_mono"])))
            else:
                self._spare_cuts = [*self._spare_cuts[-7:], mono]
        return out

    def _expire(self, now: float, everything: bool = False) -> list[RecordIn]:
        """Increments whose cut was not confirmed within the window (or at all, when the lot closes)."""
        window = self.config.cutter_window_s
        self._spare_cuts = [m for m in self._spare_cuts if now - m <= window]
        lot, out = self.lot, []
        while lot is not None and lot.pending and (everything or now - lot.pending[0]["due_mono"] > window):
            inc = lot.pending.pop(0)
            inc.pop("due_mono")
            lot.whole.missed += 1
            lot.sublots.setdefault(int(inc["sublot"]), Part()).missed += 1
            out.append(RecordIn(type="missed_increment", priority=Priority.EVENT, payload={
                **inc, "window_s": window,
                "reason": f"no sampler cutter cycle within {window:g} s of increment {inc['stratum']} falling "
                          "due: the increment is not counted (check the sampler)"}))
        return out

    def _slave_error(self, r: SlaveError) -> list[RecordIn]:
        assert self._interval is not None
        self._interval.errors += 1
        key = (r.source, r.slave)
        if key in self._down:
            return []
        self._down.add(key)
        return [RecordIn(type="instrument_fault", priority=Priority.REPORT, ts=r.ts, payload={
            "driver": r.source, "slave": r.slave, "error": r.error})]

    def _analysis(self, r: Analysis) -> list[RecordIn]:
        if r.status != "OK":
            return []
        if r.spectrum is None:  # a result without a spectrum (a vendor's result file): its own assay only
            for part in self._parts():
                if r.assay.fe is not None:
                    part.fe_analyser.add(r.assay.fe, r.tonnes)
            return [RecordIn(type="ore_analysis", priority=Priority.EVENT, ts=r.ts, payload={
                **self._where(), "seq": r.seq, "tonnes": r.tonnes, "model": None, "analyser": r.assay.as_dict(),
                "sample_id": r.sample_id})]
        counts = r.spectrum.counts
        if counts.size != self._channels:  # the analyser's channel count does not fit the model
            assert self._interval is not None
            self._interval.errors += 1
            return []
        assay = self.model.predict({"spectrum": counts.reshape(1, -1)})["assay"][0]
        fe, sio2, h2o = (float(x) for x in assay)
        tonnes = r.tonnes
        assert self._interval is not None
        self._interval.analyses += 1
        out: list[RecordIn] = []
        own_fe = r.assay.fe
        for part in self._parts():
            part.analyses += 1
            part.fe.add(fe, tonnes)
            part.fe_var.add(fe)
            part.sio2.add(sio2, tonnes)
            part.h2o_model.add(h2o, tonnes)
            if own_fe is not None:
                part.fe_analyser.add(own_fe, tonnes)
        if own_fe is not None and abs(fe - own_fe) > self.config.check_fe_pct:
            self._disagree_run += 1
            if self._disagree_run == self.config.check_count:
                for part in self._parts():
                    part.disagreements += 1
                out.append(RecordIn(type="analyser_disagreement", priority=Priority.EVENT, ts=r.ts, payload={
                    **self._where(), "model_fe": round(fe, 3), "analyser_fe": own_fe,
                    "results_in_a_row": self._disagree_run,
                    "reason": f"analyser Fe differs from the local model by more than {self.config.check_fe_pct} %"}))
        else:
            self._disagree_run = 0
        out.append(RecordIn(type="ore_analysis", priority=Priority.EVENT, ts=r.ts, payload={
            **self._where(), "seq": r.seq, "tonnes": tonnes,
            "model": {"fe": round(fe, 3), "sio2": round(sio2, 3), "h2o": round(h2o, 3),
                      "version": self.model.manifest.version},
            "analyser": r.assay.as_dict()}))
        return out

    def _bench(self, r: Weight) -> list[RecordIn]:
        settled = self.bench.feed(r)
        if settled is None:
            return []
        assert self._interval is not None
        self._interval.bench += 1
        for part in self._parts():
            part.bench_weighings += 1
        return [RecordIn(type="bench_weighing", priority=Priority.EVENT, ts=settled.ts, payload={
            **self._where(), "weight": settled.value, "unit": settled.unit, "zeroed": not settled.not_zeroed,
            "source": settled.source})]

    # --- assessment ----------------------------------------------------------------------------
    def required(self, part: Part, min_increments: int, precision: float | None) -> dict[str, Any]:
        """ISO 3082: with stratified or systematic sampling the sampling variance is sigma_W^2 / n, so the
        sampling precision (95 %) beta_S = 2 sigma_W / sqrt(n) and the primary increments needed are
        n = (2 sigma_W / beta_S)^2, never fewer than the configured minimum."""
        sigma = part.fe_var.sigma()
        out: dict[str, Any] = {"required_increments": min_increments, "min_increments": min_increments,
                               "sigma_w_fe": None if sigma is None else round(sigma, 4),
                               "precision_fe": precision, "precision_fe_achieved": None, "precision_met": None}
        if precision is None:
            return out
        if sigma is not None:
            out["required_increments"] = max(min_increments, math.ceil((2 * sigma / precision) ** 2 - 1e-9))
            if part.increments:
                out["precision_fe_achieved"] = round(2 * sigma / math.sqrt(part.increments), 4)
        out["precision_met"] = sigma is not None and part.increments >= out["required_increments"]
        return out

    def assess(self, part: Part, min_increments: int, precision: float | None = None) -> dict[str, Any]:
        c = self.config
        sampling = self.required(part, min_increments, precision)
        fe = part.fe.estimate(self._bias["Fe"])
        sio2 = part.sio2.estimate(self._bias["SiO2"])
        h2o_model = part.h2o_model.estimate(self._bias["H2O"])
        microwave = part.moisture.estimate()
        moisture = dict(microwave, source="microwave") if microwave else (
            dict(h2o_model, source="ore-grade model") if h2o_model else None)
        limit = round(c.moisture_hold_fraction * c.tml_pct, 3)
        reasons: list[str] = []
        flags: list[str] = []
        decision = "pass"
        if part.gamma_alarms or part.neutron_alarms:
            decision = "hold"
            reasons.append(f"radiation: {part.gamma_alarms} gamma alarm(s), peak {part.gamma_max_cps:.0f} cps"
                           + (f", {part.neutron_alarms} neutron alarm(s)" if part.neutron_alarms else "")
                           + "".join(f", occupancy {e['occupancy_id']}" for e in part.radiation_evidence))
        if moisture and moisture["value"] > limit:
            decision = "hold"
            reasons.append(f"moisture {moisture['value']:.2f} % > {c.moisture_hold_fraction:g} x TML "
                           f"{c.tml_pct:g} % = {limit:g} %")
        elif moisture and moisture["value"] + moisture["u95"] > limit:
            flags.append("moisture_near_limit")
        if decision != "hold":
            needed = sampling["required_increments"]
            if part.increments < needed:
                decision = "resample"
                reasons.append(f"{part.increments} primary increments < " + (
                    f"{needed} required for Fe precision {precision:g} (sigma_W {sampling['sigma_w_fe']:g})"
                    if needed > min_increments else f"minimum {min_increments}"))
            elif sampling["precision_met"] is False:
                decision = "resample"
                reasons.append("Fe quality variation not measured (fewer than 2 analyser results): "
                               f"precision {precision:g} not shown")
            if fe is None or moisture is None:
                decision = "resample"
                reasons.append("no " + " or ".join(n for n, e in (("grade", fe), ("moisture", moisture)) if e is None)
                               + " estimate")
        if fe is not None and fe["value"] < c.fe_min_pct:
            flags.append("fe_below_contract")
            reasons.append(f"Fe {fe['value']:.2f} % < contract minimum {c.fe_min_pct:g} %")
        if part.foreign_matter:
            flags.append("foreign_matter")
            reasons.append(f"foreign matter: {part.foreign_matter} metal detector trip(s)")
        if part.disagreements:
            flags.append("analyser_disagreement")
        if part.missed:
            flags.append("missed_increments")
            reasons.append(f"{part.missed} increment(s) missed by the sampler cutter (not counted)")
        if decision == "pass" and not reasons:
            reasons.append("within limits")
        return {"decision": decision, "reasons": reasons, "flags": flags,
                "tonnes": round(part.tonnes, 1), "increments": part.increments,
                "missed_increments": part.missed, **sampling, "fe": fe, "sio2": sio2, "moisture": moisture,
                "h2o_model": h2o_model, "fe_analyser": part.fe_analyser.estimate(),
                "moisture_limit_pct": limit, "analyses": part.analyses,
                "gamma_alarms": part.gamma_alarms, "gamma_max_cps": round(part.gamma_max_cps, 1),
                "neutron_alarms": part.neutron_alarms, "radiation_evidence": part.radiation_evidence,
                "foreign_matter": part.foreign_matter, "bench_weighings": part.bench_weighings}

    def _close_lot(self, final: bool) -> list[RecordIn]:
        lot = self.lot
        if lot is None:
            return []
        missed = self._expire(0.0, everything=True) if final else []
        c = self.config
        report = {"lot_id": lot.lot_id, "lot_no": lot.lot_no, "opened": lot.opened, "closed": time.time(),
                  **self.assess(lot.whole, c.min_increments_lot, c.precision_fe),
                  "sublots": [{"sublot": h, **self.assess(part, self.config.min_increments_sublot)}
                              for h, part in sorted(lot.sublots.items())],
                  "model": {"name": self.model.manifest.name, "version": self.model.manifest.version},
                  "criteria": {"tml_pct": c.tml_pct, "fe_min_pct": c.fe_min_pct, "increment_t": c.increment_t},
                  "sampling": {"basis": c.basis, "stratify_by": c.stratify_by if c.basis == "stratified" else None,
                               "increment_t": c.increment_t, "increment_s": c.increment_s,
                               "strata": lot.strata, "cutter": "verified" if self.p.cutter_cycle else "unverified",
                               "running_s": round(lot.whole.run_s, 1)}}
        if not final:
            report["decision"] = "open"
            return [RecordIn(type="lot_interim", priority=Priority.REPORT, payload=report)]
        self.lots_closed += 1
        out = [*missed, RecordIn(type="lot_report", priority=Priority.REPORT, payload=report)]
        if report["decision"] == "hold":
            out.append(RecordIn(type="lot_hold", priority=Priority.ALERT, payload={
                "lot_id": lot.lot_id, "decision": "hold", "reasons": report["reasons"]}))
        return out

    # --- time ----------------------------------------------------------------------------------
    def tick(self, now: float) -> list[RecordIn]:
        missed = self._expire(now) if self.p.cutter_cycle else []
        iv = self._interval
        if iv is None or now - iv.start < self.config.summary_interval_s:
            return missed
        self._interval = Interval(now)
        return [*missed, self._summary(iv, now)]

    def _summary(self, iv: Interval, now: float) -> RecordIn:
        def stats(xs: list[float]) -> dict[str, float] | None:
            return {"mean": round(sum(xs) / len(xs), 3), "max": round(max(xs), 3)} if xs else None

        return RecordIn(type="ore_interval", priority=Priority.TELEMETRY, payload={
            **self._where(), "interval_s": round(now - iv.start, 1), "tonnes": round(iv.tonnes, 2),
            "rate_tph": stats(iv.rates), "moisture_pct": stats(iv.moisture), "gamma_cps": stats(iv.gamma),
            "running_share": round(sum(iv.running) / len(iv.running), 3) if iv.running else None,
            "increments": iv.increments, "analyses": iv.analyses, "bench_weighings": iv.bench,
            "slave_errors": iv.errors})

    def close(self) -> list[RecordIn]:
        out: list[RecordIn] = []
        if self._interval is not None:
            out.append(self._summary(self._interval, time.monotonic()))
            self._interval = None
        return out + self._close_lot(final=False)

    # --- state that survives restarts (see App.snapshot): the open lot and the inputs' edges ----------
    # (the ore_interval telemetry starts a new interval after a restart)
    def snapshot(self) -> bytes | None:
        from dataclasses import asdict

        return self.pack_state({
            "lot": asdict(self.lot) if self.lot else None, "lots_closed": self.lots_closed,
            "last_total": self._last_total, "rate": self._rate, "gamma_alarm": self._gamma_alarm,
            "metal": self._metal, "disagree_run": self._disagree_run, "down": sorted(self._down),
            "bench": self.bench.state(), "seed": self._seed, "cutter_last": self._cutter_last, "run_ts": self._run_ts,
            "spare_cuts": self._spare_cuts, "result_no": self._result_no})

    def restore(self, blob: bytes) -> None:
        s = self.unpack_state(blob)

        def part(d: dict[str, Any]) -> Part:
            kw: dict[str, Any] = {k: (Variation if k == "fe_var" else Series)(**v) if isinstance(v, dict) else v
                                  for k, v in d.items()}
            return Part(**kw)

        def opt(key: str) -> float | None:
            return None if s[key] is None else float(s[key])

        d = s["lot"]
        lot = None if d is None else Lot(
            int(d["lot_no"]), str(d["lot_id"]), float(d["opened"]), part(d["whole"]),
            {int(h): part(p) for h, p in d["sublots"].items()}, int(d["hold_no"]), int(d["strata"]),
            float(d["due"]), float(d["last_cut_t"]), [dict(i) for i in d["pending"]])
        values = (lot, int(s["lots_closed"]), opt("last_total"), float(s["rate"]),
                  bool(s["gamma_alarm"]), bool(s["metal"]),
                  int(s["disagree_run"]), {(str(a), str(b)) for a, b in s["down"]})
        self.bench.load(s["bench"])
        self._seed, self._cutter_last, self._run_ts = int(s["seed"]), opt("cutter_last"), opt("run_ts")
        self._spare_cuts = [float(m) for m in s["spare_cuts"]]
        self._result_no = None if s.get("result_no") is None else int(s["result_no"])  # absent: older blob
        (self.lot, self.lots_closed, self._last_total, self._rate, self._gamma_alarm, self._metal,
         self._disagree_run, self._down) = values
