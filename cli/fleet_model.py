"""`customs-edge fleet model push|rollback|sign|keygen`: model versions delivered to units over the broker.

push NAME DIR --to DEVICE... | --type TYPE: one operator link; per unit a model_offer (the manifest, its
signature, per-chunk sha256), the chunks the unit says it is missing (at most WINDOW in flight per unit), then
model_install, whose progress events and outcome come back on the unit's reply topic (agent/model_update.py).
--type picks the units whose retained health message (`{prefix}/+/health`) names that type. A progress bar
goes to stderr; one line per unit to stdout; exit 0 only if every unit applied it (or already ran it).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from customs_edge.core.errors import CustomsEdgeError, ModelError
from customs_edge.core.mqtt import Message, MqttLink, NotConnected
from customs_edge.core.wire import MODEL_CHUNK_BYTES, Command, CommandReply, Health, topic
from customs_edge.models.runtime import Manifest, inside, signature_path

WINDOW = 4  # chunks in flight per unit
CHUNK_RETRIES = 3


@dataclass
class ModelPackage:
    """A model version read from its directory, cut into chunks."""

    name: str
    version: str
    manifest_text: str
    sig: str | None
    chunk_bytes: int
    data: dict[str, bytes]

    @classmethod
    def read(cls, directory: Path, chunk_bytes: int = MODEL_CHUNK_BYTES) -> ModelPackage:
        path = directory / "manifest.json"
        try:
            text = path.read_text(encoding="utf-8")
            manifest = Manifest.model_validate(json.loads(text))
        except (OSError, ValueError, ValidationError) as exc:
            raise CustomsEdgeError(f"{path}: not a model manifest ({str(exc)[:300]})") from exc
        try:
            data = {name: inside(directory, name).read_bytes() for name in manifest.files()}
        except (ModelError, OSError) as exc:
            raise CustomsEdgeError(str(exc)) from exc
        sig_path = signature_path(path)
        sig = sig_path.read_text(encoding="utf-8") if sig_path.exists() else None
        return cls(manifest.name, manifest.version, text, sig, chunk_bytes, data)

    @property
    def transfer(self) -> str:
        return f"{self.name}@{self.version}"

    def chunk(self, file: str, index: int) -> bytes:
        return self.data[file][index * self.chunk_bytes:(index + 1) * self.chunk_bytes]

    def offer(self) -> dict[str, Any]:
        files = {}
        for name, blob in self.data.items():
            n = max(1, math.ceil(len(blob) / self.chunk_bytes))
            files[name] = {"size": len(blob), "chunks": [hashlib.sha256(self.chunk(name, i)).hexdigest()
                                                         for i in range(n)]}
        return {"name": self.name, "version": self.version, "manifest": self.manifest_text, "sig": self.sig,
                "chunk_bytes": self.chunk_bytes, "files": files}

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.data.values())


@dataclass
class _Unit:
    device: str
    stage: str = "offer"  # offer, chunks, install, done
    todo: list[tuple[str, int]] = field(default_factory=list)
    inflight: dict[str, tuple[str, int]] = field(default_factory=dict)  # command id -> chunk
    retries: dict[tuple[str, int], int] = field(default_factory=dict)
    waiting: str | None = None  # the command id of the offer or install awaited
    sent_bytes: int = 0
    total_chunks: int = 0
    done_chunks: int = 0
    last_heard: float = 0.0
    outcome: str | None = None  # applied, installed, refused, rolled_back, error, no answer
    detail: str = ""


class Pusher:
    """Push one ModelPackage to several units over one link; `run()` returns the units' final states."""

    def __init__(self, link: MqttLink, prefix: str, devices: list[str], package: ModelPackage, *,
                 ttl: float = 300.0, timeout: float = 60.0,
                 progress: Callable[[Pusher], None] | None = None) -> None:
        self.link, self.prefix, self.package = link, prefix, package
        self.units = {d: _Unit(d) for d in devices}
        self.ttl, self.timeout, self.progress = ttl, timeout, progress
        self.by_id: dict[str, str] = {}  # command id -> device
        self.started = time.monotonic()

    def _send(self, u: _Unit, cmd: str, args: dict[str, Any]) -> str:
        now = time.time()
        c = Command(id=uuid.uuid4().hex, cmd=cmd, args=args, ts=now, expires=now + self.ttl)
        self.link.publish(topic(self.prefix, u.device, "cmd"), c.model_dump_json(), qos=1)
        self.by_id[c.id] = u.device
        return c.id

    def _pump(self, u: _Unit) -> None:
        if u.stage == "offer" and u.waiting is None:
            u.waiting = self._send(u, "model_offer", self.package.offer())
            u.last_heard = time.monotonic()
        elif u.stage == "chunks":
            while u.todo and len(u.inflight) < WINDOW:
                file, i = u.todo.pop(0)
                blob = self.package.chunk(file, i)
                cid = self._send(u, "model_chunk", {"transfer": self.package.transfer, "file": file, "index": i,
                                                    "data": base64.b64encode(blob).decode()})
                u.inflight[cid] = (file, i)
                u.sent_bytes += len(blob)
            if not u.todo and not u.inflight:
                u.stage = "install"
                u.waiting = self._send(u, "model_install", {"transfer": self.package.transfer})
                u.last_heard = time.monotonic()

    def _on_reply(self, u: _Unit, r: CommandReply) -> None:
        u.last_heard = time.monotonic()
        if r.id in u.inflight:
            chunk = u.inflight.pop(r.id)
            if r.ok:
                u.done_chunks += 1
            elif u.retries.get(chunk, 0) < CHUNK_RETRIES:
                u.retries[chunk] = u.retries.get(chunk, 0) + 1
                u.todo.append(chunk)
            else:
                self._finish(u, "error", f"chunk {chunk[1]} of {chunk[0]}: {r.error}")
            return
        if r.id != u.waiting:
            return
        if u.stage == "offer":
            if not r.ok or r.result is None:
                self._finish(u, "refused", r.error or "offer refused")
            elif r.result.get("installed"):
                self._finish(u, "installed", f"already runs {self.package.transfer}")
            else:
                missing = r.result.get("missing", {})
                u.todo = [(f, i) for f, idx in missing.items() for i in idx]
                u.total_chunks = int(r.result.get("chunks", len(u.todo)))
                u.done_chunks = u.total_chunks - len(u.todo)
                u.stage, u.waiting = "chunks", None
        elif u.stage == "install":
            if r.outcome is None and r.ok:  # a progress event
                u.detail = str((r.result or {}).get("stage", ""))
                return
            self._finish(u, r.outcome or ("applied" if r.ok else "refused"),
                         r.error or json.dumps(r.result, separators=(",", ":")))

    def _finish(self, u: _Unit, outcome: str, detail: str) -> None:
        u.stage, u.outcome, u.detail, u.waiting = "done", outcome, detail, None
        u.inflight.clear()

    def run(self, deadline_s: float | None = None) -> dict[str, _Unit]:
        subscribed = False
        hard = time.monotonic() + (deadline_s or 1e9)
        next_draw = 0.0
        while any(u.stage != "done" for u in self.units.values()) and time.monotonic() < hard:
            for ev in self.link.step(0.05):
                if isinstance(ev, Message) and ev.topic.endswith("/cmd/reply"):
                    try:
                        reply = CommandReply.model_validate_json(ev.payload)
                    except ValidationError:
                        continue
                    device = self.by_id.get(reply.id or "")
                    if device is not None:
                        self._on_reply(self.units[device], reply)
            if not self.link.connected:
                continue
            try:
                if not subscribed:
                    for d in self.units:
                        self.link.subscribe(topic(self.prefix, d, "cmd/reply"), 1)
                    subscribed = True
                for u in self.units.values():
                    if u.stage != "done":
                        self._pump(u)
            except NotConnected:
                continue
            now = time.monotonic()
            for u in self.units.values():
                if u.stage != "done" and now - u.last_heard > self.timeout and u.last_heard:
                    self._finish(u, "no answer", f"nothing heard for {self.timeout:g} s at {u.stage}: is it online "
                                 "(`customs-edge hub fleet`)? Push again later: the transfer resumes")
            if self.progress and now >= next_draw:
                next_draw = now + 0.2
                self.progress(self)
        for u in self.units.values():
            if u.stage != "done":
                self._finish(u, "no answer", f"no outcome before the deadline (at {u.stage})")
        if self.progress:
            self.progress(self)
        return self.units


