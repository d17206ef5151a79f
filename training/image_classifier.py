"""Train and evaluate the handheld's image classifiers (wood end grain, insects) from DIR/<label>/*.jpg.

    customs-edge models train wood --images DIR [--out DIR] [--seed 0]
    customs-edge models evaluate wood --json

The network (one ONNX graph, written with the onnx helper API; docs/handheld-models.md says why):
  image [N,3,S,S] -> grey -> at 3 scales (S, S/2, S/4): a fixed bank of 9x9 filters (Gabor at 2
  wavelengths x 4 orientations, magnitude of the even/odd pair; Laplacian-of-Gaussian at 2 widths,
  both polarities) -> mean energy -> log; rotation-invariant summaries per wavelength (mean, max, min
  over orientations); dark and light tails of the grey levels (pore and deposit area); colour mean
  and spread -> `features` -> standardise -> a trained head (multinomial logistic regression or a
  small MLP) -> `logits`; and `ood`: the smallest whitened distance to a class centre.
Calibration: a temperature fitted on a validation split (minimum negative log-likelihood). The
abstention thresholds (brightness, sharpness, ood, confidence) are set from the training photographs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from customs_edge.models import default_manifest
from customs_edge.models.image_classifier import ImageClassifier, InputSpec, preprocess, quality, softmax

SIZE = 192
INPUT = InputSpec(name="image", size=(SIZE, SIZE), layout="NCHW", colour="RGB", scale=1 / 255,
                  mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
WAVELENGTHS = (4.0, 8.0)
ORIENTATIONS = 4
LOG_SIGMAS = (1.0, 2.0)
SCALES = 3
TAILS = (0.0, 0.4, 0.8)  # grey deviations (in normalised units) whose tails are measured
KSIZE = 9
SUBJECTS = {"wood": "end grain", "insects": "an insect"}
VERSION = "1.1.0"
# ood above this quantile of the validation split: "unknown species" (docs/handheld-models.md, leave-one-out)
KNOWN_QUANTILE = 0.99


def filter_bank() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(even [8,1,9,9], odd [8,1,9,9], LoG [2,1,9,9]) float32 kernels, zero mean."""
    even, odd = [], []
    for lam in WAVELENGTHS:
        for k in range(ORIENTATIONS):
            th = np.pi * k / ORIENTATIONS
            sigma = 0.5 * lam
            e = cv2.getGaborKernel((KSIZE, KSIZE), sigma, th, lam, 1.0, 0.0, cv2.CV_32F)
            o = cv2.getGaborKernel((KSIZE, KSIZE), sigma, th, lam, 1.0, np.pi / 2, cv2.CV_32F)
            even.append(e - e.mean())
            odd.append(o - o.mean())
    r = np.arange(KSIZE, dtype=np.float32) - KSIZE // 2
    rr = r[:, None] ** 2 + r[None, :] ** 2
    logs = []
    for s in LOG_SIGMAS:
        k = (rr / (2 * s * s) - 1) * np.exp(-rr / (2 * s * s))  # positive on dark blobs
        k = k - k.mean()
        logs.append(k / np.abs(k).sum())
    f = lambda xs: np.stack(xs)[:, None].astype(np.float32)  # noqa: E731
    return f(even), f(odd), f(logs)


def n_features() -> int:
    return SCALES * (3 * len(WAVELENGTHS) + 2 * len(LOG_SIGMAS)) + 2 * len(TAILS) + 6


