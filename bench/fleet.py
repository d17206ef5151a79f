"""Fleet operations over one mosquitto on loopback: a config push to N units, a model transfer beside a raw
copy of the same bytes, and health telemetry's CPU cost.

    python bench/fleet.py --json [--units 100] [--model-mb 8]

units: N lightweight units in this process, each its own MQTT session and its own SQLite outbox, running the
unit's real command path: agent/sync.py (command parsing, replay and expiry checks, the seen-ids file written
and fsynced, the reply) and agent/remote_config.py's check and staging (the pushed YAML checked against its
sha256, validated by the code `config validate` runs, written with fsync and renamed, the last-good copy and
the probation marker written). What is left out is the unit's own restart (replace_unit and the drivers'
probation), which does not depend on the fleet's size. One operator link publishes N config_push commands
and the clock stops when the N-th "applied" reply has arrived.

model: `fleet model push`'s Pusher (cli/fleet_model.py) sends a model of --model-mb (the shipped fever
manifest with one external_data file of random bytes) to one unit running agent/model_update.py's offer and
chunk handling (each 256 KiB chunk base64 in a JSON command, checked against its sha256, written at its
offset; one reply per chunk, 4 chunks in flight). Install is not part of the transfer figure. Baseline, same
broker, same run: the same bytes published as raw 256 KiB QoS 1 messages to a plain subscriber that writes
them to a file.

health: bench/health.py's figure (one health message's CPU time, at the default 60 s interval).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from bench.health import run as health_run
from customs_edge.agent.config import parse_unit_config
from customs_edge.agent.model_update import ModelUpdates
from customs_edge.agent.outbox import SqliteOutbox
from customs_edge.agent.remote_config import RemoteConfig, sha256_text
from customs_edge.agent.sync import Sync
from customs_edge.cli.fleet_model import ModelPackage, Pusher
from customs_edge.core.mqtt import Message, MqttLink
from customs_edge.core.wire import MODEL_CHUNK_BYTES, Command, CommandReply, topic
from customs_edge.hub.brokers import Mosquitto
from customs_edge.models import default_manifest
from customs_edge.models.runtime import manifest_text, sha256_file

PREFIX = "customs-edge/v1"


class LightUnit:
    """A unit's command path without drivers or app: Sync + RemoteConfig's check and staging, or
    ModelUpdates' offer and chunks."""

    def __init__(self, tmp: Path, device: str, port: int, unit_type: str = "scale") -> None:
        d = tmp / device
        d.mkdir(parents=True)
        self.doc: dict[str, Any] = {"device_id": device, "type": unit_type, "outbox": {"path": str(d / "outbox.db")},
                                    "sync": {"port": port, "backoff_min_s": 0.2, "backoff_max_s": 1}}
        self.doc["drivers"] = {"scale": {"driver": "toledo-continuous", "port": "/dev/null"}} if unit_type == "scale" \
            else {"thermal": {"driver": "mlx90640-serial", "port": "/dev/null"}}
        self.path = d / "unit.yaml"
        self.path.write_text(yaml.safe_dump(self.doc))
        self.cfg = parse_unit_config(self.doc)
        self.remote = RemoteConfig(self.path)
        self.models = ModelUpdates(lambda: self.cfg, __import__("queue").Queue())
        self.outbox = SqliteOutbox(self.cfg.outbox.path, device_id=device)
        self.sync = Sync(device, self.outbox, self.cfg.sync, outbox_path=self.cfg.outbox.path, commands=self.command)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sync.run, args=(self.stop,), daemon=True)

    def command(self, cmd: Command) -> dict[str, Any] | None:
        if cmd.cmd == "config_push":
            cfg, text = self.remote._check(self.cfg, cmd)
            self.remote._stage(cmd)
            Path(f"{self.path}.pending").unlink()
            self.remote.text, self.cfg = text, cfg
            self.sync.reply(CommandReply(id=cmd.id, ok=True, outcome="applied", result={"sha256": sha256_text(text)}))
            return None
        if cmd.cmd == "model_install":  # the transfer is what is measured here
            self.sync.reply(CommandReply(id=cmd.id, ok=True, outcome="applied", result={"transfer_only": True}))
            return None
        return self.models.command(cmd)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.outbox.close()


