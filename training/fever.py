"""Fever model: core temperature from a tracked traveller's thermal measurement, with ambient and
distance compensation. Trained and evaluated on travellers from simulators.gate_world, measured by the
gate app's own tracker (agent.apps.gate_tracker), so training sees exactly what the device computes.

Inputs  'features' [N, 6] float32: head_max_c, head_hot_c, head_skin_c, background_c, head_area_px,
        head_width_px (agent.apps.gate_tracker.FEATURES; apparent head size is the distance proxy).
Output  'core_c' [N, 1] float32: estimated core temperature, °C.
The network is a small MLP (sklearn) written out to ONNX by hand (standardise, 2 x Dense+ReLU, Dense).

    python -m customs_edge.training.train fever            # rebuild models/fever/ (MLX90640)
    python -m customs_edge.training.train fever --optics lepton35   # models/fever_lepton35/
    customs-edge models evaluate fever --json [--optics lepton35]
One model per optics (sensor resolution + field of view, simulators.gate_world.OPTICS): the manifest's
`training.optics` states them, and the gate app refuses a model trained for other optics.
evaluate(seed) screens simulated travellers (>= 500 febrile) with the gate app (tracker + shipped model +
threshold) and compares every decision with the simulated truth.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from customs_edge.agent.apps.gate_tracker import FEATURES, FinishedTrack, Tracker
from customs_edge.simulators.gate_world import MLX90640, OPTICS, GateWorld, Optics, TravellerTruth, WorldParams

NAME = "fever"
VERSION = "1.0.0"
RATE_HZ = 8.0  # the MLX90640's; other optics render at their own rate_hz
CHUNK = 512  # frames rendered at once
THRESHOLDS = (37.3, 37.5, 38.0)
BLACKBODY = (20, 23, 28, 31)  # rows, columns of the blackbody in evaluate(camera="drifting"|"referenced")


@dataclass(frozen=True)
class Shard:
    seed: int
    travellers: int
    params: WorldParams


@dataclass
class ShardResult:
    truth: list[TravellerTruth]  # the travellers this shard counts (entered before its end)
    matched: list[tuple[FinishedTrack, TravellerTruth, Any]]  # track, its traveller, what the runner added
    spurious: list[tuple[FinishedTrack, Any]]  # tracks that match no traveller
    frames: int


def _match(world: GateWorld, track: FinishedTrack, candidates: list[TravellerTruth]) -> TravellerTruth | None:
    """The traveller whose head was nearest the track's head column at the track's best frame."""
    best: tuple[float, TravellerTruth] | None = None
    for tr in candidates:
        if tr.t_in_view <= track.best_mono <= tr.t_out_view:
            dist = abs(world.column_of(tr, track.best_mono) - track.best_cx)
            if dist < 5.0 * world.optics.scale and (best is None or dist < best[0]):
                best = (dist, tr)
    return best[1] if best else None


Runner = Callable[[np.ndarray, float], list[tuple[FinishedTrack, Any]]]


def run_shard(shard: Shard, make_runner: Callable[[], tuple[Runner, Callable[[], list[tuple[FinishedTrack, Any]]]]],
              ) -> ShardResult:
    """Render a shard's travellers at RATE_HZ and feed every frame to a runner (tracker or gate app)."""
    from customs_edge.drivers.mlx90640 import DeadPixels

    world = GateWorld(shard.seed, shard.params)
    while len(world.truth) < shard.travellers:
        world.ensure(world.truth[-1].t_entry + 60.0 if world.truth else 60.0)
    counted = world.truth[: shard.travellers]
    t_end = counted[-1].t_out_view + 1.0
    process, flush = make_runner()
    dead = DeadPixels()
    found: list[tuple[FinishedTrack, Any]] = []
    times = np.arange(0.0, t_end, 1.0 / world.optics.rate_hz)
    for i in range(0, len(times), CHUNK):
        frames = world.render(times[i:i + CHUNK])
        np.round(frames, 2, out=frames)  # the wire carries °C x 100
        for t, frame in zip(times[i:i + CHUNK].tolist(), frames, strict=True):
            dead.repair(frame)
            found += process(frame, t)
    found += flush()
    ids = {tr.id for tr in counted}
    matched, spurious = [], []
    for track, extra in found:
        tr = _match(world, track, world.truth)
        if tr is None:
            spurious.append((track, extra))
        elif tr.id in ids:
            matched.append((track, tr, extra))
    return ShardResult(counted, matched, spurious, len(times))


