"""Model updates (agent/model_update.py, `customs-edge fleet model push|rollback`): a signed version delivered in
chunks is verified, self-tested and swapped in; tampered, truncated, unsigned, wrongly signed, wrong-shape and
accuracy-regressing versions are each refused with the reason while the running model stays; an interrupted
transfer resumes and never activates half a file; rollback; a push to a fleet of units over a real mosquitto,
shown by `hub fleet`. Manifests naming files outside their directory are refused by the loader itself.

The units here are gate units (their app loads the fever model) whose thermal port is closed: the app and its
model run, the driver keeps retrying, which a model update does not care about."""

from __future__ import annotations

import json
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from customs_edge.agent.config import parse_unit_config
from customs_edge.agent.health import model_versions
from customs_edge.agent.model_store import read_pointer, store_dir
from customs_edge.agent.model_update import ModelUpdates
from customs_edge.agent.runtime import Unit
from customs_edge.cli.fleet_model import ModelPackage
from customs_edge.core.errors import ModelError
from customs_edge.core.signing import public_text
from customs_edge.core.wire import Command, CommandReply
from customs_edge.models import default_manifest
from customs_edge.models.runtime import OnnxModel, manifest_text, sha256_file, sign_manifest

SHIPPED = default_manifest("fever").parent


def closed_port() -> str:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"socket://127.0.0.1:{port}"


def gate_dict(tmp: Path, device: str, broker_port: int, key: Path | None) -> dict[str, Any]:
    return {"device_id": device, "type": "gate",
            "drivers": {"thermal": {"driver": "mlx90640-serial", "port": closed_port()}},
            "outbox": {"path": str(tmp / device / "outbox.db")},
            "sync": {"port": broker_port, "keepalive_s": 4, "connect_timeout_s": 2, "backoff_min_s": 0.2,
                     "backoff_max_s": 1},
            "health_interval_s": 1, "models": {"signing_key": str(key)} if key else {}}


@pytest.fixture
def signer(tmp_path: Path) -> tuple[Ed25519PrivateKey, Path]:
    private = Ed25519PrivateKey.generate()
    pub = tmp_path / "model-signing.pub"
    pub.write_text(public_text(private.public_key()) + "\n")
    return private, pub


def make_version(tmp: Path, version: str, key: Ed25519PrivateKey | None,
                 change: Callable[[dict[str, Any], Path], None] | None = None, rehash: bool = True) -> Path:
    """A copy of the shipped fever model as `version`, changed by `change(manifest, dir)`, re-hashed and signed."""
    d = tmp / f"fever-{version}-{uuid.uuid4().hex[:6]}"
    shutil.copytree(SHIPPED, d, ignore=shutil.ignore_patterns("__pycache__", "*.sig"))
    doc = json.loads((d / "manifest.json").read_text())
    doc["version"] = version
    if change:
        change(doc, d)
    if rehash:
        doc["sha256"] = sha256_file(d / doc["file"])
    (d / "manifest.json").write_text(manifest_text(doc))
    if key is not None:
        sign_manifest(d / "manifest.json", key)
    return d


def biased(delta_c: float) -> Callable[[dict[str, Any], Path], None]:
    """The model's output bias moved by delta_c: it still loads and has the right shapes, but regresses."""
    def change(_doc: dict[str, Any], d: Path) -> None:
        import onnx
        from onnx import numpy_helper

        m = onnx.load(str(d / "fever.onnx"))
        for t in m.graph.initializer:
            if t.name == "b3":
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + np.float32(delta_c), "b3"))
        onnx.save(m, str(d / "fever.onnx"))
    return change


