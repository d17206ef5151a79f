"""Helpers for the command tests: a scale unit process on a real mosquitto, an operator client, the CLI."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from customs_edge.hub.brokers import Mosquitto
from customs_edge.simulators.base import Endpoints
from customs_edge.simulators.scale import ScaleSim, ScaleWorld
from tests.conftest import need_mosquitto, unit_dict, wait_for
from tests.fleet import AgentProc, outbox_state

PREFIX = "customs-edge/v1"


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`customs-edge ARGV` in this process: (exit code, stdout, stderr)."""
    from customs_edge.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


class Operator:
    """A plain MQTT client that publishes commands as given and collects the unit's replies."""

    def __init__(self, port: int, device: str) -> None:
        self.t_cmd = f"{PREFIX}/{device}/cmd"
        self.replies: list[dict[str, Any]] = []
        self.subscribed = threading.Event()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"op-{uuid.uuid4().hex[:8]}")
        self.status: dict[str, Any] = {}  # the unit's latest status message
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *_: self.subscribed.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.c.subscribe([(self.t_cmd + "/reply", 1), (f"{PREFIX}/{device}/status", 1)])
        assert self.subscribed.wait(10), "no SUBACK"

    def _on_message(self, _c: Any, _u: Any, m: paho.MQTTMessage) -> None:
        if m.topic.endswith("/status"):
            self.status = json.loads(m.payload)
        else:
            self.replies.append(json.loads(m.payload))

    def wait_online(self, timeout: float = 60) -> None:
        wait_for(lambda: self.status.get("state") == "online", timeout, "the unit online")

    def send(self, cmd: dict[str, Any], retain: bool = False) -> None:
        self.c.publish(self.t_cmd, json.dumps(cmd), qos=1, retain=retain).wait_for_publish(10)

    def reply(self, cid: str, timeout: float = 30) -> dict[str, Any]:
        return dict(wait_for(lambda: next((r for r in self.replies if r["id"] == cid), None), timeout,
                             f"the reply to {cid}"))

    def call(self, name: str, **over: Any) -> dict[str, Any]:
        cmd = command(name, **over)
        self.send(cmd)
        return self.reply(cmd["id"])

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def command(name: str, **over: Any) -> dict[str, Any]:
    return {"id": uuid.uuid4().hex, "cmd": name, "ts": time.time(), **over}


@dataclass
class UnitRig:
    tmp: Path
    broker: Mosquitto
    sims: list[Endpoints]
    ports: list[str]  # socket:// addresses of the simulators
    agent: AgentProc

    @property
    def outbox(self) -> Path:
        return Path(self.agent.cfg["outbox"]["path"])

    def produced(self) -> int:
        return outbox_state(self.outbox)[0]

    def wait_more(self, timeout: float = 30) -> int:
        """Wait until the unit committed 10 more records; returns the last seq then."""
        n = self.produced()
        return int(wait_for(lambda: (m := self.produced()) > n + 10 and m, timeout, "records to keep coming"))

    def text(self, **over: Any) -> str:
        """The unit's config as YAML, with `over` merged like unit_dict does."""
        cfg = json.loads(json.dumps(self.agent.cfg))
        for k, v in over.items():
            cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
        return yaml.safe_dump(cfg)

    def broker_flag(self) -> str:
        return f"--broker=127.0.0.1:{self.broker.port}"


def unit_rig(tmp_path: Path, sims: int = 1, start: bool = True) -> Iterator[UnitRig]:
    need_mosquitto()
    broker = Mosquitto(tmp_path / "broker", persistence=True).start()
    eps = [Endpoints(ScaleSim(ScaleWorld(seed=5 + i, cycle_s=1.0), rate_hz=50)) for i in range(sims)]
    ports = [e.start()["socket"] for e in eps]
    agent = AgentProc(unit_dict(tmp_path, ports[0], broker.port), tmp_path)
    rig = UnitRig(tmp_path, broker, eps, ports, agent)
    try:
        if start:
            agent.start()
            rig.wait_more()
        yield rig
    finally:
        if agent.proc and agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()
        for e in eps:
            e.stop()
        broker.stop()
