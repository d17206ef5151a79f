"""Model updates over the command topic (`customs-edge fleet model push|rollback`), on the unit.

Delivery is MQTT: chunks on the unit's cmd topic, each a Command (core/wire.py), answered on cmd/reply
(docs/model-updates.md argues it against HTTP from the hub and bench/fleet.py measures it):
  model_offer    {name, version, manifest: its text, sig: the signature file's text or null, chunk_bytes,
                 files: {file: {size, chunks: [sha256 of each chunk]}}}. Checked at once (a safe manifest
                 naming exactly these files, a model the app loads, sizes within models.max_mb, chunks of at
                 most MODEL_CHUNK_BYTES, the signature when the unit has a model-signing key); the staging
                 directory `.staging/NAME@VERSION/` is made or kept, and the answer names the chunks still
                 missing: a staged chunk counts only if its sha256 matches, so a transfer cut by a lost link,
                 a stopped CLI or a power cut resumes with what is missing.
  model_chunk    {transfer: "NAME@VERSION", file, index, data: base64}: checked against its offered sha256 and
                 written at its offset; the answer ({have, of}) is the progress event.
  model_install  {transfer}: queued for run_forever (it replaces the app), which answers with progress
                 events ({stage}) and then an outcome: every chunk present, each file's sha256 as the
                 manifest says (fsynced), the signature, then the staging directory renamed to NAME/VERSION
                 and self-tested there (OnnxModel: the hashes, the declared input and output names, shapes
                 and types, the golden set at its minimum accuracy); then `previous` <- the running version,
                 `current` <- VERSION (atomic pointer files), and the app rebuilt with the new model from the
                 running app's snapshot. "applied"; "refused" with the reason (the running model was never
                 touched); "rolled_back" when the new app did not start (the pointers restored, the old app
                 running again).
  model_rollback {name}: `current` and `previous` swapped, the app rebuilt: the previous version runs again.
A half file is never loaded: only a complete, hashed version directory is ever named by `current`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import os
import queue
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from customs_edge.agent.commands import fsync_dir, write_synced
from customs_edge.agent.config import UnitConfig
from customs_edge.agent.health import model_versions
from customs_edge.agent.model_store import STAGING, app_models, read_pointer, store_dir, version_manifest, write_pointer
from customs_edge.agent.runtime import Unit, replace_unit
from customs_edge.core.errors import ModelError
from customs_edge.core.signing import parse_public
from customs_edge.core.wire import MODEL_CHUNK_BYTES, Command, CommandReply
from customs_edge.models.runtime import NAME_PATTERN, Manifest, OnnxModel, check_signature, inside, signature_path

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 1 << 20
MAX_CHUNKS = 65536
OFFER = "offer.json"


class _Refused(Exception):
    """A model update step failed: the reason goes into the reply; the running model stays."""


class _Transfer:
    def __init__(self, staging: Path, offer: dict[str, Any]) -> None:
        self.staging, self.offer = staging, offer
        self.chunk_bytes: int = offer["chunk_bytes"]
        self.files: dict[str, dict[str, Any]] = offer["files"]
        self.have: set[tuple[str, int]] = set()

    @property
    def total(self) -> int:
        return sum(len(f["chunks"]) for f in self.files.values())

    def size(self, file: str, index: int) -> int:
        return min(self.chunk_bytes, self.files[file]["size"] - index * self.chunk_bytes)

    def scan(self) -> None:
        """Which chunks the staged files already hold (a chunk counts only if its sha256 matches)."""
        self.have = set()
        for file, spec in self.files.items():
            path = self.staging / file
            if not path.exists():
                continue
            with path.open("rb") as f:
                for i, want in enumerate(spec["chunks"]):
                    if hashlib.sha256(f.read(self.size(file, i))).hexdigest() == want:
                        self.have.add((file, i))

    def missing(self) -> dict[str, list[int]]:
        return {file: [i for i in range(len(spec["chunks"])) if (file, i) not in self.have]
                for file, spec in self.files.items()}


class ModelUpdates:
    """The unit's side of model pushes. `command` runs on the sync thread (offer, chunk; install and rollback
    are queued on `installs`), `apply` on run_forever's (it replaces the app)."""

    def __init__(self, cfg: Callable[[], UnitConfig], installs: queue.Queue[Command]) -> None:
        self.cfg = cfg
        self.installs = installs
        self.lock = threading.Lock()
        self.transfers: dict[str, _Transfer] = {}

    # -- the sync thread's hook -----------------------------------------------------------------
    def command(self, cmd: Command) -> dict[str, Any] | None:
        if cmd.cmd == "model_offer":
            return self.offer(cmd.args)
        if cmd.cmd == "model_chunk":
            return self.chunk(cmd.args)
        if cmd.cmd in ("model_install", "model_rollback"):
            self.installs.put(cmd)  # answered by run_forever
            return None
        raise ValueError(f"unsupported command {cmd.cmd!r}")

    def _public_key(self, cfg: UnitConfig) -> Any:
        if cfg.models.signing_key is None:
            return None
        try:
            return parse_public(cfg.models.signing_key.read_text(encoding="utf-8").strip())
        except (OSError, ValueError) as exc:
            raise ValueError(f"models.signing_key {cfg.models.signing_key}: cannot be read as ed25519:BASE64 "
                             f"({exc}): write the key `customs-edge fleet model keygen` printed") from exc

    def offer(self, args: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg()
        name, version = str(args.get("name", "")), str(args.get("version", ""))
        if not re.match(NAME_PATTERN, name) or not re.match(NAME_PATTERN, version):
            raise ValueError(f"model_offer: name {name[:64]!r} and version {version[:64]!r} must be letters, digits,"
                             " _ . - (at most 64)")
        text, sig, chunk_bytes, files = args.get("manifest"), args.get("sig"), args.get("chunk_bytes"), \
            args.get("files")
        if not isinstance(text, str) or len(text.encode()) > MAX_MANIFEST_BYTES:
            raise ValueError(f"model_offer: args.manifest must be the manifest's text, at most {MAX_MANIFEST_BYTES} "
                             "bytes")
        if sig is not None and (not isinstance(sig, str) or len(sig) > 1024):
            raise ValueError("model_offer: args.sig must be the signature file's text")
        if not isinstance(chunk_bytes, int) or not 0 < chunk_bytes <= MODEL_CHUNK_BYTES:
            raise ValueError(f"model_offer: chunk_bytes {chunk_bytes!r} must be in 1..{MODEL_CHUNK_BYTES}")
        try:
            doc = json.loads(text)
            manifest = Manifest.model_validate(doc)
        except (ValueError, RecursionError, ValidationError) as exc:
            raise ValueError(f"model_offer: bad manifest: {str(exc)[:300]}") from exc
        if (manifest.name, manifest.version) != (name, version):
            raise ValueError(f"model_offer: the manifest is {manifest.name} {manifest.version}, not {name} {version}")
        loads = app_models(cfg)
        if name not in loads:
            raise ValueError(f"this unit's app ({cfg.type}) loads no model named {name!r} (it loads: "
                             f"{', '.join(sorted(loads)) or 'none'}): push it to units of another type")
        store = store_dir(cfg)
        staging = store / STAGING / f"{name}@{version}"
        for file in manifest.files():
            try:
                inside(staging, file, "file")
            except ModelError as exc:
                raise ValueError(str(exc).replace(str(staging), f"{name} {version}")) from None
        if not isinstance(files, dict) or set(files) != set(manifest.files()):
            raise ValueError(f"model_offer: files must be exactly the manifest's {sorted(manifest.files())}")
        total = 0
        for file, spec in files.items():
            size, chunks = (spec.get("size"), spec.get("chunks")) if isinstance(spec, dict) else (None, None)
            if not isinstance(size, int) or size < 0 or not isinstance(chunks, list) \
                    or len(chunks) != max(1, math.ceil(size / chunk_bytes)) or len(chunks) > MAX_CHUNKS \
                    or not all(isinstance(c, str) and len(c) == 64 for c in chunks):
                raise ValueError(f"model_offer: files.{file}: needs size and one sha256 per chunk of {chunk_bytes} B")
            total += size
        if total > cfg.models.max_mb * 1e6:
            raise ValueError(f"model_offer: {total / 1e6:.1f} MB is over this unit's models.max_mb "
                             f"({cfg.models.max_mb:g}); raise it in the unit config")
        key = self._public_key(cfg)
        if key is not None:
            try:
                check_signature(Path(f"{name} {version} manifest.json"), doc, key, sig)
            except ModelError as exc:
                raise ValueError(str(exc)) from None
        if read_pointer(store, name, "current") == version:
            return {"transfer": f"{name}@{version}", "installed": True, "missing": {}, "chunks": 0}
        offer = {"name": name, "version": version, "chunk_bytes": chunk_bytes, "files": files,
                 "manifest_sha256": hashlib.sha256(text.encode()).hexdigest()}
        with self.lock:
            t = self._stage(staging, offer, text, sig)
        missing = t.missing()
        return {"transfer": f"{name}@{version}", "chunks": t.total, "have": len(t.have), "missing": missing,
                "bytes": total}

    def _stage(self, staging: Path, offer: dict[str, Any], text: str, sig: str | None) -> _Transfer:
        """The staging directory for `offer`: kept (and scanned for the chunks it holds) when it was made for
        the same offer, else made afresh."""
        try:
            same = json.loads((staging / OFFER).read_text()) == offer
        except (OSError, ValueError):
            same = False
        if not same:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
            for file, spec in offer["files"].items():
                path = staging / file
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("wb") as f:
                    f.truncate(spec["size"])
            (staging / "manifest.json").write_text(text, encoding="utf-8")
            if sig is not None:
                signature_path(staging / "manifest.json").write_text(sig, encoding="utf-8")
            write_synced(staging / OFFER, json.dumps(offer))
        t = self.transfers.get(staging.name)
        if t is None or t.offer != offer or not same:
            t = _Transfer(staging, offer)
            t.scan()
            self.transfers[staging.name] = t
        return t

    def _transfer(self, tid: str) -> _Transfer:
        t = self.transfers.get(tid)
        if t is not None:
            return t
        staging = store_dir(self.cfg()) / STAGING / tid
        try:
            offer = json.loads((staging / OFFER).read_text())
        except (OSError, ValueError):
            raise ValueError(f"no transfer {tid[:80]!r} on this unit: send model_offer first "
                             "(`customs-edge fleet model push` does)") from None
        t = _Transfer(staging, offer)
        t.scan()
        self.transfers[tid] = t
        return t

    def chunk(self, args: dict[str, Any]) -> dict[str, Any]:
        tid, file, index, data = args.get("transfer"), args.get("file"), args.get("index"), args.get("data")
        if not isinstance(tid, str) or not isinstance(file, str) or not isinstance(index, int) \
                or not isinstance(data, str):
            raise ValueError("model_chunk needs transfer, file, index and data (base64)")
        if len(data) > (MODEL_CHUNK_BYTES * 4) // 3 + 8:
            raise ValueError(f"model_chunk: data over {MODEL_CHUNK_BYTES} bytes")
        with self.lock:
            t = self._transfer(tid)
            spec = t.files.get(file)
            if spec is None or not 0 <= index < len(spec["chunks"]):
                raise ValueError(f"model_chunk: {tid} has no chunk {index} of {file!r}")
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValueError(f"model_chunk: data is not base64 ({exc})") from None
            if len(raw) != t.size(file, index) or hashlib.sha256(raw).hexdigest() != spec["chunks"][index]:
                raise ValueError(f"model_chunk: chunk {index} of {file} damaged in transit (size or sha256 differs "
                                 "from the offer); it is still missing and will be sent again")
            fd = os.open(t.staging / file, os.O_WRONLY)
            try:
                os.pwrite(fd, raw, index * t.chunk_bytes)
            finally:
                os.close(fd)
            t.have.add((file, index))
            return {"transfer": tid, "have": len(t.have), "of": t.total}

    # -- run_forever's side -----------------------------------------------------------------------
    def apply(self, unit: Unit, cmd: Command, stop: threading.Event) -> Unit:
        """Install or roll back (a queued command); returns the unit running afterwards, which answers."""
        outcome, result, error = "refused", None, None
        try:
            if cmd.cmd == "model_install":
                unit, outcome, result, error = self._install(unit, cmd)
            else:
                unit, outcome, result, error = self._rollback(unit, cmd)
        except _Refused as exc:
            error = str(exc)
        except Exception as exc:  # a full disk, a bug: answered, never the end of the agent
            log.exception("model update failed", extra={"id": cmd.id})
            error = f"{type(exc).__name__}: {exc}; the running model stays"
        log.log(logging.INFO if outcome == "applied" else logging.ERROR, "model %s %s", cmd.cmd, outcome,
                extra={"id": cmd.id, **({"error": error} if error else {})})
        unit.sync.reply(CommandReply(id=cmd.id, ok=outcome == "applied", outcome=outcome,
                                     result=result, error=error))
        return unit

    def _progress(self, unit: Unit, cmd: Command, stage: str, **more: Any) -> None:
        unit.sync.reply(CommandReply(id=cmd.id, ok=True, result={"stage": stage, **more}))

    def _install(self, unit: Unit, cmd: Command) -> tuple[Unit, str, dict[str, Any] | None, str | None]:
        cfg = unit.cfg
        tid = cmd.args.get("transfer")
        if not isinstance(tid, str):
            raise _Refused("model_install needs args.transfer (NAME@VERSION)")
        store = store_dir(cfg)
        with self.lock:
            try:
                t = self._transfer(tid)
            except ValueError as exc:
                raise _Refused(str(exc)) from None
            name, version = t.offer["name"], t.offer["version"]
            gone = t.total - len(t.have)
            if gone:
                raise _Refused(f"{tid}: incomplete: {gone} of {t.total} chunks missing; push it again to send them "
                               "(the transfer resumes); nothing was activated")
            doc = json.loads((t.staging / "manifest.json").read_text(encoding="utf-8"))
            manifest = Manifest.model_validate(doc)
            for file, want in manifest.files().items():
                path = t.staging / file
                with path.open("rb+") as f:
                    os.fsync(f.fileno())
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                if digest != want:
                    t.scan()
                    raise _Refused(f"{tid}: {file} sha256 {digest[:12]}... does not match the manifest's "
                                   f"{want[:12]}...: tampered or damaged; push it again")
            self._progress(unit, cmd, "verified", transfer=tid)
            target = store / name / version
            if target.exists():
                shutil.rmtree(target)
            (t.staging / OFFER).unlink()
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(t.staging, target)
            fsync_dir(target)
            fsync_dir(target.parent)
            self.transfers.pop(tid, None)
        try:
            model = OnnxModel(target / "manifest.json", public_key=self._public_key(cfg))
            accuracy = model.self_test()
        except (ModelError, ValueError) as exc:
            shutil.rmtree(target, ignore_errors=True)
            raise _Refused(f"self-test failed: {exc}; the running model stays") from None
        del model
        self._progress(unit, cmd, "self_tested", accuracy=accuracy)
        old = read_pointer(store, name, "current")
        unit, outcome, error = self._switch(unit, name, version, old)
        result = {"name": name, "version": version, "previous": old or None, "golden_accuracy": accuracy,
                  "models": model_versions(unit.app)}
        return unit, outcome, result, error

    def _switch(self, unit: Unit, name: str, version: str | None, old: str | None) -> tuple[Unit, str, str | None]:
        """Point `current` at `version` (None: the config's own model), rebuild the app; back to `old` if the
        new app does not start."""
        store = store_dir(unit.cfg)
        before = model_versions(unit.app).get(name)
        write_pointer(store, name, "previous", old or "")
        write_pointer(store, name, "current", version)
        errors: list[str] = []
        new = replace_unit(unit, unit.cfg, new_app=True, errors=errors)
        if new is not unit and (version is None or model_versions(new.app).get(name) == version):
            self._prune(store, name)
            return new, "applied", None
        write_pointer(store, name, "current", old or None)
        if new is not unit:  # started, but not with that version: back to the old one
            errors.append(f"the app runs {name} {model_versions(new.app).get(name)}, not {version}")
            new = replace_unit(new, new.cfg, new_app=True, errors=errors)
            return new, "rolled_back", f"the app did not take {name} {version}; the previous model runs again: " \
                + "; ".join(errors)
        return unit, "rolled_back", (f"the app did not start with {name} {version or '(config)'}; {name} "
                                     f"{before} runs again: " + "; ".join(errors))

    def _prune(self, store: Path, name: str) -> None:
        """Keep the current and previous versions of `name`; other versions and old transfers of it go."""
        keep = {read_pointer(store, name, "current"), read_pointer(store, name, "previous")}
        try:
            for d in (store / name).iterdir():
                if d.is_dir() and d.name not in keep:
                    shutil.rmtree(d, ignore_errors=True)
            with self.lock:
                for d in (store / STAGING).glob(f"{name}@*"):
                    self.transfers.pop(d.name, None)
                    shutil.rmtree(d, ignore_errors=True)
        except OSError as exc:
            log.warning("old model versions not removed", extra={"model": name, "error": str(exc)})

    def _rollback(self, unit: Unit, cmd: Command) -> tuple[Unit, str, dict[str, Any] | None, str | None]:
        name = cmd.args.get("name")
        store = store_dir(unit.cfg)
        if not isinstance(name, str) or name not in app_models(unit.cfg):
            raise _Refused(f"model_rollback: this unit's app loads no model named {str(name)[:64]!r} (it loads: "
                           f"{', '.join(sorted(app_models(unit.cfg))) or 'none'})")
        previous = read_pointer(store, name, "previous")
        current = read_pointer(store, name, "current")
        if previous is None or previous == current:
            raise _Refused(f"{name}: no previous version to return to on this unit")
        if previous and not version_manifest(store, name, previous).exists():
            raise _Refused(f"{name}: the previous version {previous} is no longer on this unit")
        unit, outcome, error = self._switch(unit, name, previous or None, current)
        return unit, outcome, {"name": name, "version": model_versions(unit.app).get(name),
                               "previous": current or None}, error