def _tracker_runner() -> tuple[Runner, Callable[[], list[tuple[FinishedTrack, Any]]]]:
    tracker = Tracker()
    return (lambda f, t: [(x, None) for x in tracker.process(f, t, t)]), (lambda: [(x, None) for x in tracker.flush()])


class _AppRunner:
    """The gate app itself (tracker + model + threshold) as a shard runner; picklable for the pool."""

    def __init__(self, manifest: str | None, threshold_c: float, reference: bool = False,
                 blackbody: tuple[int, int, int, int] = BLACKBODY) -> None:
        self.manifest, self.threshold_c, self.reference = manifest, threshold_c, reference
        self.blackbody = blackbody

    def __call__(self) -> tuple[Runner, Callable[[], list[tuple[FinishedTrack, Any]]]]:
        from customs_edge.agent.apps.gate import GateApp, GateAppConfig
        from customs_edge.agent.apps.gate_reference import ReferenceConfig

        r0, r1, c0, c1 = self.blackbody
        ref = ReferenceConfig(rows=(r0, r1), cols=(c0, c1), setpoint_c=35.0) if self.reference else None
        # warmup_s=0: the figures are those of a warmed-up station (every shard starts its lane cold)
        app = GateApp("eval", GateAppConfig(threshold_c=self.threshold_c, reference=ref, warmup_s=0.0,
                                            model=Path(self.manifest) if self.manifest else None))

        def process(frame: np.ndarray, t: float) -> list[tuple[FinishedTrack, Any]]:
            return [(s.track, s) for s in app.process_frame(frame, t, t)]

        def flush() -> list[tuple[FinishedTrack, Any]]:
            return [(s.track, s) for s in app.screen(app.tracker.flush())]

        return process, flush


def _run_one(args: tuple[Shard, Any]) -> ShardResult:
    shard, make_runner = args
    return run_shard(shard, make_runner)


def run_shards(shards: list[Shard], make_runner: Any, workers: int | None = None) -> list[ShardResult]:
    """Shards are independent and seeded: the result does not depend on how many workers ran them."""
    workers = workers or min(2, os.cpu_count() or 1, len(shards))
    if workers <= 1:
        return [run_shard(s, make_runner) for s in shards]
    with mp.get_context("fork").Pool(workers) as pool:
        return pool.map(_run_one, [(s, make_runner) for s in shards], chunksize=1)