def _feature_nodes(helper: Any, numpy_helper: Any) -> tuple[list[Any], list[Any]]:
    """Nodes and initialisers from 'image' [N,3,S,S] to 'features' [N, n_features()]."""
    even, odd, logk = filter_bank()
    luma = (np.array([0.299, 0.587, 0.114], np.float32) * np.float32(INPUT.std[0])).reshape(1, 3, 1, 1)
    inits: dict[str, np.ndarray] = {"luma": luma, "k_even": even, "k_odd": odd, "k_log": logk,
             "eps": np.array(1e-4, np.float32), "shape_g": np.array([0, len(WAVELENGTHS), ORIENTATIONS], np.int64),
             "signs": np.array([-1.0] * len(TAILS) + [1.0] * len(TAILS), np.float32).reshape(1, -1, 1, 1),
             "tails": np.array(list(TAILS) * 2, np.float32).reshape(1, -1, 1, 1),
             "flat": np.array([0, -1], np.int64)}
    nodes = [helper.make_node("Conv", ["image", "luma"], ["grey"])]
    n = helper.make_node
    feats = []
    src = "grey"
    for s in range(SCALES):
        if s:
            nodes.append(n("AveragePool", [src], [f"g{s}"], kernel_shape=[2, 2], strides=[2, 2]))
            src = f"g{s}"
        nodes += [
            n("Conv", [src, "k_even"], [f"e{s}"]), n("Conv", [src, "k_odd"], [f"o{s}"]),
            n("Mul", [f"e{s}", f"e{s}"], [f"e2{s}"]), n("Mul", [f"o{s}", f"o{s}"], [f"o2{s}"]),
            n("Add", [f"e2{s}", f"o2{s}"], [f"m2{s}"]), n("Sqrt", [f"m2{s}"], [f"m{s}"]),
            n("GlobalAveragePool", [f"m{s}"], [f"gm{s}"]), n("Add", [f"gm{s}", "eps"], [f"gme{s}"]),
            n("Log", [f"gme{s}"], [f"lg{s}"]), n("Reshape", [f"lg{s}", "shape_g"], [f"r{s}"]),
            n("ReduceMean", [f"r{s}"], [f"gmean{s}"], axes=[2], keepdims=0),
            n("ReduceMax", [f"r{s}"], [f"gmax{s}"], axes=[2], keepdims=0),
            n("ReduceMin", [f"r{s}"], [f"gmin{s}"], axes=[2], keepdims=0),
            n("Conv", [src, "k_log"], [f"l{s}"]), n("Relu", [f"l{s}"], [f"lp{s}"]), n("Neg", [f"l{s}"], [f"ln{s}"]),
            n("Relu", [f"ln{s}"], [f"lnr{s}"]), n("Concat", [f"lp{s}", f"lnr{s}"], [f"lc{s}"], axis=1),
            n("GlobalAveragePool", [f"lc{s}"], [f"gl{s}"]), n("Add", [f"gl{s}", "eps"], [f"gle{s}"]),
            n("Log", [f"gle{s}"], [f"ll{s}"]), n("Reshape", [f"ll{s}", "flat"], [f"llf{s}"]),
        ]
        feats += [f"gmean{s}", f"gmax{s}", f"gmin{s}", f"llf{s}"]
    nodes += [
        n("GlobalAveragePool", ["grey"], ["gmu"]), n("Sub", ["grey", "gmu"], ["dev"]),
        n("Mul", ["dev", "signs"], ["sdev"]), n("Sub", ["sdev", "tails"], ["tdev"]), n("Relu", ["tdev"], ["tr"]),
        n("GlobalAveragePool", ["tr"], ["tp"]), n("Add", ["tp", "eps"], ["tpe"]), n("Log", ["tpe"], ["tl"]),
        n("Reshape", ["tl", "flat"], ["tails_f"]),
        n("GlobalAveragePool", ["image"], ["cmu"]), n("Mul", ["image", "image"], ["sq"]),
        n("GlobalAveragePool", ["sq"], ["csq"]), n("Mul", ["cmu", "cmu"], ["cmu2"]),
        n("Sub", ["csq", "cmu2"], ["cvar"]),
        n("Add", ["cvar", "eps"], ["cvare"]), n("Log", ["cvare"], ["clv"]),
        n("Reshape", ["cmu", "flat"], ["cmu_f"]), n("Reshape", ["clv", "flat"], ["clv_f"]),
        n("Concat", [*feats, "tails_f", "cmu_f", "clv_f"], ["features"], axis=1),
    ]
    return nodes, [numpy_helper.from_array(v, name=k) for k, v in inits.items()]


def _model(nodes: list[Any], inits: list[Any], outputs: list[tuple[str, list[int | None]]]) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "image-classifier", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="customs-edge")
    model.ir_version = 7
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


class FeatureExtractor:
    """The feature part of the graph alone, run by onnxruntime: training sees what the device computes."""

    def __init__(self) -> None:
        import onnxruntime as ort
        from onnx import helper, numpy_helper

        nodes, inits = _feature_nodes(helper, numpy_helper)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(_model(nodes, inits, [("features", [None, n_features()])]), opts,
                                            providers=["CPUExecutionProvider"])

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        out = []
        for i in range(0, len(images), 32):
            x = np.concatenate([preprocess(im, INPUT) for im in images[i:i + 32]])
            out.append(self.session.run(["features"], {"image": x})[0])
        return np.concatenate(out).astype(np.float64)


