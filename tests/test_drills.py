"""Fault drills, end to end: real scale simulator -> agent process -> mosquitto -> hub.

Each drill breaks something while records flow, then stops production, lets the outbox drain and
checks by seq: every record the agent gave a seq is stored at the hub exactly once (0 lost, 0 dups).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from customs_edge.cli import certs
from customs_edge.hub.brokers import Mosquitto
from customs_edge.simulators.base import Endpoints
from customs_edge.simulators.scale import ScaleSim, ScaleWorld
from tests.conftest import Relay, need_mosquitto, unit_dict, wait_for
from tests.fleet import AgentProc, HubThread, assert_exactly_once, hub_seqs, outbox_state
from tests.test_tls import Broker, tls_keys

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@dataclass
class Rig:
    tmp: Path
    broker: Mosquitto
    hub: HubThread
    sim: Endpoints
    agent: AgentProc

    @property
    def outbox(self) -> Path:
        return Path(self.agent.cfg["outbox"]["path"])

    @property
    def hub_db(self) -> Path:
        return self.tmp / "hub.db"

    def produced(self) -> int:
        return outbox_state(self.outbox)[0]

    def wait_produced(self, more_than: int, timeout: float = 10) -> int:
        return int(wait_for(lambda: (n := self.produced()) > more_than and n, timeout, f"> {more_than} records"))

    def drain_and_check(self) -> int:
        since = self.produced()
        self.sim.stop()  # production stops (the driver reports a fault record, which must arrive too)

        def drained() -> bool:
            last, pending = outbox_state(self.outbox)
            return (not pending and len(hub_seqs(self.hub_db, self.agent.cfg["device_id"])[0]) >= last
                    and fault_stored(self.hub_db, self.agent.cfg["device_id"], since))

        wait_for(drained, 45, "the outbox to drain to the hub, the driver's fault record last", interval=0.2)
        self.agent.terminate()
        self.hub.stop()
        return assert_exactly_once(self.outbox, self.hub_db, self.agent.cfg["device_id"])


def fault_stored(hub_db: Path, device_id: str, after_seq: int) -> bool:
    """The hub stored a driver_fault record the agent committed after seq `after_seq` (the end of production)."""
    db = sqlite3.connect(f"file:{hub_db}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute("SELECT 1 FROM records WHERE device_id=? AND type='driver_fault' AND seq>?",
                          (device_id, after_seq)).fetchone() is not None
    finally:
        db.close()


def make_rig(tmp_path: Path, via_relay: bool = False, tls: bool = False) -> Iterator[Rig]:
    """tls: the shipped configs/broker config (mutual TLS, the ACL), the hub and the agent with certificates."""
    need_mosquitto()
    hub_kw: dict[str, str] = {}
    unit_kw: dict[str, dict[str, str]] = {}
    if tls:
        pki = tmp_path / "pki"
        certs.init_ca(pki)
        for name, role in (("broker", "broker"), ("hub-1", "hub"), ("scale-t1", "device")):
            certs.issue(pki, name, role)  # type: ignore[arg-type]
        broker = Broker(tmp_path / "broker", pki).mq.start()
        hub_kw, unit_kw = tls_keys(pki, "hub-1"), {"sync": tls_keys(pki, "scale-t1")}
    else:
        broker = Mosquitto(tmp_path / "broker", persistence=True).start()
    sim = Endpoints(ScaleSim(ScaleWorld(seed=5, cycle_s=1.0), rate_hz=50))
    urls = sim.start()
    relay = Relay(broker.port) if via_relay else None
    hub = HubThread(broker.port, tmp_path / "hub.db", **hub_kw).start()
    agent = AgentProc(unit_dict(tmp_path, urls["socket"], relay.port if relay else broker.port, **unit_kw),
                      tmp_path).start()
    rig = Rig(tmp_path, broker, hub, sim, agent)
    rig.relay = relay  # type: ignore[attr-defined]
    try:
        yield rig
    finally:
        if agent.proc and agent.proc.poll() is None:
            agent.proc.kill()
        hub.stop()
        sim.stop()
        if relay:
            relay.close()
        broker.stop()


# every drill runs twice: on a plain loopback broker, and over mutual TLS with the shipped broker config
# (certificates, the ACL, client ids bound to them)
TRANSPORTS = ["plain", "mtls"]


@pytest.fixture(params=TRANSPORTS)
def rig(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Rig]:
    yield from make_rig(tmp_path, tls=request.param == "mtls")


@pytest.fixture(params=TRANSPORTS)
def relay_rig(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Rig]:
    yield from make_rig(tmp_path, via_relay=True, tls=request.param == "mtls")


def test_broker_clean_restart(rig: Rig) -> None:
    n = rig.wait_produced(20)
    rig.broker.stop()
    n = rig.wait_produced(n + 20)  # the agent keeps reading while the broker is down
    rig.broker.start()
    rig.wait_produced(n + 20)
    assert rig.drain_and_check() > 60


def test_broker_kill_9_and_restart(rig: Rig) -> None:
    n = rig.wait_produced(40)
    rig.broker.kill9()  # whatever it had queued and PUBACKed is gone with it
    n = rig.wait_produced(n + 20)
    rig.broker.start()
    rig.wait_produced(n + 20)
    assert rig.drain_and_check() > 80


def test_agent_kill_9_and_restart_while_the_broker_is_down(rig: Rig) -> None:
    n = rig.wait_produced(20)
    rig.broker.kill9()
    n = rig.wait_produced(n + 20)
    rig.agent.kill9()
    rig.agent.start()
    n2 = rig.wait_produced(n + 20)  # the restarted agent continues the sequence, broker still down
    rig.broker.start()
    rig.wait_produced(n2 + 20)
    assert rig.drain_and_check() > n2


def test_half_open_link(relay_rig: Rig) -> None:
    """The link stays half-open until the agent has detected it, failed to reconnect through it twice and
    produced 200 more records: the outage is bounded by the unit's own events, not by a clock."""
    rig = relay_rig
    relay: Relay = rig.relay  # type: ignore[attr-defined]
    n = rig.wait_produced(20)
    relay.blackhole()  # TCP stays up, nothing gets through either way

    def after_detection() -> str:
        return rig.agent.log_text().partition("link presumed half-open")[2]

    # detected by the deadline of a batch the broker never PUBACKed (ack_timeout_s, 4 s), not by luck
    wait_for(after_detection, 30, "the half-open link detected")
    wait_for(lambda: after_detection().count("broker connect failed") >= 2, 30,
             "two reconnects failed through the black hole")
    rig.wait_produced(n + 200, timeout=30)  # production must not depend on the link
    relay.heal()
    assert rig.drain_and_check() > n + 200
    assert "broker connected" in after_detection()


