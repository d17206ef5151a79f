"""`customs-edge watch`: each record once (a batch the agent resends is not printed again), alerts marked,
`--json` one object per line, `--alerts` only priority 3, nothing published, and Ctrl-C ends it with exit 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import IO

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from customs_edge.cli.watch import SeenSeqs
from customs_edge.hub.brokers import Mosquitto
from tests.conftest import wait_for
from tests.fleet import rec, records_msg

pytestmark = pytest.mark.broker

RECORDS = "customs-edge/v1/scale-t1/records"


class Watch:
    """`customs-edge watch --device scale-t1 --broker 127.0.0.1:PORT [extra]`, its output collected by a thread."""

    def __init__(self, port: int, *extra: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "customs_edge", "watch", "--device", "scale-t1",
                                      "--broker", f"127.0.0.1:{port}", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._collect, args=(stream, sink), daemon=True).start()
        wait_for(lambda: any(line.startswith("watching scale-t1") for line in self.err), 30,
                 "watch to subscribe")

    @staticmethod
    def _collect(stream: IO[str] | None, sink: list[str]) -> None:
        assert stream is not None
        for line in stream:
            sink.append(line.rstrip("\n"))

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def publisher(mosquitto: Mosquitto) -> Iterator[paho.Client]:
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    c.connect("127.0.0.1", mosquitto.port)
    c.loop_start()
    yield c
    c.loop_stop()
    c.disconnect()


def send(c: paho.Client, topic: str, payload: str) -> None:
    c.publish(topic, payload, qos=1).wait_for_publish(10)


def test_watch_prints_each_record_once_when_a_batch_is_resent_and_exits_0_on_ctrl_c(
        mosquitto: Mosquitto, publisher: paho.Client) -> None:
    w = Watch(mosquitto.port)
    try:
        first = [rec(1, type="weighing", payload={"gross_kg": 12.5}), rec(2, type="fever", prio=3,
                                                                         payload={"temp_c": 38.9})]
        send(publisher, RECORDS, records_msg("scale-t1", "b1", first))
        send(publisher, RECORDS, records_msg("scale-t1", "b1", first))  # the same batch, resent
        send(publisher, RECORDS, records_msg("scale-t1", "b2", [*first, rec(3, type="summary")]))  # partly new
        wait_for(lambda: any("#3 " in line for line in w.out), 30, "record 3")
        assert w.interrupt() == 0
        assert [line.split()[1] for line in w.out] == ["#1", "#2", "#3"], w.out
        assert "!! ALERT" in w.out[1] and "fever" in w.out[1] and '"temp_c":38.9' in w.out[1]
        assert "!!" not in w.out[0] and "EVENT" in w.out[0] and "weighing" in w.out[0]
        assert "Traceback" not in "\n".join(w.err)
    finally:
        w.kill()


def test_watch_json_alerts_only_and_a_bad_message_is_one_line(mosquitto: Mosquitto, publisher: paho.Client) -> None:
    w = Watch(mosquitto.port, "--json", "--alerts")
    try:
        send(publisher, RECORDS, "{not json")
        batch = [rec(5, payload={"n": 1}), rec(6, type="radiation", prio=3, payload={"cps": 900})]
        send(publisher, RECORDS, records_msg("scale-t1", "b1", batch))
        lane = [rec(7, type="radiation", prio=3, payload={"cps": 950})]  # the alert lane's topic (agent/sync.py)
        send(publisher, RECORDS.replace("/records", "/alerts"), records_msg("scale-t1", "b2", lane))
        wait_for(lambda: len(w.out) == 2, 30, "both alerts")
        wait_for(lambda: any("unreadable message" in line for line in w.err), 30, "the bad message named")
        assert w.interrupt() == 0
        assert [json.loads(line) for line in w.out] == [{"device_id": "scale-t1", "prev": None, **r}
                                                         for r in (batch[1], lane[0])]
    finally:
        w.kill()


def test_watch_publishes_nothing(mosquitto: Mosquitto, publisher: paho.Client) -> None:
    """Read-only: no ack, no status, nothing at all under the prefix while it watches a batch go by."""
    seen: list[str] = []
    spy = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    spy.on_message = lambda _c, _u, m: seen.append(m.topic)
    spy.connect("127.0.0.1", mosquitto.port)
    spy.subscribe("customs-edge/#", 1)
    spy.loop_start()
    w = Watch(mosquitto.port)
    try:
        send(publisher, RECORDS, records_msg("scale-t1", "b1", [rec(1)]))
        wait_for(lambda: w.out, 30, "the record")
        assert w.interrupt() == 0
        wait_for(lambda: RECORDS in seen, 30, "the spy to see the batch")
        assert set(seen) == {RECORDS}
    finally:
        w.kill()
        spy.loop_stop()
        spy.disconnect()


def test_seen_seqs_merges_ranges_and_refuses_repeats() -> None:
    s = SeenSeqs()
    assert [s.add(q) for q in (5, 3, 4, 4, 10, 6, 9, 3, 1)] == [True, True, True, False, True, True, True, False,
                                                                  True]
    assert s.ranges == [[1, 1], [3, 6], [9, 10]]


def test_a_record_is_one_line_whatever_its_payload_and_type_hold() -> None:
    from customs_edge.cli.watch import record_line
    from customs_edge.core.wire import WireRecord

    line = record_line(WireRecord.model_validate(rec(7, type="x\nlevel=error", prio=3,
                                                     payload={"note": "a\u2028b\nc", "t": "38 °C", "pad": "y" * 200})))
    assert len(line.splitlines()) == 1 and line.isprintable()
    assert "!! ALERT" in line and "x\\nlevel=error" in line and line.endswith("…")


def test_watch_with_the_broker_down_says_so_and_exits_0_on_ctrl_c() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "customs_edge", "watch", "--device", "scale-t1",
                             "--broker", f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert f"broker 127.0.0.1:{port}: connect: [Errno 111] Connection refused; retrying" in line, line
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and out == "" and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