def bar(p: Pusher, width: int = 30) -> str:
    total = sum(u.total_chunks for u in p.units.values()) or 1
    done = sum(u.done_chunks for u in p.units.values())
    sent = sum(u.sent_bytes for u in p.units.values())
    dt = max(1e-6, time.monotonic() - p.started)
    fill = int(width * done / total)
    finished = sum(u.stage == "done" for u in p.units.values())
    return (f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} chunks  {sent / 1e6:.1f} MB  "
            f"{sent / 1e6 / dt:.2f} MB/s  units done {finished}/{len(p.units)}")


def devices_of_type(args: argparse.Namespace, device_type: str, wait_s: float = 2.0) -> list[str]:
    """Units whose retained health message names `device_type`."""
    from customs_edge.cli.fleet import operator_link

    link = operator_link(args, f"ce-op-{uuid.uuid4().hex[:12]}")
    found: dict[str, str | None] = {}
    try:
        deadline, quiet_until = time.monotonic() + args.timeout, 0.0
        while time.monotonic() < deadline and (not quiet_until or time.monotonic() < quiet_until):
            for ev in link.step(0.1):
                if isinstance(ev, Message) and ev.topic.endswith("/health"):
                    try:
                        h = Health.model_validate_json(ev.payload)
                    except ValidationError:
                        continue
                    found[h.device_id] = h.device_type
            if link.connected and not quiet_until:
                link.subscribe(f"{args.prefix}/+/health", 1)
                quiet_until = time.monotonic() + wait_s  # retained messages arrive at once
    finally:
        link.close()
    return sorted(d for d, t in found.items() if t == device_type)