class Rig:
    """One gate unit in this process (no broker needed: replies are read from its sync's queue)."""

    def __init__(self, tmp: Path, key: Path | None) -> None:
        self.cfg = parse_unit_config(gate_dict(tmp, "gate-1", 1, key))
        self.unit = Unit(self.cfg)
        self.unit.start()
        self.stop = threading.Event()
        self.updates = ModelUpdates(lambda: self.unit.cfg, queue.Queue())

    def offer(self, package: ModelPackage) -> dict[str, Any]:
        result = self.updates.offer(package.offer())
        assert result is not None
        return result

    def send(self, package: ModelPackage, only: Callable[[str, int], bool] = lambda f, i: True,
             data: Callable[[str, int], bytes] | None = None) -> dict[str, Any]:
        """Offer, then send the missing chunks that `only` lets through; the offer's answer."""
        offered = self.offer(package)
        for file, idx in offered["missing"].items():
            for i in idx:
                if only(file, i):
                    blob = (data or package.chunk)(file, i)
                    import base64

                    self.updates.chunk({"transfer": package.transfer, "file": file, "index": i,
                                        "data": base64.b64encode(blob).decode()})
        return offered

    def command(self, cmd_name: str, **args: Any) -> CommandReply:
        cmd = Command(id=uuid.uuid4().hex, cmd=cmd_name, ts=time.time(), args=args)  # type: ignore[arg-type]
        self.unit = self.updates.apply(self.unit, cmd, self.stop)
        replies = [r for r in self.unit.sync._replies if r.id == cmd.id]
        assert replies and replies[-1].outcome is not None
        return replies[-1]

    def install(self, package: ModelPackage) -> CommandReply:
        return self.command("model_install", transfer=package.transfer)

    def running(self) -> str | None:
        return model_versions(self.unit.app).get("fever")

    def close(self) -> None:
        self.unit.stop()


@pytest.fixture
def rig(tmp_path: Path, signer: tuple[Ed25519PrivateKey, Path]) -> Iterator[Rig]:
    r = Rig(tmp_path, signer[1])
    try:
        yield r
    finally:
        r.close()


def package(d: Path, chunk_bytes: int = 512) -> ModelPackage:
    return ModelPackage.read(d, chunk_bytes)


def test_a_signed_version_is_installed_and_rolled_back(tmp_path: Path, rig: Rig, signer: Any) -> None:
    assert rig.running() == "1.0.0"
    p = package(make_version(tmp_path, "1.1.0", signer[0]))
    assert rig.send(p)["chunks"] == 5
    reply = rig.install(p)
    assert reply.outcome == "applied", reply.error
    assert rig.running() == "1.1.0" and reply.result and reply.result["golden_accuracy"] >= 0.85
    stages = [r.result["stage"] for r in rig.unit.sync._replies if r.outcome is None and r.result]
    assert stages == ["verified", "self_tested"]  # progress events on the reply topic
    store = store_dir(rig.unit.cfg)
    assert read_pointer(store, "fever", "current") == "1.1.0" and not (store / ".staging" / p.transfer).exists()
    # the unit reports the new version in its health
    assert rig.unit.health_sampler.sample().models == {"fever": "1.1.0"}
    # offered again: already installed, nothing to send
    assert rig.offer(p).get("installed") is True
    # rollback: the config's own (shipped) model again, then forward to 1.1.0 again
    back = rig.command("model_rollback", name="fever")
    assert back.outcome == "applied" and rig.running() == "1.0.0"
    assert rig.command("model_rollback", name="fever").outcome == "applied" and rig.running() == "1.1.0"
    # a third version: the unit keeps the current and the previous one, nothing older
    p2 = package(make_version(tmp_path, "1.2.0", signer[0]))
    rig.send(p2, only=lambda f, i: i < 2)  # a transfer in two goes
    rig.send(p2)
    assert rig.install(p2).outcome == "applied" and rig.running() == "1.2.0"
    assert sorted(d.name for d in (store / "fever").iterdir() if d.is_dir()) == ["1.1.0", "1.2.0"]
    assert not list((store / ".staging").iterdir())
    assert rig.command("model_rollback", name="fever").outcome == "applied" and rig.running() == "1.1.0"


@pytest.mark.parametrize("case, reason", [
    ("unsigned", "unsigned"),
    ("wrongly_signed", "signature does not verify"),
    ("tampered_after_signing", "signature does not verify"),
])
def test_unsigned_and_wrongly_signed_models_are_refused_at_the_offer(
        tmp_path: Path, rig: Rig, signer: Any, case: str, reason: str) -> None:
    key = {"unsigned": None, "wrongly_signed": Ed25519PrivateKey.generate()}.get(case, signer[0])
    d = make_version(tmp_path, "1.1.0", key)
    if case == "tampered_after_signing":  # the manifest changed after it was signed (a looser golden set)
        doc = json.loads((d / "manifest.json").read_text())
        doc["golden"]["min_accuracy"] = 0.0
        (d / "manifest.json").write_text(manifest_text(doc))
    with pytest.raises(ValueError, match=reason):
        rig.offer(package(d))
    assert rig.running() == "1.0.0" and not (store_dir(rig.unit.cfg) / "fever").exists()


