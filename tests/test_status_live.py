"""`customs-edge status` shows the running unit from its retained status and health on the broker, and its
outbox on disk: a running unit's drivers and backlog, the same unit offline once killed (its will), a
mistyped outbox path named, and a broker that cannot be reached as one line with the outbox still shown."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from customs_edge.hub.brokers import Mosquitto
from customs_edge.simulators.base import Endpoints
from customs_edge.simulators.scale import ScaleSim, ScaleWorld
from tests.conftest import unit_dict, wait_for
from tests.fleet import AgentProc, outbox_state

pytestmark = pytest.mark.broker


@pytest.fixture
def scale_urls() -> Iterator[dict[str, str]]:
    with Endpoints(ScaleSim(ScaleWorld(seed=2, cycle_s=1.0), rate_hz=50)) as urls:
        yield urls


def status(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "customs_edge", "status", "--config", str(config), *extra],
                          capture_output=True, text=True, timeout=60)


def live_json(config: Path) -> dict[str, Any]:
    res = status(config, "--json")
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_status_shows_the_running_unit_then_offline_from_its_will(tmp_path: Path, mosquitto: Mosquitto,
                                                                   scale_urls: dict[str, str]) -> None:
    cfg = unit_dict(tmp_path, scale_urls["socket"], mosquitto.port, health_interval_s=1.0)
    agent = AgentProc(cfg, tmp_path).start()
    outbox = Path(cfg["outbox"]["path"])
    try:
        wait_for(outbox.exists, 60, "the agent to create its outbox")
        # no hub: records pile up in the outbox (a backlog); wait until the retained health says the driver is up
        def health() -> dict[str, Any]:
            got = live_json(agent.path)
            he = got["health"] or {}
            up = he.get("drivers", {}).get("scale", {}).get("up") and he.get("outbox_pending", 0) > 0
            return got if up else {}

        got = wait_for(health, 60, "a retained health message with the scale driver up and a backlog")
        assert got["status"]["state"] == "online" and got["broker"]["error"] is None
        assert got["health"]["drivers"]["scale"]["frames"] > 0 and got["health"]["outbox_pending"] > 0
        assert got["outbox"]["device_id"] == "scale-t1" and got["outbox"]["pending"] > 0
        res = status(agent.path)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        scale = [line.split() for line in lines if line.split()[:2] == ["scale", "up"]]
        assert len(scale) == 1 and int(scale[0][2]) > 0, res.stdout  # up, with its frames counted
        assert any(line.strip().startswith("state      online") for line in lines), res.stdout
        assert any(line.strip().startswith("backlog") for line in lines), res.stdout
        assert f"outbox {outbox}" in res.stdout and "Traceback" not in res.stderr
        agent.kill9()  # no goodbye: the broker publishes the will after 1.5 keepalives
        last_before = outbox_state(outbox)[0]  # once the agent is gone (before, it may commit one more)
        wait_for(lambda: live_json(agent.path)["status"]["state"] == "offline", 30, "the will: state offline")
        res = status(agent.path)
        assert "offline: the broker published its will" in res.stdout, res.stdout
        assert outbox_state(outbox)[0] == last_before  # read-only: nothing written
    finally:
        if agent.proc and agent.proc.poll() is None:
            agent.kill9()


def test_status_of_a_mistyped_outbox_path_names_it_and_still_shows_the_broker(tmp_path: Path,
                                                                             mosquitto: Mosquitto) -> None:
    missing = tmp_path / "var" / "lib" / "outbx.db"
    config = tmp_path / "unit.yaml"
    config.write_text(yaml.safe_dump(unit_dict(tmp_path, "/dev/ttyUSB0", mosquitto.port,
                                               outbox={"path": str(missing)})))
    res = status(config, "--wait", "0.5")
    assert res.returncode == 1
    assert f"{missing}: no outbox file there; check outbox.path" in res.stderr
    assert "a mistyped path" in res.stderr and "Traceback" not in res.stderr
    assert "nothing retained for this unit" in res.stdout  # the broker was reached: no unit on it
    assert not (tmp_path / "var").exists()


def test_status_with_the_broker_down_says_so_and_shows_the_outbox(tmp_path: Path) -> None:
    from customs_edge.agent.outbox import SqliteOutbox
    from customs_edge.core.records import Priority, RecordIn

    path = tmp_path / "agent" / "outbox.db"
    ob = SqliteOutbox(path, device_id="scale-t1")
    ob.put([RecordIn(type="t", priority=Priority.EVENT, payload={}) for _ in range(7)])
    ob.close()
    config = tmp_path / "unit.yaml"
    config.write_text(yaml.safe_dump(unit_dict(tmp_path, "/dev/ttyUSB0", free_port(), outbox={"path": str(path)})))
    res = status(config)
    assert res.returncode == 0, res.stderr
    broker = [line for line in res.stdout.splitlines() if line.strip().startswith("broker ")]
    assert len(broker) == 1 and "cannot be reached: connect: [Errno 111] Connection refused" in broker[0], res.stdout
    assert "pending 7, last seq 7" in res.stdout and "Traceback" not in res.stderr + res.stdout
    got = live_json(config)
    assert "Connection refused" in got["broker"]["error"] and got["outbox"]["pending"] == 7


def test_status_lines_stay_lines_whatever_the_retained_messages_hold(tmp_path: Path) -> None:
    """The retained messages come from the network: odd types and line breaks neither crash nor forge lines."""
    from customs_edge.agent.config import parse_unit_config
    from customs_edge.cli.status import Live, render

    cfg = parse_unit_config(unit_dict(tmp_path, "/dev/ttyUSB0", 1883))
    live = Live("127.0.0.1:1883", status={"state": "online", "ts": "soon", "sync": {"connects": {"a": 1}},
                                          "outbox": [], "drivers": {"x\nscale up 9": {"up": 1, "frames": {}}}})
    lines = list(render(cfg, live, None, "no outbox"))
    assert all(line.isprintable() for line in lines)
    assert [line.split()[0] for line in lines if "scale up 9" in line] == ["x\\nscale"]
    assert "  error: no outbox" in lines


def test_status_names_the_brokers_refusal(tmp_path: Path, mosquitto_with_password: Mosquitto) -> None:
    config = tmp_path / "unit.yaml"
    config.write_text(yaml.safe_dump(unit_dict(tmp_path, "/dev/ttyUSB0", mosquitto_with_password.port,
                                               sync={"username": "unit", "password": "s3cret-Pw"})))
    res = status(config)
    assert res.returncode == 1  # no outbox here: named too
    broker = [line for line in res.stdout.splitlines() if line.strip().startswith("broker ")]
    assert len(broker) == 1 and "CONNACK refused: not authorised" in broker[0] and "sync.password" in broker[0]
    assert "s3cret-Pw" not in res.stdout + res.stderr and "Traceback" not in res.stderr