def cmd_model(args: argparse.Namespace) -> int:
    if args.action == "keygen":
        return _keygen(Path(args.key))
    if args.action == "sign":
        return _sign(Path(args.dir), Path(args.key))
    if args.action == "rollback":
        from customs_edge.cli.fleet import send_command

        reply = send_command(args, "model_rollback", {"name": args.name})
        print(f"{reply.outcome or 'error'}: {args.device} {args.name}"
              + (f" now {reply.result.get('version')}" if reply.result else ""))
        if reply.error:
            print(reply.error)
        return 0 if reply.outcome == "applied" else 1
    return _push(args)


def _push(args: argparse.Namespace) -> int:
    from customs_edge.cli.fleet import operator_link

    package = ModelPackage.read(Path(args.dir), args.chunk_kb * 1024)
    if package.name != args.name:
        raise CustomsEdgeError(f"{args.dir}: the manifest is model {package.name!r}, not {args.name!r}")
    devices = list(args.to or []) or devices_of_type(args, args.type)
    if not devices:
        raise CustomsEdgeError(f"no unit of type {args.type!r} has reported its health on this broker")
    if package.sig is None:
        print(f"warning: {args.dir} is unsigned: units with a model-signing key refuse it "
              "(`customs-edge fleet model sign DIR --key FILE`)", file=sys.stderr)
    link = operator_link(args, f"ce-op-{uuid.uuid4().hex[:12]}")
    show = sys.stderr.isatty() or args.progress
    try:
        units = Pusher(link, args.prefix, devices, package, ttl=args.ttl, timeout=args.timeout,
                       progress=(lambda p: print(bar(p), end="", file=sys.stderr, flush=True)) if show else None).run()
    finally:
        link.close()
    if show:
        print(file=sys.stderr)
    for u in units.values():
        print(f"{u.outcome}: {u.device} {package.transfer}: {u.detail}")
    return 0 if all(u.outcome in ("applied", "installed") for u in units.values()) else 1


def _keygen(path: Path) -> int:
    from customs_edge.core.signing import DeviceKey

    if path.exists():
        raise CustomsEdgeError(f"{path} exists: a signing key is never overwritten; choose another file")
    key = DeviceKey.load_or_create(path)
    print(key.public)
    print(f"private key written to {path} (0600); put the line above in each unit's models.signing_key file",
          file=sys.stderr)
    return 0


def _sign(directory: Path, key_path: Path) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from customs_edge.models.runtime import sign_manifest

    ModelPackage.read(directory)  # a manifest whose files are inside the directory
    private = serialization.load_pem_private_key(key_path.read_bytes(), None)
    if not isinstance(private, Ed25519PrivateKey):
        raise CustomsEdgeError(f"{key_path}: not an Ed25519 private key (make one with `fleet model keygen`)")
    print(f"signed: {sign_manifest(directory / 'manifest.json', private)}")
    return 0


def register_model(fsub: Any) -> None:
    from customs_edge.cli.fleet import _connection_flags

    m = fsub.add_parser("model", help="push a signed model version to units, roll it back, sign one")
    msub = m.add_subparsers(dest="action", required=True, metavar="ACTION")
    push = msub.add_parser("push", help="deliver a model version (DIR with manifest.json) to units and activate it "
                                        "after its self-test")
    push.add_argument("name", help="the model's name (its manifest's `name`)")
    push.add_argument("dir", help="directory holding manifest.json, its .sig and the files it names")
    to = push.add_mutually_exclusive_group(required=True)
    to.add_argument("--to", action="append", metavar="DEVICE", help="a unit's device_id (repeat for several)")
    to.add_argument("--type", help="every unit of this type (from their retained health messages)")
    push.add_argument("--chunk-kb", type=int, default=MODEL_CHUNK_BYTES // 1024, choices=range(1, 257),
                      metavar="KB", help=f"chunk size in KiB (default and most {MODEL_CHUNK_BYTES // 1024})")
    push.add_argument("--progress", action="store_true", help="draw the progress bar even when stderr is no tty")
    _connection_flags(push, 60.0, device=False)
    rb = msub.add_parser("rollback", help="return a unit to the version it ran before")
    _connection_flags(rb, 60.0)
    rb.add_argument("name", help="the model's name")
    sign = msub.add_parser("sign", help="sign DIR/manifest.json (writes manifest.json.sig)")
    sign.add_argument("dir", help="directory holding manifest.json and the files it names")
    sign.add_argument("--key", required=True, help="the Ed25519 private key (PEM) from `fleet model keygen`")
    kg = msub.add_parser("keygen", help="make a model-signing key; prints the public key for units' models.signing_key")
    kg.add_argument("key", help="file for the private key (0600, never overwritten)")
    m.set_defaults(fn=cmd_model)