# --- data --------------------------------------------------------------------------------------
def _known_status(kind: str | None) -> dict[str, dict[str, Any]]:
    """Regulatory status per label of the shipped model of `kind` (for folders without labels.json)."""
    if kind is None:
        return {}
    try:
        m = json.loads(default_manifest(kind).read_text())
        return {x["label"]: x for x in m["classifier"]["labels"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def read_status(root: Path, labels: list[str], kind: str | None) -> dict[str, dict[str, Any]]:
    """Each label's {"name", "cites", "quarantine_pest"}: root/labels.json first, then the shipped model of
    `kind` (a console export-labels folder has no labels.json); a label in neither is refused."""
    status_path = root / "labels.json"
    given: dict[str, Any] = {}
    if status_path.is_file():
        try:
            given = json.loads(status_path.read_text())
            if not isinstance(given, dict) or not all(isinstance(v, dict) for v in given.values()):
                raise ValueError("expected {label: {name, cites, quarantine_pest}}")
        except ValueError as exc:
            raise SystemExit(f"{status_path}: {exc}") from exc
    known = _known_status(kind)
    status = {x: given.get(x) or known.get(x) for x in labels}
    missing = [x for x, v in status.items() if v is None]
    if missing:
        raise SystemExit(f"{status_path}: no regulatory status for {missing} (nor in the shipped {kind} model): "
                         'list them, e.g. {"dalbergia_nigra": {"name": "Dalbergia nigra", "cites": "I", '
                         '"quarantine_pest": false}} (cites null if not listed)')
    for x, v in status.items():
        if v is not None and (v.get("cites") not in (None, "I", "II", "III")
                              or not isinstance(v.get("quarantine_pest", False), bool)):
            raise SystemExit(f"{status_path}: {x}: cites must be null, \"I\", \"II\" or \"III\" and "
                             f"quarantine_pest true or false, not {v}")
    return {x: v for x, v in status.items() if v is not None}


def read_folder(root: Path, kind: str | None = None
                ) -> tuple[list[np.ndarray], np.ndarray, list[str], dict[str, dict[str, Any]]]:
    """(images, label index per image, labels, status per label) from root/<label>/*.jpg|png; status from
    root/labels.json ({label: {"name", "cites", "quarantine_pest"}}) or the shipped model of `kind`."""
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"{root}: no such folder (expected DIR/<label>/*.jpg)")
    labels = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(labels) < 2:
        raise SystemExit(f"{root}: needs at least two label folders DIR/<label>/*.jpg, found {labels}")
    status = read_status(root, labels, kind)
    images, ys = [], []
    for k, lab in enumerate(labels):
        files = sorted(p for p in (root / lab).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if len(files) < 5:
            raise SystemExit(f"{root / lab}: {len(files)} images; at least 5 per label")
        for f in files:
            img = cv2.imread(str(f), cv2.IMREAD_COLOR)
            if img is None:
                raise SystemExit(f"{f}: not a readable image")
            images.append(img)
            ys.append(k)
    return images, np.array(ys), labels, {x: status[x] for x in labels}


def _split(y: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, validation) indices."""
    rng = np.random.default_rng(seed)
    tr, va = [], []
    for k in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == k))
        nv = max(1, round(len(idx) * share))
        va += idx[:nv].tolist()
        tr += idx[nv:].tolist()
    return np.array(tr), np.array(va)


# --- fit ---------------------------------------------------------------------------------------
def fit_head(x: np.ndarray, y: np.ndarray, head: str, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Dense layers [(W, b), ...] on standardised features (ReLU between them)."""
    if head == "logreg":
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=1.0, max_iter=3000)
        lr.fit(x, y)
        return [(lr.coef_.T.copy(), lr.intercept_.copy())]
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    mlp = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=800, early_stopping=False, random_state=seed)
    with warnings.catch_warnings():  # 800 epochs is the budget; the validation split says whether it is enough
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit(x, y)
    return list(zip(mlp.coefs_, mlp.intercepts_, strict=True))