def wait_online(units: list[LightUnit], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(u.sync.link.connected for u in units):
        if time.monotonic() > deadline:
            raise TimeoutError("units did not connect")
        time.sleep(0.05)


def config_push(tmp: Path, port: int, n: int) -> dict[str, Any]:
    units = [LightUnit(tmp, f"unit-{i:03d}", port) for i in range(n)]
    for u in units:
        u.thread.start()
    wait_online(units)
    time.sleep(0.5)  # their subscriptions are sent right after connecting
    link = MqttLink(f"ce-op-{uuid.uuid4().hex[:8]}", "127.0.0.1", port, clean_session=True)
    pending: dict[str, str] = {}
    outcomes: dict[str, str] = {}
    try:
        while not link.connected:
            link.step(0.1)
        link.subscribe(f"{PREFIX}/+/cmd/reply", 1)
        link.step(0.2)
        t0 = time.monotonic()
        for u in units:
            doc = {**u.doc, "health_interval_s": 30}
            text = yaml.safe_dump(doc)
            c = Command(id=uuid.uuid4().hex, cmd="config_push", ts=time.time(), expires=time.time() + 300,
                        args={"text": text, "sha256": hashlib.sha256(text.encode()).hexdigest()})
            link.publish(topic(PREFIX, u.cfg.device_id, "cmd"), c.model_dump_json(), qos=1)
            pending[c.id] = u.cfg.device_id
        deadline = t0 + 120
        while len(outcomes) < n and time.monotonic() < deadline:
            for ev in link.step(0.05):
                if isinstance(ev, Message) and ev.topic.endswith("/cmd/reply"):
                    r = CommandReply.model_validate_json(ev.payload)
                    if r.id in pending:
                        outcomes[pending[r.id]] = r.outcome or r.error or "?"
        elapsed = time.monotonic() - t0
    finally:
        link.close()
        for u in units:
            u.close()
    applied = sum(o == "applied" for o in outcomes.values())
    return {"units": n, "replies": len(outcomes), "applied": applied, "seconds": round(elapsed, 3),
            "per_unit_ms": round(1000 * elapsed / n, 2)}


def synthetic_model(tmp: Path, mb: float) -> Path:
    d = tmp / "bench-model"
    src = default_manifest("fever").parent
    d.mkdir()
    shutil.copy(src / "fever.onnx", d / "fever.onnx")
    (d / "weights.bin").write_bytes(os.urandom(int(mb * 1e6)))
    doc = json.loads((src / "manifest.json").read_text())
    doc["version"] = "9.9.9-bench"
    doc["external_data"] = [{"file": "weights.bin", "sha256": sha256_file(d / "weights.bin")}]
    (d / "manifest.json").write_text(manifest_text(doc))
    return d


def model_transfer(tmp: Path, port: int, mb: float) -> dict[str, Any]:
    unit = LightUnit(tmp, "gate-bench", port, "gate")
    unit.thread.start()
    wait_online([unit])
    time.sleep(0.3)
    package = ModelPackage.read(synthetic_model(tmp, mb), MODEL_CHUNK_BYTES)
    link = MqttLink(f"ce-op-{uuid.uuid4().hex[:8]}", "127.0.0.1", port, clean_session=True)
    try:
        t0 = time.monotonic()
        units = Pusher(link, PREFIX, ["gate-bench"], package, timeout=60).run(deadline_s=120)
        elapsed = time.monotonic() - t0
    finally:
        link.close()
        unit.close()
    u = units["gate-bench"]
    staged = tmp / "gate-bench" / "outbox.db.models" / ".staging" / package.transfer / "weights.bin"
    ok = u.outcome == "applied" and sha256_file(staged) == hashlib.sha256(package.data["weights.bin"]).hexdigest()
    return {"bytes": package.size, "chunks": u.total_chunks, "seconds": round(elapsed, 3),
            "mb_per_s": round(package.size / 1e6 / elapsed, 2), "verified": ok, "outcome": u.outcome}


def raw_copy(tmp: Path, port: int, data: bytes) -> dict[str, Any]:
    """The same bytes as raw QoS 1 chunks to a plain subscriber that writes them to a file."""
    out = (tmp / "raw-copy.bin").open("wb")
    got = [0]
    done = threading.Event()
    sub_ready = threading.Event()
    t_raw = f"bench/{uuid.uuid4().hex[:8]}/raw"

    def on_message(_c: Any, _u: Any, m: paho.MQTTMessage) -> None:
        out.write(m.payload)
        got[0] += len(m.payload)
        if got[0] >= len(data):
            out.flush()
            os.fsync(out.fileno())
            done.set()

    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-sub-{uuid.uuid4().hex[:6]}")
    sub.on_message = on_message
    sub.on_subscribe = lambda *_: sub_ready.set()
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    sub.subscribe(t_raw, 1)
    sub_ready.wait(10)
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-pub-{uuid.uuid4().hex[:6]}")
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    t0 = time.monotonic()
    for i in range(0, len(data), MODEL_CHUNK_BYTES):
        pub.publish(t_raw, data[i:i + MODEL_CHUNK_BYTES], qos=1)
    done.wait(120)
    elapsed = time.monotonic() - t0
    for c in (pub, sub):
        c.loop_stop()
        c.disconnect()
    out.close()
    return {"bytes": got[0], "seconds": round(elapsed, 3), "mb_per_s": round(len(data) / 1e6 / elapsed, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=100)
    ap.add_argument("--model-mb", type=float, default=8.0)
    ap.add_argument("--json", action="store_true", help="(the output is always JSON)")
    args = ap.parse_args()
    import logging

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        broker = Mosquitto(tmp / "broker").start()
        try:
            push = config_push(tmp / "push", broker.port, args.units)
            model = model_transfer(tmp / "model", broker.port, args.model_mb)
            data = (tmp / "model" / "bench-model" / "weights.bin").read_bytes()
            raw = raw_copy(tmp, broker.port, data)
        finally:
            broker.stop()
    health = health_run(2000, 10000)
    print(json.dumps({
        "config_push": push,
        "model_transfer": {**model, "raw_copy_same_broker": raw,
                           "ratio_to_raw": round(model["mb_per_s"] / raw["mb_per_s"], 3) if raw["mb_per_s"] else None},
        "health": {"sample_us": health["sample_us"], "cpu_pct_at_60s": health["cpu_pct_at_60s"],
                   "cpu_pct_at_1s": health["cpu_pct_at_1s"], "goal_cpu_pct": health["goal_cpu_pct"],
                   "baseline_us": health["baseline_us"], "source": "bench/health.py run(2000, 10000)"},
    }, indent=2))


if __name__ == "__main__":
    main()
