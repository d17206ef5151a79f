"""`customs-edge check`'s round trip to the hub and the clock offset it measures (✓ / ! / ✗, each with its fix),
the hub's ping handler (hub/pings.py) and its bounds, and the same round trip over mTLS with the shipped ACL."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from customs_edge.agent.config import parse_unit_config
from customs_edge.cli import check
from customs_edge.hub import pings
from customs_edge.hub.brokers import Mosquitto, free_port
from tests.conftest import unit_dict
from tests.fleet import HubThread
from tests.test_tls import Broker, pki, tls_keys  # noqa: F401  (pki: a fixture)

PREFIX = "customs-edge/v1"


def unit(tmp_path: Path, broker_port: int, **over: Any) -> Any:
    return parse_unit_config(unit_dict(tmp_path, "/dev/ttyUSB0", broker_port, **over))


def skewed_hub(mosquitto: Mosquitto, tmp_path: Path, skew_s: float) -> HubThread:
    hub = HubThread(mosquitto.port, tmp_path / "hub.db")
    hub.hub.pings.clock = lambda: time.time() + skew_s
    return hub.start()


def test_a_hub_answers_and_the_clock_offset_is_reported(tmp_path: Path, mosquitto: Mosquitto) -> None:
    hub = skewed_hub(mosquitto, tmp_path, 0.0)
    try:
        res, offset = check.check_hub(unit(tmp_path, mosquitto.port))
        assert res.state == check.OK and "answered a ping in" in res.detail, res
        assert offset is not None and abs(offset[0]) <= offset[1] + 0.05  # same machine, same clock
        clock = check.check_clock(None, offset)
        assert clock.state == check.OK and "the hub's (±" in clock.detail
        assert hub.hub.pings.answered == 1
    finally:
        hub.stop()


@pytest.mark.parametrize(("skew", "state", "words"), [(30.0, check.WARN, "behind the hub's"),
                                                      (-3600.0, check.FAIL, "ahead of the hub's")])
def test_a_clock_off_the_hubs_warns_or_fails_with_the_fix(tmp_path: Path, mosquitto: Mosquitto, skew: float,
                                                         state: str, words: str) -> None:
    hub = skewed_hub(mosquitto, tmp_path, skew)
    try:
        res, offset = check.check_hub(unit(tmp_path, mosquitto.port))
        assert res.state == check.OK and offset is not None
        assert offset[0] == pytest.approx(skew, abs=0.5)
        clock = check.check_clock(None, offset)
        assert clock.state == state and words in clock.detail and "timedatectl set-ntp true" in clock.fix
    finally:
        hub.stop()


def test_no_hub_fails_with_the_fix(tmp_path: Path, mosquitto: Mosquitto) -> None:
    res, offset = check.check_hub(unit(tmp_path, mosquitto.port), timeout_s=1.0)
    assert res.state == check.FAIL and offset is None
    assert "no hub answered a ping on customs-edge/v1/scale-t1/hub/ping" in res.detail
    assert "systemctl status customs-edge-hub" in res.fix and "configs/broker/acl" in res.fix


def test_ack_mode_broker_has_no_hub_to_ask(tmp_path: Path) -> None:
    res, offset = check.check_hub(unit(tmp_path, free_port(), sync={"ack_mode": "broker"}))
    assert res.state == check.OK and "not checked" in res.detail and offset is None


def test_the_whole_command_shows_the_hub_line(tmp_path: Path, mosquitto: Mosquitto) -> None:
    from tests.test_check import cli, write

    hub = skewed_hub(mosquitto, tmp_path, 0.0)
    try:
        f = write(tmp_path, unit_dict(tmp_path, str(tmp_path / "ttyUSB9"), mosquitto.port))
        doc = json.loads(cli("check", "--config", str(f), "--json").stdout)
        by = {c["check"]: c for c in doc["checks"]}
        assert by["hub"]["state"] == "ok" and by["clock"]["state"] == "ok" and "hub's" in by["clock"]["detail"]
    finally:
        hub.stop()


def test_the_hub_refuses_bad_pings_and_a_flood_without_answering() -> None:
    p = pings.Pinged(PREFIX, clock=lambda: 1000.0)
    t = f"{PREFIX}/dev-a/hub/ping"
    out = p.answer(t, b'{"v":1,"id":"x1","ts":999.5}')
    assert out == [(f"{PREFIX}/dev-a/hub/pong", b'{"v":1,"id":"x1","ping_ts":999.5,"ts":1000.0}')]
    assert p.answer(t, b"{" * 600) == [] and p.refused["too_large"] == 1
    assert p.answer(t, b'{"id":"x","ts":"now"}') == [] and p.answer(t, b'{"id":"","ts":1}') == []
    assert p.refused["malformed"] == 2
    assert p.answer(f"{PREFIX}/a/b/hub/ping", b'{"id":"x","ts":1}') == [] and p.refused["bad_topic"] == 1
    answered = sum(bool(p.answer(t, b'{"id":"y","ts":1}')) for _ in range(50))
    assert answered == pings.BURST - 1 and p.refused["rate"] == 50 - answered  # the burst, then the rate
    assert p.answer(f"{PREFIX}/dev-b/hub/ping", b'{"id":"z","ts":1}')  # per device


def test_the_round_trip_over_mtls_with_the_shipped_acl(tmp_path: Path, pki: Path) -> None:  # noqa: F811
    from tests.conftest import need_mosquitto

    need_mosquitto()
    broker = Broker(tmp_path / "broker", pki)
    broker.mq.start()
    hub = HubThread(broker.port, tmp_path / "hub.db", **tls_keys(pki, "hub-1")).start()
    try:
        keys = tls_keys(pki, "dev-a")
        res, offset = check.check_hub(unit(tmp_path, broker.port, device_id="dev-a", sync=keys))
        assert res.state == check.OK and offset is not None, res
        # another device's identity cannot ping as dev-a: its ping is refused by the ACL, nothing answers
        res_b, _ = check.check_hub(unit(tmp_path, broker.port, device_id="dev-a",
                                        sync=tls_keys(pki, "dev-b")), timeout_s=1.0)
        assert res_b.state == check.FAIL
    finally:
        hub.stop()
        broker.mq.stop()


def test_an_offline_hubs_session_does_not_swallow_the_ping(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Hubs keep persistent sessions; a stopped one must not take a share of the pings (a plain
    subscription at QoS 0: only connected hubs get them, and each answers)."""
    HubThread(mosquitto.port, tmp_path / "a.db").start().stop()
    b = HubThread(mosquitto.port, tmp_path / "b.db").start()
    try:
        for _ in range(2):  # a shared group would hand one of these to the stopped hub
            res, _ = check.check_hub(unit(tmp_path, mosquitto.port), timeout_s=2.0)
            assert res.state == check.OK, res
    finally:
        b.stop()
