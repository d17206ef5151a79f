"""The MQTT link's connect/backoff state machine, and client ids, without a broker: a closed port."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from customs_edge.agent.config import SyncConfig
from customs_edge.agent.sync import Sync
from customs_edge.core import mqtt
from customs_edge.core.mqtt import Lost, MqttLink, install_client_id
from customs_edge.hub.brokers import free_port
from tests.conftest import wait_for
from tests.fakes import MemOutbox

WINDOW_S = 2.0
MIN_S, MAX_S = 0.2, 0.8


def test_attempts_against_a_closed_port_follow_the_backoff_schedule() -> None:
    link = MqttLink("t", "127.0.0.1", free_port(), backoff_min_s=MIN_S, backoff_max_s=MAX_S, rng=random.Random(1))
    steps, events = 0, []
    t0 = time.monotonic()
    while time.monotonic() - t0 < WINDOW_S:
        events += link.step(10.0)  # a long timeout: the link itself waits until the next attempt is due
        steps += 1
    link.close()
    assert link.attempts >= 2 and link.connects == 0
    assert link.attempts <= WINDOW_S / MIN_S + 1  # never faster than the shortest delay
    assert steps <= 2 * link.attempts + 1  # one step waits, the next attempts: no spinning in between
    assert events and all(isinstance(e, Lost) and not e.was_connected for e in events)
    assert len(events) == link.attempts


def test_sync_with_the_broker_down_sleeps_between_attempts(tmp_path: Path) -> None:
    """The defect: the wake event was cleared only while connected, so one commit made the sync thread
    spin (~98 % of a core) until the broker came back. bench/idle.py measures the CPU."""
    cfg = SyncConfig(port=free_port(), backoff_min_s=MIN_S, backoff_max_s=MAX_S)
    sync = Sync("dev", MemOutbox(), cfg, outbox_path=tmp_path / "outbox.db")
    iterations = 0
    real_step = sync.step

    def counted() -> None:
        nonlocal iterations
        iterations += 1
        real_step()

    sync.step = counted  # type: ignore[method-assign]
    stop = threading.Event()
    thread = threading.Thread(target=sync.run, args=(stop,))
    wakes = 5
    t0 = time.monotonic()
    thread.start()
    try:
        # records committed while the broker is down, as the core does: each wake comes in the backoff wait
        # after a failed attempt, and the window runs until the next attempt (where the defect spun)
        def next_attempt() -> None:
            failures = sync.stats.connect_failures
            wait_for(lambda: sync.stats.connect_failures > failures, 10, "the next connect attempt")

        for _ in range(wakes):
            next_attempt()
            sync.wake.set()
        next_attempt()
    finally:
        stop.set()
        thread.join(5)
    window_s = time.monotonic() - t0
    attempts = sync.stats.connect_failures
    assert attempts >= 2
    # each step either waits (at most IDLE_WAIT_S, less when woken) or makes an attempt
    bound = (window_s + 1) / Sync.IDLE_WAIT_S + 2 * attempts + wakes + 2
    assert iterations <= bound, f"{iterations} loop iterations in {window_s:.1f} s with the broker down"


def test_client_ids_are_unique_per_install_and_stable(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "outbox.db", tmp_path / "b" / "outbox.db"
    assert install_client_id("ce-dev", a) != install_client_id("ce-dev", b)
    assert install_client_id("ce-dev", a) == install_client_id("ce-dev", a)
    assert install_client_id("ce-dev", a).startswith("ce-dev-")


def test_without_a_machine_id_a_random_id_is_kept_next_to_the_anchor(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqtt, "MACHINE_ID_FILES", (tmp_path / "no-such-file",))
    anchor = tmp_path / "outbox.db"
    first = install_client_id("ce-dev", anchor)
    kept = tmp_path / "outbox.db.install-id"
    assert kept.exists() and install_client_id("ce-dev", anchor) == first  # a restart keeps it
    kept.unlink()  # another install (a copied image without the id file) gets another id
    assert install_client_id("ce-dev", anchor) != first