def _shards(seed: int, n: int, per_shard: int, base: WorldParams) -> list[Shard]:
    rng = np.random.default_rng([seed, 77])
    out = []
    for k in range((n + per_shard - 1) // per_shard):
        params = replace(base, ambient_c=float(rng.uniform(16.0, 30.0)))
        out.append(Shard(seed=int(seed * 1000 + k), travellers=min(per_shard, n - k * per_shard), params=params))
    return out


# --- training ----------------------------------------------------------------------------------
# Enriched, so the rare cases weigh in the fit. Sun-heated faces are left out: their skin says nothing
# about their core, and a model that tries to learn them only learns to doubt every fever (docs/gate.md).
TRAIN_WORLD = WorldParams(rate_per_h=2000.0, febrile_share=0.15, hot_drink_share=0.1, sun_share=0.0,
                          child_share=0.1)


def model_dir_name(optics: Optics) -> str:
    """models/<this>/: `fever` for the MLX90640 (the first), `fever_<optics>` for the others."""
    return NAME if optics == MLX90640 else NAME + "_" + optics.name.split("-")[0]


def optics_named(name: str) -> Optics:
    for o in OPTICS.values():
        if name in (o.name, o.name.split("-")[0]):
            return o
    raise ValueError(f"unknown optics {name!r}: one of {', '.join(o.name.split('-')[0] for o in OPTICS.values())}")


def dataset(seed: int, n: int, base: WorldParams = TRAIN_WORLD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, core_c, febrile) for the tracks of n simulated travellers."""
    per_shard = 1000 if base.optics.cols <= 160 else 400  # 384x288: smaller shards keep both workers busy
    results = run_shards(_shards(seed, n, per_shard, base), _tracker_runner)
    rows = [(t.features, tr.core_c, tr.febrile) for r in results for t, tr, _ in r.matched]
    x = np.array([r[0] for r in rows], dtype=np.float32)
    y = np.array([r[1] for r in rows], dtype=np.float32)
    f = np.array([r[2] for r in rows], dtype=bool)
    return x, y, f


def fit(x: np.ndarray, y: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    from sklearn.neural_network import MLPRegressor

    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    offset = float(np.median(y))
    mlp = MLPRegressor(hidden_layer_sizes=(24, 12), activation="relu", alpha=1e-4, learning_rate_init=3e-3,
                       max_iter=400, early_stopping=True, n_iter_no_change=25, random_state=seed)
    mlp.fit((x - mean) / scale, y - offset)
    w = mlp.coefs_
    b = list(mlp.intercepts_)
    b[-1] = b[-1] + offset
    return {"mean": mean, "scale": scale, "w1": w[0], "b1": b[0], "w2": w[1], "b2": b[1], "w3": w[2], "b3": b[2]}


def to_onnx(p: dict[str, np.ndarray]) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.asarray(v, dtype=np.float32), name=k) for k, v in p.items()]
    nodes = [
        helper.make_node("Sub", ["features", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "scale"], ["z"]),
        helper.make_node("MatMul", ["z", "w1"], ["h1a"]), helper.make_node("Add", ["h1a", "b1"], ["h1b"]),
        helper.make_node("Relu", ["h1b"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w2"], ["h2a"]), helper.make_node("Add", ["h2a", "b2"], ["h2b"]),
        helper.make_node("Relu", ["h2b"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w3"], ["oa"]), helper.make_node("Add", ["oa", "b3"], ["core_c"]),
    ]
    graph = helper.make_graph(
        nodes, "fever", [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, len(FEATURES)])],
        [helper.make_tensor_value_info("core_c", TensorProto.FLOAT, [None, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="customs-edge")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def predict_numpy(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    z = (x - p["mean"]) / p["scale"]
    h = np.maximum(z @ p["w1"] + p["b1"], 0)
    h = np.maximum(h @ p["w2"] + p["b2"], 0)
    return (h @ p["w3"] + p["b3"]).reshape(-1)


def train(out_dir: Path, seed: int = 0, n_travellers: int | None = None, optics: Optics = MLX90640) -> Path:
    """Simulate, fit, export; held-out figures (a separate seed) go into the manifest. Higher-resolution
    optics train on fewer travellers by default: 8,000 at 160x120 (~25x the MLX90640's cost per frame), 2,000 at
    384x288 (another ~10x)."""
    from customs_edge.models.runtime import sha256_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_travellers = n_travellers or (16000 if optics == MLX90640 else 8000 if optics.cols <= 160 else 2000)
    world = replace(TRAIN_WORLD, optics=optics)
    x, y, _ = dataset(seed * 7919 + 11, n_travellers, world)
    params = fit(x, y, seed)
    heldout = max(2000, n_travellers // 4) if optics == MLX90640 else max(400, n_travellers // 4)
    xh, yh, fh = dataset(seed * 7919 + 12, heldout, world)
    resid = predict_numpy(params, xh) - yh
    onnx_path = out_dir / "fever.onnx"
    onnx_path.write_bytes(to_onnx(params))
    manifest = {
        "name": NAME, "version": VERSION, "file": onnx_path.name, "sha256": sha256_file(onnx_path),
        "inputs": [{"name": "features", "shape": [None, len(FEATURES)], "dtype": "float32",
                    "units": "°C, °C, °C, °C, pixels, pixels: " + ", ".join(FEATURES)}],
        "outputs": [{"name": "core_c", "shape": [None, 1], "dtype": "float32", "units": "°C core temperature"}],
        "training": {"source": "simulators.gate_world via agent.apps.gate_tracker", "seed": seed,
                     "travellers": n_travellers, "tracks": len(y),
                     "world": {k: v for k, v in TRAIN_WORLD.__dict__.items() if k.endswith("share")},
                     "sensor": f"{optics.name} {optics.hfov_deg:g}x{optics.vfov_deg:g} deg, "
                               f"{optics.cols}x{optics.rows}, {optics.rate_hz:g} Hz",
                     "optics": optics.as_dict(), "model": "MLP 6-24-12-1 (sklearn), ReLU"},
        "metrics": {"heldout_tracks": len(yh), "mae_c": round(float(np.abs(resid).mean()), 4),
                    "residual_sd_c": round(float(resid.std()), 4), "bias_c": round(float(resid.mean()), 4),
                    "heldout_febrile_mae_c": round(float(np.abs(resid[fh]).mean()), 4) if fh.any() else None},
    }
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    write_golden(path, seed, optics)
    return path


GOLDEN_ROWS = 40
GOLDEN_TOLERANCE_C = 0.3  # the screening thermograph's accuracy goal (docs/gate.md: <= +-0.3 degC)


def write_golden(manifest_path: Path, seed: int = 0, optics: Optics = MLX90640) -> dict[str, Any]:
    """The golden set: GOLDEN_ROWS tracks of travellers never seen in training or the held-out figures
    (their own seed), with their true core temperature; min_accuracy is what the model scores on them less
    0.1, so a model that regresses fails its self-test on a unit (models/runtime.py OnnxModel.self_test)."""
    from customs_edge.models.runtime import OnnxModel, manifest_text

    x, y, _ = dataset(seed * 7919 + 13, 300, replace(TRAIN_WORLD, optics=optics))
    x, y = x[:GOLDEN_ROWS], y[:GOLDEN_ROWS]
    model = OnnxModel(manifest_path)
    pred = model.predict({"features": x})["core_c"].reshape(-1)
    accuracy = float(np.mean(np.abs(pred - y) <= GOLDEN_TOLERANCE_C))
    golden = {"inputs": {"features": [[round(float(v), 4) for v in row] for row in x]},
              "expected": {"core_c": [[round(float(v), 4)] for v in y]},
              "tolerance": {"core_c": GOLDEN_TOLERANCE_C},
              "min_accuracy": round(max(0.0, accuracy - 0.1), 3),
              "source": f"simulators.gate_world seed {seed * 7919 + 13}, first {len(y)} tracks: true core "
                        f"temperature; the model scored {accuracy:.3f} when built"}
    doc = json.loads(manifest_path.read_text())
    doc["golden"] = golden
    manifest_path.write_text(manifest_text(doc))
    return golden


# --- evaluation --------------------------------------------------------------------------------
def evaluate(seed: int = 1, travellers: int | None = None, threshold_c: float = 37.3,
             manifest: str | Path | None = None, workers: int | None = None, rate_per_h: float = 2000.0,
             camera: str = "ideal", optics: str = "mlx90640", febrile_share: float | None = None) -> dict[str, Any]:
    """Screen simulated travellers (confounders at their default shares, ambient 16-30 °C, a lane at
    `rate_per_h`) with the gate app, and score its decisions against the truth. The febrile share is
    enriched (3 % of 20,000 for the MLX90640; 6 % of 10,000 at 160x120, whose frames cost ~25x more; 25 % of
    2,000 at 384x288)
    so >= 500 febrile travellers give the sensitivity a usable 95 % interval; the false-alarm rate is
    counted on the afebrile, and the PPV at realistic prevalences follows from both.
    Positive = a febrile traveller (core 37.6-39.5 °C); every afebrile core is <= 37.2 °C.
    `camera`: "ideal" (no offset), "drifting" (the camera reads 1.5 K +- 1 K high, drifting over 2 h; a
    blackbody in view, not used) or "referenced" (the same, corrected by the blackbody)."""
    if camera not in ("ideal", "drifting", "referenced"):
        raise ValueError(f"camera must be ideal, drifting or referenced, not {camera!r}")
    o = optics_named(optics)
    hi_res = o != MLX90640
    big = o.cols > 160  # 384x288: ~40x the MLX90640's cost per traveller
    travellers = travellers or (2000 if big else 10000 if hi_res else 20000)
    febrile_share = (0.25 if big else 0.06 if hi_res else 0.03) if febrile_share is None else febrile_share
    base = WorldParams(rate_per_h=rate_per_h, optics=o, febrile_share=febrile_share)
    if manifest is None and hi_res:
        from customs_edge.models import default_manifest

        manifest = default_manifest(model_dir_name(o))
        if not manifest.is_file():
            from customs_edge.core.errors import ModelError

            raise ModelError(f"no model for {o.name} ({manifest} is missing): train one with "
                             f"python -m customs_edge.training.train fever --optics {o.name.split('-')[0]}")
    bb = BLACKBODY
    if hi_res:  # the same place in the frame, in the camera's pixels
        bb = (round(bb[0] * o.scale), round(bb[1] * o.scale), round(bb[2] * o.scale), round(bb[3] * o.scale))
    if camera != "ideal":
        base = replace(base, camera_offset_c=1.5, camera_drift_k=1.0, camera_drift_period_s=7200.0, blackbody=bb)
    runner = _AppRunner(str(manifest) if manifest else None, threshold_c, camera == "referenced", bb)
    results = run_shards(_shards(seed, travellers, 400 if big else 2000, base), runner, workers)
    return {"optics": o.as_dict(), "febrile_share": febrile_share, **score(results, threshold_c)}


PREVALENCES = (0.001, 0.01, 0.05)  # febrile share among travellers: the PPV a deployment can expect


def ppv(sensitivity: float, false_alarm_rate: float, prevalence: float) -> float | None:
    """Positive predictive value at `prevalence` (Bayes): the share of alarms that are febrile travellers."""
    alarms = sensitivity * prevalence + false_alarm_rate * (1 - prevalence)
    return sensitivity * prevalence / alarms if alarms else None


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """The Wilson score interval for a proportion (95 % by default): (low, high); None when n == 0.
    Wilson EB, J Am Stat Assoc 22 (1927) 209-212; unlike p +- z·sqrt(p(1-p)/n) it stays inside [0, 1] and
    keeps its coverage near p = 1, where a screening's sensitivity lives."""
    if n <= 0:
        return None
    p = successes / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


GOALS = {"sensitivity": 0.95, "sensitivity_ci95_low": 0.90, "false_alarm_rate": 0.01}


def score(results: list[ShardResult], threshold_c: float) -> dict[str, Any]:
    truth = [tr for r in results for tr in r.truth]
    decided: dict[tuple[int, int], Any] = {}
    duplicates = 0
    for k, r in enumerate(results):
        for _, tr, s in r.matched:
            if (k, tr.id) in decided:
                duplicates += 1
                decided[(k, tr.id)] = decided[(k, tr.id)] or s.fever  # any alarm on the traveller counts
            else:
                decided[(k, tr.id)] = s.fever
    spurious_alarms = sum(1 for r in results for _, s in r.spurious if s.fever)
    tags: dict[str, int] = {}
    for r in results:
        for _, _, s in r.matched:
            for tag in s.tags:
                tags[tag] = tags.get(tag, 0) + 1
    invalid = sum(1 for r in results for _, _, s in r.matched if s.tags)
    measured = sum(len(r.matched) for r in results)
    tp = fp = tn = fn = 0
    by_conf: dict[str, dict[str, Any]] = {}
    invalid_by_conf: dict[str, int] = {}
    for r in results:
        for _, tr, s in r.matched:
            invalid_by_conf[tr.confounder] = invalid_by_conf.get(tr.confounder, 0) + bool(s.tags)
    errors = []
    for k, r in enumerate(results):
        for tr in r.truth:
            alarm = decided.get((k, tr.id))
            raised = bool(alarm)
            c = by_conf.setdefault(tr.confounder, {"travellers": 0, "alarms": 0, "febrile": 0, "unscreened": 0})
            c["travellers"] += 1
            c["alarms"] += raised
            c["febrile"] += tr.febrile
            c["unscreened"] += alarm is None
            if tr.febrile:
                tp += raised
                fn += not raised
            else:
                fp += raised
                tn += not raised
        errors += [s.estimate_c - tr.core_c for _, tr, s in r.matched]
    fp += spurious_alarms
    for name, c in by_conf.items():  # each confounder's own rates
        afebrile = c["travellers"] - c["febrile"]
        febrile_alarms = sum(1 for k, r in enumerate(results) for tr in r.truth
                             if tr.confounder == name and tr.febrile and decided.get((k, tr.id)))
        c["sensitivity"] = round(febrile_alarms / c["febrile"], 4) if c["febrile"] else None
        c["false_alarm_rate"] = round((c["alarms"] - febrile_alarms) / afebrile, 5) if afebrile else None
        c["invalid"] = invalid_by_conf.get(name, 0)
    n = len(truth)
    screened = len(decided)
    err = np.array(errors) if errors else np.zeros(1)
    rates = (tp / (tp + fn), fp / (fp + tn)) if tp + fn and fp + tn else None
    ppvs = {str(p): None if rates is None or (v := ppv(*rates, p)) is None else round(v, 4) for p in PREVALENCES}
    ci = wilson(tp, tp + fn)
    far_ci = wilson(fp, fp + tn)
    sens = tp / (tp + fn) if tp + fn else None
    far = fp / (fp + tn) if fp + tn else None
    goals = {"sensitivity >= 0.95": sens is not None and sens >= GOALS["sensitivity"],
             "sensitivity_ci95 low >= 0.90": ci is not None and ci[0] >= GOALS["sensitivity_ci95_low"],
             "false_alarm_rate <= 0.01": far is not None and far <= GOALS["false_alarm_rate"],
             "febrile >= 500": tp + fn >= 500}
    return {
        "travellers": n, "threshold_c": threshold_c,
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        "febrile": tp + fn, "afebrile": fp + tn,
        "sensitivity": round(tp / (tp + fn), 4) if tp + fn else None,
        "sensitivity_ci95": None if ci is None else [round(ci[0], 4), round(ci[1], 4)],
        "false_alarm_rate": round(fp / (fp + tn), 5) if fp + tn else None,
        "false_alarm_rate_ci95": None if far_ci is None else [round(far_ci[0], 5), round(far_ci[1], 5)],
        "alarm_rate": round((tp + fp) / n, 5) if n else None,
        "ppv_at_prevalence": ppvs,
        "screened": screened, "unscreened": n - screened,
        "count_error": round((screened - n) / n, 5) if n else None,
        "duplicate_tracks": duplicates, "spurious_tracks": sum(len(r.spurious) for r in results),
        "estimate_mae_c": round(float(np.abs(err).mean()), 4), "estimate_bias_c": round(float(err.mean()), 4),
        "by_confounder": by_conf, "frames": sum(r.frames for r in results),
        "invalid_rate": round(invalid / measured, 5) if measured else None, "tags": dict(sorted(tags.items())),
        "goals": goals,
    }