def test_agent_restart_keeps_seq_monotonic(rig: Rig) -> None:
    n = rig.wait_produced(20)
    rig.agent.terminate()
    last_before = rig.produced()
    assert last_before >= n
    rig.agent.start()
    rig.wait_produced(last_before + 20)
    seqs, _ = hub_seqs(rig.hub_db, rig.agent.cfg["device_id"])
    assert rig.drain_and_check() > last_before + 20
    assert seqs == sorted(set(seqs))


@pytest.mark.parametrize("mode", ["hub", "broker"])
def test_broker_kill_9_while_the_hub_is_offline(tmp_path: Path, mode: str) -> None:
    """Why the hub's ack, not the broker's PUBACK, releases records: the broker queues records for the
    offline hub and acknowledges them; a kill -9 loses that queue. In `hub` mode the agent still holds
    them and resends; in `broker` mode they were already deleted and are gone."""
    need_mosquitto()
    broker = Mosquitto(tmp_path / "broker", persistence=True).start()
    hub_db = tmp_path / "hub.db"
    HubThread(broker.port, hub_db, client_id="hub-p").start().stop()  # a persistent session, now offline
    sim = Endpoints(ScaleSim(ScaleWorld(seed=6, cycle_s=1.0), rate_hz=50))
    urls = sim.start()
    agent = AgentProc(unit_dict(tmp_path, urls["socket"], broker.port, sync={"ack_mode": mode}), tmp_path).start()
    outbox = Path(agent.cfg["outbox"]["path"])
    hub: HubThread | None = None
    try:
        wait_for(lambda: outbox_state(outbox)[0] > 60, 10, "records while the hub is offline")
        if mode == "hub":
            # the hub stays away until the agent published a PUBACKed batch again: ack_timeout_s has passed in
            # the agent's own terms, so by then it would have mistaken the missing hub for a dead link (checked
            # below: no "presumed half-open")
            wait_for(lambda: "hub has not acked" in agent.log_text(), 30, "a batch resent to the missing hub")
        else:
            wait_for(lambda: (s := outbox_state(outbox))[0] - len(s[1]) > 20, 10,
                     "> 20 records deleted on the broker's PUBACK")
        broker.kill9()
        broker.start()
        hub = HubThread(broker.port, hub_db, client_id="hub-p").start()
        since = outbox_state(outbox)[0]
        sim.stop()  # production stops: the driver's fault record is the last one
        wait_for(lambda: not outbox_state(outbox)[1] and fault_stored(hub_db, agent.cfg["device_id"], since), 45,
                 "the outbox to drain, the driver's fault record stored at the hub", interval=0.2)
        agent.terminate()
        hub.stop()
        last, _ = outbox_state(outbox)
        seqs, _ = hub_seqs(hub_db, agent.cfg["device_id"])
        missing = set(range(1, last + 1)) - set(seqs)
        if mode == "hub":
            assert not missing and len(seqs) == last
            log = agent.log_text()
            assert "presumed half-open" not in log and "hub has not acked" in log
        else:
            assert len(missing) > 20, "broker mode should lose what the killed broker had acknowledged"
    finally:
        if agent.proc and agent.proc.poll() is None:
            agent.proc.kill()
        if hub:
            hub.stop()
        sim.stop()
        broker.stop()