def test_a_tampered_chunk_is_refused_and_stays_missing(tmp_path: Path, rig: Rig, signer: Any) -> None:
    p = package(make_version(tmp_path, "1.1.0", signer[0]))
    rig.offer(p)
    import base64

    bad = bytearray(p.chunk("fever.onnx", 2))
    bad[10] ^= 0xFF
    with pytest.raises(ValueError, match="damaged in transit"):
        rig.updates.chunk({"transfer": p.transfer, "file": "fever.onnx", "index": 2,
                           "data": base64.b64encode(bytes(bad)).decode()})
    assert rig.offer(p)["missing"] == {"fever.onnx": [0, 1, 2, 3, 4]}


@pytest.mark.parametrize("case, reason", [
    ("tampered", "does not match the manifest"),
    ("truncated", "does not match the manifest"),
    ("wrong_shape", "shape"),
    ("regressing", "golden set accuracy"),
])
def test_bad_versions_are_refused_and_the_running_model_stays(
        tmp_path: Path, rig: Rig, signer: Any, case: str, reason: str) -> None:
    key = signer[0]
    if case in ("tampered", "truncated"):
        # signed over the real model; the bytes the unit receives differ (chunk hashes are the sender's: a
        # consistent transfer of the wrong file)
        d = make_version(tmp_path, "1.1.0", key)
        p = package(d)
        blob = p.data["fever.onnx"]
        p.data["fever.onnx"] = blob[: len(blob) // 2] if case == "truncated" else blob[:100] + b"\0" + blob[101:]
    elif case == "wrong_shape":
        def six_to_seven(doc: dict[str, Any], _d: Path) -> None:
            doc["inputs"][0]["shape"] = [None, 7]
        p = package(make_version(tmp_path, "1.1.0", key, six_to_seven))
    else:
        p = package(make_version(tmp_path, "1.1.0", key, biased(0.6)))
    rig.send(p)
    reply = rig.install(p)
    assert reply.outcome == "refused" and reason in (reply.error or ""), reply.error
    assert rig.running() == "1.0.0"
    store = store_dir(rig.unit.cfg)
    assert read_pointer(store, "fever", "current") is None and not (store / "fever" / "1.1.0").exists()


def test_an_interrupted_transfer_resumes_and_never_activates_half_a_file(
        tmp_path: Path, signer: Any) -> None:
    rig = Rig(tmp_path, signer[1])
    p = package(make_version(tmp_path, "1.1.0", signer[0]), chunk_bytes=256)
    try:
        assert rig.send(p, only=lambda f, i: i % 2 == 0)["chunks"] == 10
        # the transfer stops half way: an install now is refused, nothing activated
        reply = rig.install(p)
        assert reply.outcome == "refused" and "incomplete: 5 of 10 chunks missing" in (reply.error or "")
        assert rig.running() == "1.0.0" and read_pointer(store_dir(rig.unit.cfg), "fever", "current") is None
    finally:
        rig.close()
    # the unit restarts (a power cut): the staged chunks are found again by their hashes
    rig = Rig(tmp_path, signer[1])
    try:
        offered = rig.send(p)
        assert offered["missing"] == {"fever.onnx": [1, 3, 5, 7, 9]}
        reply = rig.install(p)
        assert reply.outcome == "applied", reply.error
        assert rig.running() == "1.1.0"
    finally:
        rig.close()
    # and a fresh start runs the installed version
    again = Unit(rig.cfg)
    try:
        assert model_versions(again.app) == {"fever": "1.1.0"}
    finally:
        again.outbox.close()


def test_offers_out_of_bounds_or_for_another_model_are_refused(tmp_path: Path, rig: Rig, signer: Any) -> None:
    p = package(make_version(tmp_path, "1.1.0", signer[0]))
    for change, reason in (({"chunk_bytes": 300 * 1024}, "chunk_bytes"),
                           ({"name": "ore-grade"}, "the manifest is fever 1.1.0"),
                           ({"files": {"../x.onnx": {"size": 1, "chunks": ["0" * 64]}}}, "files must be exactly")):
        with pytest.raises(ValueError, match=reason):
            rig.updates.offer({**p.offer(), **change})
    other = json.loads(p.manifest_text)
    other["name"] = "ore-grade"
    with pytest.raises(ValueError, match="loads no model named 'ore-grade'"):
        rig.updates.offer({**p.offer(), "name": "ore-grade", "manifest": json.dumps(other)})
    big = {**p.offer()}
    big["files"] = {"fever.onnx": {"size": 65_000_001, "chunks": ["0" * 64] * 248}}
    big["chunk_bytes"] = 256 * 1024
    with pytest.raises(ValueError, match=r"models\.max_mb"):
        rig.updates.offer(big)


@pytest.mark.parametrize("name", ["../fever.onnx", "/etc/passwd", "sub/../../x.onnx"])
def test_manifest_paths_outside_the_directory_are_refused(tmp_path: Path, name: str) -> None:
    d = make_version(tmp_path, "1.1.0", None)
    doc = json.loads((d / "manifest.json").read_text())
    doc["file"] = name
    (d / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="inside the model's directory"):
        OnnxModel(d / "manifest.json")
    doc["file"] = "fever.onnx"
    doc["external_data"] = [{"file": name, "sha256": "0" * 64}]
    (d / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="external_data file"):
        OnnxModel(d / "manifest.json")


def test_a_symlink_out_of_the_directory_and_unhashed_files_are_refused(tmp_path: Path) -> None:
    d = make_version(tmp_path, "1.1.0", None)
    outside = tmp_path / "weights.bin"
    outside.write_bytes(b"x" * 10)
    (d / "weights.bin").symlink_to(outside)
    doc = json.loads((d / "manifest.json").read_text())
    doc["external_data"] = [{"file": "weights.bin", "sha256": sha256_file(outside)}]
    (d / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="leads outside"):
        OnnxModel(d / "manifest.json")
    (d / "weights.bin").unlink()
    (d / "weights.bin").write_bytes(b"x" * 10)
    (d / "extra.bin").write_bytes(b"y")  # in the directory but not in the manifest
    with pytest.raises(ModelError, match=r"extra\.bin not named in the manifest"):
        OnnxModel(d / "manifest.json")


def test_the_shipped_models_pass_their_golden_sets() -> None:
    for name in ("fever", "ore_grade", "wood", "insects"):  # the image classifiers' sets in golden.npz
        model = OnnxModel(default_manifest(name))
        assert model.manifest.golden is not None
        assert model.self_test() >= model.manifest.golden.min_accuracy


@pytest.mark.broker
def test_a_push_to_a_fleet_shows_in_hub_fleet(tmp_path: Path, signer: Any,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Five gate units (run_forever, each its own MQTT session) and a hub; the CLI pushes a signed version to
    every unit of type gate; `hub fleet` shows fever@1.1.0 on each; a rollback on one shows 1.0.0 there."""
    from customs_edge.agent.runtime import run_forever
    from customs_edge.hub.brokers import Mosquitto
    from tests.cmdtools import cli
    from tests.conftest import need_mosquitto, wait_for
    from tests.fleet import HubThread

    need_mosquitto()
    broker = Mosquitto(tmp_path / "broker", persistence=True).start()
    hub = HubThread(broker.port, tmp_path / "hub.db").start()
    stop = threading.Event()
    threads = []
    devices = [f"gate-{i}" for i in range(5)]
    try:
        for d in devices:
            cfg = parse_unit_config(gate_dict(tmp_path, d, broker.port, signer[1]))
            t = threading.Thread(target=run_forever, args=(cfg, None, stop), daemon=True)
            t.start()
            threads.append(t)

        def fleet_models() -> dict[str, str]:
            _, out, _ = cli(capsys, "hub", "fleet", "--db", str(tmp_path / "hub.db"), "--json")
            devs = json.loads(out)["devices"]
            return {d: (v["health"] or {}).get("models", {}).get("fever", "") for d, v in devs.items()}

        wait_for(lambda: fleet_models() == dict.fromkeys(devices, "1.0.0"), 60, "every unit's health at the hub")
        d = make_version(tmp_path, "1.1.0", signer[0])
        code, out, err = cli(capsys, "fleet", "model", "push", "fever", str(d), "--type", "gate", "--progress",
                             f"--broker=127.0.0.1:{broker.port}", "--chunk-kb", "1")
        assert code == 0, out + err
        assert out.count("applied: gate-") == 5 and "chunks" in err and "units done 5/5" in err
        wait_for(lambda: fleet_models() == dict.fromkeys(devices, "1.1.0"), 60, "1.1.0 everywhere at the hub")
        code, out, _ = cli(capsys, "hub", "fleet", "--db", str(tmp_path / "hub.db"))
        assert all(line.rstrip().endswith("fever@1.1.0") for line in out.splitlines()[1:]), out
        code, out, _ = cli(capsys, "fleet", "model", "rollback", "gate-3", "fever",
                           f"--broker=127.0.0.1:{broker.port}")
        assert code == 0 and out.startswith("applied: gate-3 fever now 1.0.0"), out
        wait_for(lambda: fleet_models()["gate-3"] == "1.0.0", 60, "gate-3 back on 1.0.0 at the hub")
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        hub.stop()
        broker.stop()


def test_a_pushed_version_damaged_on_disk_falls_back_to_the_configs_model(tmp_path: Path, rig: Rig,
                                                                           signer: Any) -> None:
    p = package(make_version(tmp_path, "1.1.0", signer[0]))
    rig.send(p)
    assert rig.install(p).outcome == "applied"
    onnx_file = store_dir(rig.unit.cfg) / "fever" / "1.1.0" / "fever.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-1])  # a bad sector, a full disk during a copy
    again = Unit(rig.unit.cfg, outbox=rig.unit.outbox)
    assert model_versions(again.app) == {"fever": "1.0.0"}


@pytest.mark.broker
def test_an_operator_interrupted_mid_transfer_resumes_with_only_the_missing_chunks(
        tmp_path: Path, signer: Any) -> None:
    """The operator's push stops after three chunks (Ctrl-C); the unit keeps running its model; the next push
    is told what is missing and sends only that, then the version is applied."""
    from customs_edge.agent.runtime import run_forever
    from customs_edge.cli.fleet_model import Pusher
    from customs_edge.core.mqtt import MqttLink
    from customs_edge.hub.brokers import Mosquitto
    from tests.conftest import need_mosquitto

    class Interrupted(Exception):
        pass

    class StopsAfterThree(Pusher):
        def _on_reply(self, u: Any, r: CommandReply) -> None:
            super()._on_reply(u, r)
            if u.done_chunks >= 3:
                raise Interrupted

    need_mosquitto()
    broker = Mosquitto(tmp_path / "broker").start()
    stop = threading.Event()
    cfg = parse_unit_config(gate_dict(tmp_path, "gate-0", broker.port, signer[1]))
    unit = threading.Thread(target=run_forever, args=(cfg, None, stop), daemon=True)
    unit.start()
    from tests.cmdtools import Operator

    op = Operator(broker.port, "gate-0")
    op.wait_online()  # subscribed to its commands
    op.close()
    p = package(make_version(tmp_path, "1.1.0", signer[0]), chunk_bytes=256)  # 10 chunks

    def link() -> MqttLink:
        return MqttLink(f"op-{uuid.uuid4().hex[:8]}", "127.0.0.1", broker.port, clean_session=True)

    try:
        first = link()
        with pytest.raises(Interrupted):
            StopsAfterThree(first, "customs-edge/v1", ["gate-0"], p, timeout=30).run(deadline_s=60)
        first.close()
        store = store_dir(cfg)
        assert read_pointer(store, "fever", "current") is None  # nothing activated
        second = link()
        try:
            units = Pusher(second, "customs-edge/v1", ["gate-0"], p, timeout=30).run(deadline_s=60)
        finally:
            second.close()
        u = units["gate-0"]
        assert u.outcome == "applied", u.detail
        assert 0 < u.sent_bytes <= p.size - 3 * 256  # only what the unit said it was missing
        assert read_pointer(store, "fever", "current") == "1.1.0"
    finally:
        stop.set()
        unit.join(15)
        broker.stop()


def test_keygen_and_sign_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from customs_edge.core.signing import parse_public
    from customs_edge.models.runtime import check_signature
    from tests.cmdtools import cli

    key = tmp_path / "signing.key"
    code, out, _ = cli(capsys, "fleet", "model", "keygen", str(key))
    assert code == 0 and out.startswith("ed25519:") and key.stat().st_mode & 0o077 == 0
    public = parse_public(out.strip())
    code, _, err = cli(capsys, "fleet", "model", "keygen", str(key))
    assert code == 1 and "never overwritten" in err
    d = make_version(tmp_path, "1.1.0", None)
    code, out, _ = cli(capsys, "fleet", "model", "sign", str(d), "--key", str(key))
    assert code == 0 and (d / "manifest.json.sig").exists()
    assert OnnxModel(d / "manifest.json", public_key=public).manifest.version == "1.1.0"
    doc = json.loads((d / "manifest.json").read_text())
    doc["version"] = "1.1.1"
    with pytest.raises(ModelError, match="does not verify"):
        check_signature(d / "manifest.json", doc, public)
