"""Why a broker connection failed, in words: a refused CONNACK decoded, and a session taken over by
another client with the same client id named as such (mosquitto just closes the older connection)."""

from __future__ import annotations

import logging
import time

import pytest

from customs_edge.core.mqtt import Connected, Event, Lost, MqttLink, refusal
from customs_edge.hub.brokers import Mosquitto

TIMEOUT = 20.0


def first_event(link: MqttLink) -> Event:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if events := link.step(0.2):
            return events[0]
    raise AssertionError("no event from the link")


@pytest.mark.parametrize(("user", "password"), [("unit", "wrong"), (None, None)])
def test_a_refused_connack_says_why_and_what_to_check(mosquitto_with_password: Mosquitto,
                                                      caplog: pytest.LogCaptureFixture,
                                                      user: str | None, password: str | None) -> None:
    link = MqttLink("ore-07", "127.0.0.1", mosquitto_with_password.port, username=user, password=password)
    try:
        with caplog.at_level(logging.WARNING, logger="customs_edge.core.mqtt"):
            ev = first_event(link)
    finally:
        link.close()
    assert isinstance(ev, Lost) and not ev.was_connected
    assert ev.reason.startswith("CONNACK refused: not authorised")
    assert ev.reason.endswith(": check sync.username, sync.password and the broker's ACL")
    assert any(getattr(r, "error", None) == ev.reason for r in caplog.records)


def test_the_right_password_connects(mosquitto_with_password: Mosquitto) -> None:
    link = MqttLink("ore-07", "127.0.0.1", mosquitto_with_password.port, username="unit", password="right")
    try:
        assert isinstance(first_event(link), Connected)
    finally:
        link.close()


def test_every_connack_return_code_has_words() -> None:
    for code in (1, 2, 3, 4, 5):
        assert "refused with code" not in refusal(code)
    assert refusal(4) == "bad user name or password: check sync.username and sync.password"


def test_two_units_with_one_client_id_are_named_and_back_off(mosquitto: Mosquitto,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    links = [MqttLink("ore-07", "127.0.0.1", mosquitto.port, keepalive=30, backoff_min_s=0.2, backoff_max_s=2)
             for _ in range(2)]
    lost: list[Lost] = []
    t0 = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="customs_edge.core.mqtt"):
            while time.monotonic() - t0 < TIMEOUT and not any("another client" in e.reason for e in lost):
                for link in links:
                    lost += [e for e in link.step(0.05) if isinstance(e, Lost)]
    finally:
        for link in links:
            link.close()
    elapsed = time.monotonic() - t0
    named = [e for e in lost if "another client" in e.reason]
    assert named, [e.reason for e in lost]
    assert named[0].reason.startswith("another client connected as 'ore-07': two units share this client id?")
    assert named[0].was_connected
    assert all("Unspecified" not in e.reason for e in lost)
    assert any(r.levelno == logging.ERROR and "another client" in str(getattr(r, "error", "")) for r in caplog.records)
    # no flapping faster than the backoff: each link waited at least backoff_min_s between its attempts
    assert all(link.attempts <= elapsed / 0.2 + 1 for link in links)
