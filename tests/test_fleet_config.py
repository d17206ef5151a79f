"""`customs-edge fleet config push|get` against a running unit process over a real mosquitto: applied (the new
config runs, the outbox and its sequence carry on), refused (the text `config validate` prints, the old config
keeps running), rolled back (validated, failed to start: the old config runs again, the file restored), an
offline unit applying the push when it returns (unless expired), and a power cut during the probation."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from customs_edge.agent.config import load_unit_config
from customs_edge.agent.health import config_hash
from tests.cmdtools import Operator, UnitRig, cli, command, unit_rig
from tests.conftest import wait_for
from tests.fleet import HubThread, assert_exactly_once, hub_seqs, outbox_state

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[UnitRig]:
    yield from unit_rig(tmp_path, sims=2)


def closed_port() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"socket://127.0.0.1:{port}"


def push(rig: UnitRig, capsys: pytest.CaptureFixture[str], text: str, *flags: str) -> tuple[int, str]:
    new = rig.tmp / "pushed.yaml"
    new.write_text(text)
    code, out, _ = cli(capsys, "fleet", "config", "push", "scale-t1", str(new), rig.broker_flag(), *flags)
    return code, out


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_a_valid_config_is_applied_and_the_outbox_carries_on(rig: UnitRig, capsys: pytest.CaptureFixture[str]) -> None:
    hub = HubThread(rig.broker.port, rig.tmp / "hub.db").start()
    try:
        old_text = rig.agent.path.read_text()
        text = rig.text(drivers={"scale": {"driver": "toledo-continuous", "port": rig.ports[1], "silent_after_s": 3}})
        seq_before = rig.produced()
        code, out = push(rig, capsys, text)
        assert code == 0 and out.startswith("applied: scale-t1") and sha(text) in out
        assert rig.agent.path.read_text() == text
        assert Path(f"{rig.agent.path}.last-good").read_text() == old_text
        assert not Path(f"{rig.agent.path}.pending").exists()
        # the new config's effect: its driver reads the second simulator; with the first one gone records go on
        rig.sims[0].stop()
        assert rig.wait_more() > seq_before
        # the new unit reports the new config's hash in its health, which the hub stores
        want = config_hash(load_unit_config(rig.agent.path))
        wait_for(lambda: any(want in (r.health or "") for r in hub.hub.store.fleet()), 60,
                 "the new config's hash in the unit's health at the hub")
        # config get: the running text and its hash
        code, got, err = cli(capsys, "fleet", "config", "get", "scale-t1", rig.broker_flag())
        assert code == 0 and got == text and err.split()[1] == sha(got)
        # the outbox and its sequence survived: every seq before and after the push reaches the hub once
        rig.sims[1].stop()

        def drained() -> bool:
            last, pending = outbox_state(rig.outbox)
            return not pending and len(hub_seqs(rig.tmp / "hub.db", "scale-t1")[0]) >= last

        wait_for(drained, 60, "the outbox to drain to the hub", interval=0.2)
        rig.agent.terminate()
    finally:
        hub.stop()
    assert assert_exactly_once(rig.outbox, rig.tmp / "hub.db", "scale-t1") > seq_before


def test_an_invalid_config_is_refused_with_the_validate_text(rig: UnitRig, capsys: pytest.CaptureFixture[str]) -> None:
    old_text = rig.agent.path.read_text()
    bad = rig.text(app={"summary_interval_s": "fast"}, sync={"hots": "x"})
    code, out = push(rig, capsys, bad)
    assert code == 1 and out.startswith("refused: scale-t1")
    # what a technician sees for the same text
    here = rig.tmp / "check" / "unit.yaml"
    here.parent.mkdir()
    here.write_text(bad)
    vcode, _, verr = cli(capsys, "config", "validate", str(here))
    assert vcode == 1 and "summary_interval_s" in verr and "hots" in verr
    shown = out.split("\n", 1)[1].rstrip("\n")
    assert shown.replace(str(rig.agent.path), "FILE") == verr.rstrip("\n").replace(str(here), "FILE")
    # the old config keeps running, its file untouched
    assert rig.agent.path.read_text() == old_text
    assert not Path(f"{rig.agent.path}.incoming").exists()
    rig.wait_more()


def test_damaged_or_foreign_pushes_are_refused(rig: UnitRig) -> None:
    old_text = rig.agent.path.read_text()
    good = rig.text(app={"summary_interval_s": 0.1})
    other = rig.text(device_id="scale-t2")
    moved = rig.text(outbox={"path": str(rig.tmp / "elsewhere.db")})
    op = Operator(rig.broker.port, "scale-t1")
    try:
        for args, why in (({"text": good, "sha256": sha(good[:-1])}, "sha256 mismatch"),
                          ({"text": good}, "config_push needs args.text"),
                          ({"text": good, "sha256": sha(good), "probation_s": "long"}, "args.probation_s"),
                          ({"text": other, "sha256": sha(other)}, "device_id: a pushed config must keep"),
                          ({"text": moved, "sha256": sha(moved)}, "outbox.path: a pushed config must keep")):
            cmd = command("config_push", args=args)
            op.send(cmd)
            reply = op.reply(cmd["id"], 60)
            assert (reply["ok"], reply["outcome"]) == (False, "refused") and why in reply["error"], reply
    finally:
        op.close()
    assert rig.agent.path.read_text() == old_text
    rig.wait_more()


def test_a_config_that_fails_to_start_is_rolled_back(rig: UnitRig, capsys: pytest.CaptureFixture[str]) -> None:
    old_text = rig.agent.path.read_text()
    text = rig.text(drivers={"scale": {"driver": "toledo-continuous", "port": closed_port(), "silent_after_s": 3}})
    code, out = push(rig, capsys, text, "--probation", "3")
    assert code == 1 and out.startswith("rolled_back: scale-t1")
    assert "driver scale not up within 3 s" in out
    assert rig.agent.path.read_text() == old_text
    assert not Path(f"{rig.agent.path}.pending").exists()
    rig.wait_more()  # the old config reads the first simulator again
    code, got, err = cli(capsys, "fleet", "config", "get", "scale-t1", rig.broker_flag())
    assert got == old_text and err.split()[1] == sha(old_text)


def test_a_config_whose_model_does_not_load_is_rolled_back(rig: UnitRig, capsys: pytest.CaptureFixture[str]) -> None:
    import customs_edge.models

    shipped = Path(customs_edge.models.__file__).parent / "fever"
    broken = rig.tmp / "fever-truncated"
    shutil.copytree(shipped, broken)
    onnx = broken / "fever.onnx"
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])  # a transfer cut in half
    old_text = rig.agent.path.read_text()
    text = yaml.safe_dump({**rig.agent.cfg, "type": "gate", "app": {"model": str(broken / "manifest.json")},
                           "drivers": {"thermal": {"driver": "mlx90640-serial", "port": closed_port()},
                                       "passage": {"driver": "passage", "port": closed_port()}}})
    code, out = push(rig, capsys, text)
    assert code == 1 and out.startswith("rolled_back: scale-t1") and "ModelError" in out
    assert rig.agent.path.read_text() == old_text
    rig.wait_more()  # the scale config runs again


def test_an_offline_unit_applies_a_push_when_it_returns_unless_expired(rig: UnitRig,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    first = rig.text(app={"summary_interval_s": 0.1})
    rig.agent.terminate()
    code, _ = push(rig, capsys, first, "--timeout", "2")
    assert code == 1  # no answer while the unit is off; the broker keeps the command for its session
    expired = rig.text(app={"summary_interval_s": 0.2})
    code, _ = push(rig, capsys, expired, "--timeout", "1", "--ttl", "1")
    assert code == 1
    sent = time.time()
    wait_for(lambda: time.time() > sent + 1.5, 10, "the second push's expiry")
    rig.agent.start()
    pending = Path(f"{rig.agent.path}.pending")
    wait_for(lambda: rig.agent.path.read_text() == first and not pending.exists(), 60, "the queued push applied")
    op = Operator(rig.broker.port, "scale-t1")
    try:
        stats = op.call("status")["result"]["sync"]
        assert stats["commands_expired"] == 1
        assert op.call("config_get")["result"]["sha256"] == sha(first)
    finally:
        op.close()
    assert rig.agent.path.read_text() == first
    rig.wait_more()


def test_a_power_cut_during_the_probation_boots_the_last_good_config(rig: UnitRig) -> None:
    old_text = rig.agent.path.read_text()
    text = rig.text(drivers={"scale": {"driver": "toledo-continuous", "port": closed_port(), "silent_after_s": 3}})
    op = Operator(rig.broker.port, "scale-t1")
    try:
        op.send(command("config_push", args={"text": text, "sha256": sha(text), "probation_s": 120}))
        wait_for(lambda: rig.agent.path.read_text() == text, 30, "the new file in place, in its probation")
        assert Path(f"{rig.agent.path}.pending").exists()
        rig.agent.kill9()
        rig.agent.start()
        got = op.call("config_get")
        assert got["result"]["text"] == old_text
    finally:
        op.close()
    assert rig.agent.path.read_text() == old_text
    assert not Path(f"{rig.agent.path}.pending").exists()
    assert "had not passed its probation" in rig.agent.log_text()
    rig.wait_more()


def test_two_pushes_back_to_back_are_applied_in_order(rig: UnitRig) -> None:
    """Two pushes sent back to back: applied in order, each answered."""
    a, b = rig.text(app={"summary_interval_s": 0.1}), rig.text(app={"summary_interval_s": 0.06})
    op = Operator(rig.broker.port, "scale-t1")
    try:
        ca = command("config_push", args={"text": a, "sha256": sha(a)})
        cb = command("config_push", args={"text": b, "sha256": sha(b)})
        op.send(ca)
        op.send(cb)
        assert op.reply(ca["id"], 60)["outcome"] == "applied"
        assert op.reply(cb["id"], 60)["outcome"] == "applied"
    finally:
        op.close()
    assert rig.agent.path.read_text() == b


def test_a_fleet_of_five_one_offline_one_rolled_back_as_hub_fleet_shows(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from customs_edge.hub.brokers import Mosquitto
    from customs_edge.simulators.base import Endpoints
    from customs_edge.simulators.scale import ScaleSim, ScaleWorld
    from tests.conftest import need_mosquitto, unit_dict
    from tests.fleet import AgentProc

    need_mosquitto()
    broker = Mosquitto(tmp_path / "broker", persistence=True).start()
    sims = [Endpoints(ScaleSim(ScaleWorld(seed=i, cycle_s=1.0), rate_hz=10)) for i in range(5)]
    agents = [AgentProc(unit_dict(tmp_path, sim.start()["socket"], broker.port, device_id=f"unit-{i}",
                                  app={"summary_interval_s": 0.5}, outbox={"path": str(tmp_path / f"u{i}.db")}),
                        tmp_path).start() for i, sim in enumerate(sims)]
    hub = HubThread(broker.port, tmp_path / "hub.db").start()
    flag = f"--broker=127.0.0.1:{broker.port}"
    try:
        def fleet() -> dict[str, dict[str, object]]:
            code, out, _ = cli(capsys, "hub", "fleet", "--db", str(tmp_path / "hub.db"), "--json")
            assert code == 0
            return dict(json.loads(out)["devices"])

        wait_for(lambda: len([d for d in fleet().values() if d["health"]]) == 5, 60, "health from 5 units")
        agents[4].terminate()  # offline during the push
        wanted = {}
        for i, agent in enumerate(agents):
            port = closed_port() if i == 2 else agent.cfg["drivers"]["scale"]["port"]
            new = {**agent.cfg, "app": {"summary_interval_s": 0.25},
                   "drivers": {"scale": {**agent.cfg["drivers"]["scale"], "port": port}}}
            f = tmp_path / f"push-{i}.yaml"
            f.write_text(yaml.safe_dump(new))
            code, out, _ = cli(capsys, "fleet", "config", "push", f"unit-{i}", str(f), flag, "--probation", "5",
                               "--timeout", "5" if i == 4 else "60")
            expect = (0, "applied") if i not in (2, 4) else (1, "rolled_back") if i == 2 else (1, "")
            assert code == expect[0] and out.startswith(expect[1]), out
            wanted[f"unit-{i}"] = config_hash(load_unit_config(agent.path if i == 2 else f))
        agents[4].start()
        wait_for(lambda: all((d["health"] or {}).get("config_hash") == wanted[name] and d["status"] == "online"
                             for name, d in fleet().items()), 90, "every unit's config hash at the hub")
        code, out, _ = cli(capsys, "hub", "fleet", "--db", str(tmp_path / "hub.db"))
        rows = {line.split()[0]: line for line in out.splitlines()[1:]}
        assert all(wanted[name][:8] in rows[name] and " online " in rows[name] for name in wanted), out
    finally:
        for agent in agents:
            if agent.proc and agent.proc.poll() is None:
                agent.proc.kill()
                agent.proc.wait()
        hub.stop()
        for sim in sims:
            sim.stop()
        broker.stop()