def head_logits(layers: list[tuple[np.ndarray, np.ndarray]], z: np.ndarray) -> np.ndarray:
    h = z
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    return h


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the validation negative log-likelihood (a 1-D search)."""
    best = (np.inf, 1.0)
    for t in np.exp(np.linspace(np.log(0.2), np.log(20.0), 300)):
        p = softmax(logits, float(t))
        nll = -np.mean(np.log(p[np.arange(len(y)), y] + 1e-12))
        best = min(best, (nll, float(t)))
    return best[1]


def whitening(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W, class centres) for the ood distance: pooled within-class covariance, shrunk, inverted root."""
    centres = np.stack([z[y == k].mean(axis=0) for k in np.unique(y)])
    r = z - centres[y]
    cov = np.cov(r.T)
    cov += 0.01 * np.trace(cov) / len(cov) * np.eye(len(cov))
    vals, vecs = np.linalg.eigh(cov)
    return vecs @ np.diag(vals ** -0.5) @ vecs.T, centres


def ood_distance(z: np.ndarray, w: np.ndarray, centres: np.ndarray) -> np.ndarray:
    zw, cw = z @ w, centres @ w
    return np.min(((zw[:, None, :] - cw[None]) ** 2).mean(axis=2), axis=1)


def export(mean: np.ndarray, scale: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]], w: np.ndarray,
           centres: np.ndarray) -> bytes:
    from onnx import helper, numpy_helper

    nodes, inits = _feature_nodes(helper, numpy_helper)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    arrays: dict[str, np.ndarray] = {"ax1": np.array([1], np.int64), "f_mean": f32(mean), "f_scale": f32(scale),
                                     "ood_w": f32(w), "ood_c": f32((centres @ w)[None])}
    nodes += [helper.make_node("Sub", ["features", "f_mean"], ["fc"]),
              helper.make_node("Div", ["fc", "f_scale"], ["z"])]
    h = "z"
    for i, (wi, bi) in enumerate(layers):
        arrays[f"w{i}"], arrays[f"b{i}"] = f32(wi), f32(bi)
        out = "logits" if i == len(layers) - 1 else f"h{i}"
        nodes += [helper.make_node("MatMul", [h, f"w{i}"], [f"{out}_m"]),
                  helper.make_node("Add", [f"{out}_m", f"b{i}"], [out if out == "logits" else f"{out}_a"])]
        if out != "logits":
            nodes.append(helper.make_node("Relu", [f"{out}_a"], [out]))
        h = out
    nodes += [helper.make_node("MatMul", ["z", "ood_w"], ["zw"]),
              helper.make_node("Unsqueeze", ["zw", "ax1"], ["zw3"]), helper.make_node("Sub", ["zw3", "ood_c"], ["dd"]),
              helper.make_node("Mul", ["dd", "dd"], ["dd2"]),
              helper.make_node("ReduceMean", ["dd2"], ["dm"], axes=[2], keepdims=0),
              helper.make_node("ReduceMin", ["dm"], ["ood"], axes=[1], keepdims=1)]
    inits += [numpy_helper.from_array(v, name=k) for k, v in arrays.items()]
    n_cls = layers[-1][1].shape[0]
    return _model(nodes, inits, [("logits", [None, n_cls]), ("ood", [None, 1])])


