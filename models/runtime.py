"""Models: ONNX files described by a manifest, loaded through onnxruntime and checked before use.

Manifest (JSON, beside the .onnx file):
  {"name": "ore-grade", "version": "1.0.0", "file": "ore_grade.onnx", "sha256": "...",
   "inputs":  [{"name": "spectrum", "shape": [null, 1024], "dtype": "float32", "units": "counts"}],
   "outputs": [{"name": "assay", "shape": [null, 3], "dtype": "float32", "units": "% Fe, % SiO2, % H2O"}],
   "training": {...free text and figures...}, "metrics": {...held-out figures...}}
A model whose file hash, input/output names or shapes differ from its manifest is refused (ModelError).
`null` in a shape is a free (batch) dimension.

Everything a model loads stays inside the manifest's directory and is hashed: `file` and every
`external_data` entry (ONNX tensors stored beside the graph) are plain relative names (no `..`, not absolute,
not through a symlink out of the directory), each with its sha256. A model without external_data is hashed
and loaded from the same bytes (onnxruntime then loads no other file at all); with external_data, every
other file in the directory must be the manifest or its signature, so the model can reach nothing unhashed.

Signature: `manifest.json.sig` beside the manifest holds `ed25519:BASE64` over `signed_message(manifest)`
(a fixed prefix and the manifest's canonical JSON: keys sorted, no spaces, UTF-8), made by
`customs-edge fleet model sign DIR --key FILE`. A loader given a public key refuses an unsigned or wrongly
signed manifest (check_signature); the manifest's sha256 entries then vouch for every file.

Golden set (`golden`): inputs with the expected outputs, a tolerance per output and a minimum accuracy (the
share of rows whose every output is within its tolerance). `OnnxModel.self_test()` runs it: a model update is
activated only if it passes on the unit (agent/model_update.py). The training scripts write it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from customs_edge.core.errors import ModelError


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    shape: list[int | None]
    dtype: str = "float32"
    units: str | None = None


Sha256 = Field(pattern=r"^[0-9a-f]{64}$")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a model's name and version: also directory names on a unit
SIGNATURE_SUFFIX = ".sig"
_SIGNED_PREFIX = b"customs-edge model manifest v1\n"


class DataFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str
    sha256: str = Sha256


class Golden(BaseModel):
    """Rows of inputs with their expected outputs; `min_accuracy` of the rows must have every output within
    its `tolerance` (absolute, per output name), or, with `match: argmax`, the index of each row's largest
    output equal to the expected class index. Large inputs (images) live in `file`, an .npz beside the manifest
    (arrays `input/NAME` and `expected/NAME`, hashed by `sha256` like every other file the model loads)."""

    model_config = ConfigDict(extra="forbid")
    inputs: dict[str, list[Any]] = Field(default_factory=dict)
    expected: dict[str, list[Any]] = Field(default_factory=dict)
    tolerance: dict[str, float] = Field(default_factory=dict)
    match: Literal["tolerance", "argmax"] = "tolerance"
    file: str | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    min_accuracy: float = Field(ge=0, le=1)
    source: str | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=NAME_PATTERN)
    file: str
    sha256: str = Sha256
    external_data: list[DataFile] = Field(default_factory=list)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    golden: Golden | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    # image classifiers (models.image_classifier): preprocessing, labels and their regulatory status
    classifier: dict[str, Any] | None = None

    def files(self) -> dict[str, str]:
        """Every file the model loads (relative name -> sha256)."""
        golden = {self.golden.file: self.golden.sha256 or ""} if self.golden and self.golden.file else {}
        return {self.file: self.sha256, **{d.file: d.sha256 for d in self.external_data}, **golden}


class Model(Protocol):
    manifest: Manifest

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inside(directory: Path, name: str, what: str = "file") -> Path:
    """`directory / name` when `name` is a plain relative path that stays inside `directory` (symlinks
    resolved); else ModelError naming the fix."""
    pure = Path(name)
    if not name or pure.is_absolute() or name.startswith(("/", "\\")) or ".." in pure.parts or "\\" in name:
        raise ModelError(f"{directory}: manifest {what} {name!r} must be a file name inside the model's directory "
                         "(no '..', not absolute): put the file beside manifest.json and name it relative to it")
    path = directory / pure
    try:
        real, root = path.resolve(), directory.resolve()
    except (OSError, RuntimeError) as exc:
        raise ModelError(f"{path}: cannot resolve the path ({exc})") from exc
    if root != real and root not in real.parents:
        raise ModelError(f"{directory}: manifest {what} {name!r} leads outside the model's directory (a symlink "
                         f"to {real}): copy the file into the directory instead")
    return path


def canonical(doc: Any) -> bytes:
    """The bytes a manifest signature covers: its JSON with keys sorted, no spaces, UTF-8."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def manifest_text(doc: Any) -> str:
    """A manifest as written to disk: indented JSON, each list of numbers on one line (golden rows)."""
    import re

    text = json.dumps(doc, indent=2, ensure_ascii=True)
    return re.sub(r"\[\s+([-0-9.eE+,\s]+?)\s+\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def signed_message(doc: Any) -> bytes:
    return _SIGNED_PREFIX + canonical(doc)


def signature_path(manifest_path: Path) -> Path:
    return manifest_path.with_name(manifest_path.name + SIGNATURE_SUFFIX)


def sign_manifest(manifest_path: Path, private: Any) -> Path:
    """Write `manifest.json.sig` beside `manifest_path` with an Ed25519 private key (cryptography)."""
    import base64

    doc = json.loads(manifest_path.read_text(encoding="utf-8"))
    sig = signature_path(manifest_path)
    sig.write_text("ed25519:" + base64.b64encode(private.sign(signed_message(doc))).decode() + "\n")
    return sig


def check_signature(manifest_path: Path, doc: Any, public: Any, sig_text: str | None = None) -> None:
    """ModelError unless the manifest `doc` is signed by `public` (an Ed25519PublicKey); `sig_text` is read
    from the signature file beside `manifest_path` when not given."""
    from customs_edge.core.signing import verify

    if sig_text is None:
        try:
            sig_text = signature_path(manifest_path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelError(f"{manifest_path}: unsigned: this unit accepts only models signed with its model-"
                             "signing key (sign with `customs-edge fleet model sign DIR --key FILE`)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"{signature_path(manifest_path)}: unreadable signature ({exc})") from exc
    text = sig_text.strip()
    if not text.startswith("ed25519:") or not verify(public, text[len("ed25519:"):], signed_message(doc)):
        raise ModelError(f"{manifest_path}: signature does not verify with this unit's model-signing key: the "
                         "manifest was changed after signing, or signed with another key")


def _same_shape(declared: list[int | None], actual: list[Any]) -> bool:
    if len(declared) != len(actual):
        return False
    return all(d is None or not isinstance(a, int) or d == a for d, a in zip(declared, actual, strict=True))


ONNX_TYPES = {"float32": "tensor(float)", "float64": "tensor(double)", "float16": "tensor(float16)",
              "int64": "tensor(int64)", "int32": "tensor(int32)", "uint8": "tensor(uint8)", "int8": "tensor(int8)",
              "bool": "tensor(bool)"}


class OnnxModel:
    """onnxruntime session on one thread (the agent shares two cores with the drivers)."""

    def __init__(self, manifest_path: str | Path, *, threads: int = 1, public_key: Any = None) -> None:
        manifest_path = Path(manifest_path)
        self.path = manifest_path
        try:
            doc = json.loads(manifest_path.read_text())
            self.manifest = Manifest.model_validate(doc)
            self._dtypes = {t.name: np.dtype(t.dtype) for t in self.manifest.inputs}
        except (OSError, ValueError, TypeError, RecursionError, ValidationError) as exc:
            raise ModelError(f"{manifest_path}: bad manifest: {str(exc)[:300]}") from exc
        if public_key is not None:
            check_signature(manifest_path, doc, public_key)
        directory = manifest_path.parent
        files = {name: inside(directory, name, "file" if name == self.manifest.file else "external_data file")
                 for name in self.manifest.files()}
        if self.manifest.external_data:  # then nothing in the directory may be left unhashed
            allowed = {manifest_path.name, signature_path(manifest_path).name, *(str(Path(n)) for n in files)}
            stray = sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                           if p.is_file() and "__pycache__" not in p.parts
                           and str(p.relative_to(directory)) not in allowed)
            if stray:
                raise ModelError(f"{directory}: {', '.join(stray[:5])} not named in the manifest: the model could "
                                 "load an unhashed file; list it under external_data with its sha256, or remove it")
        blob = b""
        for name, path in files.items():
            if not path.is_file():
                raise ModelError(f"{path}: model file missing")
            if name == self.manifest.file and not self.manifest.external_data:
                blob = path.read_bytes()  # hashed and loaded from the same bytes
                digest = hashlib.sha256(blob).hexdigest()
            else:
                digest = sha256_file(path)
            want = self.manifest.files()[name]
            if digest != want:
                raise ModelError(f"{path}: sha256 {digest[:12]}... does not match manifest {want[:12]}...")
        path = files[self.manifest.file]
        import onnxruntime as ort  # 35 MiB: only units that run a model pay for it

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # no arena: a run's activations are freed back to malloc instead of kept in onnxruntime's own pool (the
        # handheld's two classifiers: ~12 MB, returned to the kernel with agent/memory.py's thresholds)
        opts.enable_cpu_mem_arena = False
        try:
            # from bytes, onnxruntime loads no external file at all: only a manifest that lists (and so hashes)
            # its external data files has the model loaded from its path
            self.session = ort.InferenceSession(blob or str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"{path}: onnxruntime refused the model: {exc}") from exc
        self._check(self.session.get_inputs(), self.manifest.inputs, "input")
        self._check(self.session.get_outputs(), self.manifest.outputs, "output")
        for spec in self.session.get_inputs():
            dtype = ONNX_TYPES.get(self._dtypes[spec.name].name)
            if spec.type != dtype:
                raise ModelError(f"{self.manifest.name}: input {spec.name!r} is {spec.type}, manifest says "
                                 f"{self._dtypes[spec.name].name}")

    def _check(self, actual: list[Any], declared: list[TensorSpec], what: str) -> None:
        got = {a.name: a.shape for a in actual}
        want = {d.name: d.shape for d in declared}
        if set(got) != set(want):
            raise ModelError(f"{self.manifest.name}: {what} names {sorted(got)} != manifest {sorted(want)}")
        for name, shape in want.items():
            if not _same_shape(shape, list(got[name])):
                raise ModelError(f"{self.manifest.name}: {what} {name!r} shape {got[name]} != manifest {shape}")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {k: np.asarray(v, dtype=self._dtypes[k]) for k, v in inputs.items()}
        names = [o.name for o in self.manifest.outputs]
        return dict(zip(names, self.session.run(names, feed), strict=True))

    def self_test(self) -> float:
        """Run the manifest's golden set; its accuracy, or ModelError when below `min_accuracy`, when an output
        has the wrong shape, or when the manifest has no golden set."""
        g, m = self.manifest.golden, self.manifest
        if g is None:
            raise ModelError(f"{m.name} {m.version}: the manifest has no golden set: rebuild it with the training "
                             "script (`make models`), which writes one")
        try:
            inputs: dict[str, Any] = dict(g.inputs)
            expected: dict[str, Any] = dict(g.expected)
            if g.file:  # hashed with the model's files when it was loaded
                with np.load(inside(self.path.parent, g.file, "golden file"), allow_pickle=False) as z:
                    for key in z.files:
                        kind, _, name = key.partition("/")
                        (inputs if kind == "input" else expected)[name] = z[key]
            feed = {k: np.asarray(v, dtype=self._dtypes[k]) for k, v in inputs.items()}
            if set(feed) != set(self._dtypes):
                raise ValueError(f"golden inputs {sorted(feed)} != model inputs {sorted(self._dtypes)}")
            got = self.predict(feed)
            rows = None
            ok: np.ndarray | None = None
            for name, want_list in expected.items():
                want = np.asarray(want_list, dtype=np.float64)
                have = np.asarray(got[name], dtype=np.float64)
                if g.match == "argmax":
                    if have.ndim != 2 or len(have) != len(want):
                        raise ValueError(f"output {name!r} has shape {list(have.shape)}, the golden set expects "
                                         f"[{len(want)}, classes]")
                    row_ok: np.ndarray = np.asarray(have.argmax(axis=1) == want)
                    ok = row_ok if ok is None else ok & row_ok
                    rows = len(want)
                    continue
                if have.shape != want.shape:
                    raise ValueError(f"output {name!r} has shape {list(have.shape)}, the golden set expects "
                                     f"{list(want.shape)}")
                within = np.abs(have - want).reshape(len(want), -1) <= g.tolerance[name]
                row_ok = np.asarray(within.all(axis=1))
                ok = row_ok if ok is None else ok & row_ok
                rows = len(want)
        except (KeyError, ValueError, TypeError, OSError) as exc:
            raise ModelError(f"{m.name} {m.version}: golden set cannot be run: {exc}") from exc
        if ok is None or not rows:
            raise ModelError(f"{m.name} {m.version}: the golden set is empty")
        accuracy = float(ok.mean())
        if accuracy < g.min_accuracy:
            raise ModelError(f"{m.name} {m.version}: golden set accuracy {accuracy:.3f} ({int(ok.sum())} of {rows} "
                             f"rows within tolerance) is below the manifest's minimum {g.min_accuracy:.3f}")
        return accuracy
