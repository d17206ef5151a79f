"""Remote inspection: an officer's request in the console sends an `inspect` command; the unit's thermal
array is seen as JPEG snapshots for the time asked, and nothing is sent unless asked."""

from __future__ import annotations

import contextlib
import subprocess
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from customs_edge.agent.inspect import MAX_SECONDS, Inspector, encode
from customs_edge.cli.demo import _start_sim, _unit_config
from customs_edge.core.readings import Image, ThermalFrame
from tests.conftest import wait_for
from tests.consolekit import Client, Running
from tests.fleet import AgentProc, HubThread


def frame(hot: float = 36.0) -> ThermalFrame:
    px = np.full((24, 32), 22.0, np.float32)
    px[8:14, 10:16] = hot
    return ThermalFrame(source="thermal", pixels=px)


def test_a_thermal_frame_and_an_image_become_jpegs() -> None:
    img = cv2.imdecode(np.frombuffer(encode(frame()), np.uint8), cv2.IMREAD_COLOR)
    assert img.shape[1] == 32 * 16 and img.shape[0] == 24 * 16  # scaled up for a screen, nearest neighbour
    hot, cold = img[11 * 16, 12 * 16].astype(int), img[2 * 16, 2 * 16].astype(int)
    assert hot.sum() > cold.sum() + 200  # the warm region is the bright one
    big = Image(source="camera", pixels=np.zeros((1080, 1920, 3), np.uint8))
    assert cv2.imdecode(np.frombuffer(encode(big), np.uint8), cv2.IMREAD_COLOR).shape == (360, 640, 3)


def test_requests_are_checked_and_a_session_ends_on_time() -> None:
    sent: list[bytes] = []
    done = threading.Event()
    ins = Inspector(sent.append)
    with pytest.raises(ValueError, match="no camera or thermal array"):
        ins.start({}, [])
    for args, why in (({"seconds": MAX_SECONDS + 1}, "seconds"), ({"rate_hz": 50}, "rate_hz"),
                      ({"role": "scale"}, "role 'scale'"), ({"fps": 2}, "unknown argument")):
        with pytest.raises(ValueError, match=why):
            ins.start(args, ["thermal"])
    assert not ins.active
    ins.offer("thermal", frame())  # no session: kept nowhere, sent never
    reply = ins.start({"seconds": 1, "rate_hz": 5}, ["thermal"])
    assert reply["role"] == "thermal" and reply["rate_hz"] == 5.0

    def feed() -> None:
        while ins.active:
            ins.offer("thermal", frame())
            done.wait(0.02)

    t = threading.Thread(target=feed)
    t.start()
    wait_for(lambda: not ins.active, 10, "the session's end")
    done.set()
    t.join()
    n = len(sent)
    assert 1 <= n <= 6  # at most one per 0.2 s over 1 s (+ the first at once)
    ins.offer("thermal", frame())
    assert len(sent) == n and all(j.startswith(b"\xff\xd8") for j in sent)


@pytest.mark.broker
def test_an_officer_sees_the_gate_s_thermal_array_on_request(mosquitto, tmp_path: Path) -> None:
    hub = HubThread(mosquitto.port, tmp_path / "hub.db").start()
    sim, urls = _start_sim("gate", seed=3, work=tmp_path)
    cfg = _unit_config("gate", "gate-07", urls, tmp_path, mosquitto.port)
    agent = AgentProc(cfg, tmp_path).start()
    console = Running(tmp_path / "hub.db", tmp_path / "console.db", anonymous=True,
                      broker=f"127.0.0.1:{mosquitto.port}")
    try:
        c = Client(console.url)
        insp = console.server.console.inspection
        assert insp is not None
        wait_for(lambda: insp.connected and 'data-device="gate-07"' in c.get("/inspect")[1], 30,
                 "the gate in the console's unit list")


        def thermal_up() -> bool:
            units = {u["device_id"]: u for u in console.server.console.reader.fleet()}
            health = units.get("gate-07", {}).get("health") or {}
            return bool(health.get("drivers", {}).get("thermal", {}).get("up"))

        wait_for(thermal_up, 30, "the gate's thermal array up (its health message)")
        _, page = c.get("/inspect")
        assert insp.snapshot("gate-07") is None  # frames flow, yet nothing is streamed unless asked
        token = page.split('name="csrf" value="')[1].split('"')[0]
        assert c.post("/inspect/gate-07", {"csrf": token, "seconds": "7"})[0] == 400  # not an offered duration
        code, view = c.post("/inspect/gate-07", {"csrf": token, "seconds": "30"})
        assert code == 200 and 'data-events="/events/snapshot/gate-07"' in view
        wait_for(lambda: (s := insp.snapshot("gate-07")) is not None and s.n >= 3, 30, "three snapshots")
        with c.opener.open(console.url + "/snapshot/gate-07.jpg") as r:
            assert r.headers["Content-Type"] == "image/jpeg"
            img = cv2.imdecode(np.frombuffer(r.read(), np.uint8), cv2.IMREAD_COLOR)
        assert img.shape[:2] == (24 * 16, 32 * 16)  # the MLX90640's 32 x 24, scaled for a screen
        (act,) = [a for a in console.server.console.state.audit() if a.action == "inspect"]
        assert (act.user, act.device_id, act.detail) == ("demo", "gate-07", "30 s of snapshots")
    finally:
        console.stop()
        agent.terminate()
        sim.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            sim.wait(5)
        hub.stop()