def train(kind: str, images_dir: str | Path, out_dir: str | Path, seed: int = 0, head: str = "mlp",
          min_confidence: float = 0.6, log: Any = print, source: str | None = None) -> Path:
    """Fit on images_dir (DIR/<label>/*.jpg + labels.json), write out_dir/{kind}.onnx + manifest.json."""
    from customs_edge.models.runtime import sha256_file

    t0 = time.perf_counter()
    images, y, labels, status = read_folder(Path(images_dir), kind)
    log(f"{kind}: {len(images)} images, {len(labels)} labels from {images_dir}")
    fx = FeatureExtractor()
    x = fx(images)
    qual = np.array([quality(im, 256) for im in images])
    tr, va = _split(y, 0.2, seed)
    mean, scale = x[tr].mean(axis=0), x[tr].std(axis=0) + 1e-6
    z = (x - mean) / scale
    layers = fit_head(z[tr], y[tr], head, seed)
    logits_va = head_logits(layers, z[va])
    temp = fit_temperature(logits_va, y[va])
    p_va = softmax(logits_va, temp)
    acc_va = float((p_va.argmax(axis=1) == y[va]).mean())
    w, centres = whitening(z[tr], y[tr])
    d_va = ood_distance(z[va], w, centres)
    max_ood = float(np.quantile(d_va, 0.99) * 2.5)
    max_known = float(np.quantile(d_va, KNOWN_QUANTILE))
    bright, sharp = qual[:, 0], qual[:, 1]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / f"{kind}.onnx"
    onnx_path.write_bytes(export(mean, scale, layers, w, centres))
    classifier = {
        "subject": SUBJECTS.get(kind, "a specimen"), "input": INPUT.model_dump(mode="json"),
        "logits": "logits", "ood": "ood", "temperature": round(temp, 4), "min_confidence": min_confidence,
        "checks": {"size": 256, "min_brightness": round(float(np.quantile(bright, 0.005)) * 0.6, 2),
                   "max_brightness": round(min(250.0, float(np.quantile(bright, 0.995)) * 1.15 + 5), 2),
                   "min_sharpness": round(float(np.quantile(sharp, 0.005)) * 0.5, 3), "max_ood": round(max_ood, 4),
                   "max_known": round(max_known, 4)},
        "labels": [{"label": lab, "name": str(status[lab].get("name", lab)), "cites": status[lab].get("cites"),
                    "quarantine_pest": bool(status[lab].get("quarantine_pest", False))} for lab in labels],
    }
    manifest = {
        "name": kind, "version": VERSION, "file": onnx_path.name, "sha256": sha256_file(onnx_path),
        "inputs": [{"name": "image", "shape": [None, 3, SIZE, SIZE], "dtype": "float32",
                    "units": "RGB, centre square, (x/255 - 0.5) / 0.25"}],
        "outputs": [{"name": "logits", "shape": [None, len(labels)], "dtype": "float32", "units": "logits"},
                    {"name": "ood", "shape": [None, 1], "dtype": "float32",
                     "units": "mean squared whitened distance to the nearest class centre"}],
        "training": {"images": source or str(images_dir), "n_images": len(images), "seed": seed, "head": head,
                     "features": n_features(), "validation_share": 0.2, "seconds": round(time.perf_counter() - t0, 1),
                     "model": f"fixed filter bank ({n_features()} features) + {head}"},
        "metrics": {"validation_accuracy": round(acc_va, 4), "validation_images": len(va),
                    "temperature": round(temp, 4)},
        "classifier": classifier,
    }
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    ImageClassifier.load(path)  # refuse to write what cannot be loaded
    log(f"{kind}: validation accuracy {acc_va:.3f}, T={temp:.2f}, {time.perf_counter() - t0:.1f} s -> {path}")
    return path


def train_on_simulated(kind: str, out_dir: str | Path, seed: int = 0, per_class: int = 100,
                       head: str = "mlp") -> Path:
    """The shipped model: simulators.specimens writes DIR/<label>/*.jpg, then the same train() a lab runs."""
    import tempfile

    from customs_edge.simulators import specimens

    with tempfile.TemporaryDirectory(prefix=f"{kind}-") as tmp:
        specimens.write_dataset(kind, tmp, per_class=per_class, seed=seed)
        return train(kind, tmp, out_dir, seed=seed, head=head, source="simulators.specimens")


# --- evaluation --------------------------------------------------------------------------------
def heldout(kind: str, seed: int, per_class: int) -> tuple[list[np.ndarray], list[str]]:
    """A seeded held-out set, JPEG round-tripped like the files training reads (never the training seeds:
    write_dataset uses seed * 1_000_003 + n; these are offset by 500_000)."""
    from customs_edge.simulators import specimens

    images: list[np.ndarray] = []
    truth: list[str] = []
    for label in specimens.labels(kind):
        for n in range(per_class):
            img = specimens.image(kind, label, seed * 1_000_003 + 500_000 + n)
            _ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
            images.append(np.asarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)))
            truth.append(label)
    return images, truth


def unseen_set(kind: str, seed: int, per_class: int) -> list[tuple[np.ndarray, str]]:
    """Photos of species the model has no label for (simulators.specimens.unseen_labels)."""
    from customs_edge.simulators import specimens

    out = []
    for label in specimens.unseen_labels(kind):
        for n in range(per_class):
            img = specimens.image(kind, label, seed * 1_000_003 + 700_000 + n)
            out.append((np.asarray(cv2.imdecode(cv2.imencode(".jpg", img)[1], cv2.IMREAD_COLOR)), label))
    return out


def evaluate(kind: str, seed: int = 1, per_class: int = 40, manifest: str | Path | None = None) -> dict[str, Any]:
    clf = ImageClassifier.load(manifest or default_manifest(kind))
    images, truth = heldout(kind, seed, per_class)
    idents = [clf.classify(im) for im in images]
    labels = clf.labels
    idx = {k: i for i, k in enumerate(labels)}
    conf = np.zeros((len(labels), len(labels)), int)
    top1 = [i.top3[0][0] for i in idents]
    for t, p in zip(truth, top1, strict=True):
        conf[idx[t], idx[p]] += 1
    kept = [(t, i.label) for t, i in zip(truth, idents, strict=True) if i.label is not None]
    reasons: dict[str, int] = {}
    for i in idents:
        if i.abstain_reason:
            reasons[i.abstain_reason] = reasons.get(i.abstain_reason, 0) + 1
    per_class_fig = {}
    for k, lab in enumerate(labels):
        tp = int(conf[k, k])
        per_class_fig[lab] = {"precision": round(tp / conf[:, k].sum(), 4) if conf[:, k].sum() else None,
                              "recall": round(tp / conf[k].sum(), 4) if conf[k].sum() else None}
    alerts_true = [clf.status(t).cites is not None or clf.status(t).quarantine_pest for t in truth]
    alert_missed = sum(1 for a, i in zip(alerts_true, idents, strict=True) if a and i.label and not i.alert)
    false_alerts = sum(1 for a, i in zip(alerts_true, idents, strict=True) if not a and i.alert)
    ms = np.array([i.ms for i in idents])
    unseen = unseen_set(kind, seed, max(4, per_class // 4))
    unseen_idents = [clf.classify(im) for im, _ in unseen]
    unseen_reasons: dict[str, int] = {}
    for (_, truth_label), i in zip(unseen, unseen_idents, strict=True):
        key = f"abstained: {i.abstain_reason}" if i.label is None else f"{truth_label} -> {i.label}"
        unseen_reasons[key] = unseen_reasons.get(key, 0) + 1
    conf1 = np.array([i.top3[0][1] for i in idents])
    hit = np.array([t == p for t, p in zip(truth, top1, strict=True)], float)
    bins = np.minimum((conf1 * 10).astype(int), 9)  # expected calibration error, 10 bins of top-1 confidence
    ece = sum(abs(hit[bins == b].mean() - conf1[bins == b].mean()) * (bins == b).mean() for b in np.unique(bins))
    return {
        "model": clf.name, "version": clf.version, "seed": seed, "images": len(images),
        "accuracy_top1": round(float(np.mean([t == p for t, p in zip(truth, top1, strict=True)])), 4),
        "accuracy_top3": round(float(np.mean([t in [k for k, _ in i.top3]
                                              for t, i in zip(truth, idents, strict=True)])), 4),
        "abstain_rate": round(1 - len(kept) / len(images), 4), "abstain_reasons": reasons,
        "accuracy_not_abstained": round(float(np.mean([t == p for t, p in kept])), 4) if kept else None,
        "regulated_identified_as_unregulated": alert_missed, "unregulated_identified_as_regulated": false_alerts,
        "unseen_species": {"labels": sorted({t for _, t in unseen}), "images": len(unseen),
                           "abstained": round(sum(1 for i in unseen_idents if i.label is None) / len(unseen), 4),
                           "outcomes": dict(sorted(unseen_reasons.items()))},
        "expected_calibration_error": round(float(ece), 4), "per_class": per_class_fig, "labels": labels,
        "confusion": conf.tolist(),
        "ms_per_photo": {"median": round(float(np.median(ms)), 2), "p95": round(float(np.quantile(ms, 0.95)), 2)},
    }


def evaluate_wood(seed: int = 1) -> dict[str, Any]:
    return evaluate("wood", seed)


def evaluate_insects(seed: int = 1) -> dict[str, Any]:
    return evaluate("insects", seed)


def compare_heads(kind: str, images_dir: str | Path, seed: int = 0, heldout_per_class: int = 20) -> dict[str, Any]:
    """Accuracy (validation split and the seeded held-out set) and head time for each head on the same
    features, and the time of the fixed feature graph: the figures docs/handheld-models.md quotes."""
    images, y, labels, _ = read_folder(Path(images_dir))
    fx = FeatureExtractor()
    x = fx(images)
    h_images, h_truth = heldout(kind, 1, heldout_per_class)
    t0 = time.process_time()
    xh = fx(h_images)
    feat_ms = (time.process_time() - t0) * 1000 / len(h_images)
    yh = np.array([labels.index(t) for t in h_truth])
    tr, va = _split(y, 0.2, seed)
    mean, scale = x[tr].mean(axis=0), x[tr].std(axis=0) + 1e-6
    z, zh = (x - mean) / scale, (xh - mean) / scale
    out: dict[str, Any] = {"kind": kind, "train_images": len(tr), "heldout_images": len(yh),
                           "features": n_features(), "feature_graph_cpu_ms": round(feat_ms, 2)}
    for head in ("logreg", "mlp"):
        t0 = time.process_time()
        layers = fit_head(z[tr], y[tr], head, seed)
        fit_s = time.process_time() - t0
        t0 = time.process_time()
        for _ in range(20):
            lh = head_logits(layers, zh)
        head_us = (time.process_time() - t0) * 1e6 / 20 / len(zh)
        out[head] = {"validation_accuracy": round(float((head_logits(layers, z[va]).argmax(1) == y[va]).mean()), 4),
                     "heldout_accuracy": round(float((lh.argmax(1) == yh).mean()), 4),
                     "fit_cpu_s": round(fit_s, 2), "head_us_per_photo": round(head_us, 2)}
    return out


def leave_one_out(images_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """Open set: train without one label at a time (MLP, the shipped thresholds) and count how many of
    its photos are abstained as "unknown species" or worse, beside the validation photos so abstained."""
    images, y, labels, _ = read_folder(Path(images_dir))
    x = FeatureExtractor()(images)
    per: dict[str, Any] = {}
    for k, lab in enumerate(labels):
        keep = y != k
        yk = np.searchsorted(np.unique(y[keep]), y[keep])
        tr, va = _split(yk, 0.2, seed)
        mean, scale = x[keep][tr].mean(axis=0), x[keep][tr].std(axis=0) + 1e-6
        z = (x[keep] - mean) / scale
        w, c = whitening(z[tr], yk[tr])
        d_va = ood_distance(z[va], w, c)
        d_out = ood_distance((x[~keep] - mean) / scale, w, c)
        t = np.quantile(d_va, KNOWN_QUANTILE)
        per[lab] = {"unseen_abstained": round(float((d_out > t).mean()), 3),
                    "validation_abstained": round(float((d_va > t).mean()), 3)}
    mean_unseen = float(np.mean([v["unseen_abstained"] for v in per.values()]))
    return {"labels": per, "mean_unseen_abstained": round(mean_unseen, 3)}


GOLDEN_FILE = "golden.npz"


def write_golden(kind: str, manifest_path: Path, seed: int = 0, per_class: int = 1) -> dict[str, Any]:
    """The golden set of an image classifier: `per_class` held-out photographs per label (their own seeds),
    preprocessed into the network's input as float16, in golden.npz beside the manifest with the true class
    indices; matched by argmax; min_accuracy is what the model scores on them less 0.1."""
    from customs_edge.models.runtime import manifest_text, sha256_file

    clf = ImageClassifier.load(manifest_path)
    images, truth = heldout(kind, seed + 7, per_class)
    x = np.concatenate([preprocess(im, clf.spec.input) for im in images]).astype(np.float16)
    y = np.array([clf.labels.index(t) for t in truth], dtype=np.int64)
    logits = clf.model.predict({clf.spec.input.name: x.astype(np.float32)})[clf.spec.logits]
    accuracy = float(np.mean(np.argmax(logits, axis=1) == y))
    path = manifest_path.parent / GOLDEN_FILE
    arrays: dict[str, np.ndarray] = {f"input/{clf.spec.input.name}": x, f"expected/{clf.spec.logits}": y}
    np.savez_compressed(path, allow_pickle=False, **arrays)
    golden = {"match": "argmax", "file": GOLDEN_FILE, "sha256": sha256_file(path),
              "min_accuracy": round(max(0.0, accuracy - 0.1), 3),
              "source": f"simulators.specimens held-out seed {seed + 7}, {per_class} photograph(s) per label, "
                        f"preprocessed (float16); the model scored {accuracy:.3f} when built"}
    doc = json.loads(manifest_path.read_text())
    doc["golden"] = golden
    manifest_path.write_text(manifest_text(doc))
    return {**golden, "expected": {clf.spec.logits: y.tolist()}}


if __name__ == "__main__":
    import sys

    fn = leave_one_out(sys.argv[3]) if sys.argv[1] == "open-set" else compare_heads(sys.argv[1], sys.argv[2])
    print(json.dumps(fn, indent=2))
