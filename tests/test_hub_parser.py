"""hub/parser.py: the bulk records' parse in a child process. The child's answers give the very Incoming the
worker's own parse gives (clean batches, signed ones, batches only the strict pass takes, refusals); and a child
that dies, hangs, answers garbage or never starts costs nothing but speed: every payload it has not answered is
parsed in the worker, the loss is counted and logged, and a new child takes over."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from customs_edge.core.signing import DeviceKey, parse_public
from customs_edge.hub import intake, parser
from customs_edge.hub.brokers import Mosquitto
from customs_edge.hub.parser import NOT_SUBMITTED, ParseProcess
from tests.conftest import wait_for
from tests.fleet import HubThread, hub_seqs, rec, records_msg
from tests.test_hub_service import Operator
from tests.test_intake_fast import chained, message, record

TOPIC = "customs-edge/v1/d1/records"
PREFIX = "customs-edge/v1"


def outcome(payload: bytes | str, keys: intake.Keys | None = None,
            prepared: intake.Prepared | None = intake.NOT_PREPARED) -> intake.Incoming | tuple[str, str]:
    try:
        return intake.parse(TOPIC, payload, keys, prepared=prepared)
    except intake.Refused as exc:
        return exc.kind, exc.reason


@pytest.fixture
def pp() -> Iterator[ParseProcess]:
    p = ParseProcess()
    assert p.start(), "the parse process started and said it is ready"
    yield p
    p.close()


def pid_of(p: ParseProcess) -> int:
    assert p.pid is not None
    return p.pid


def test_the_child_s_answers_make_what_the_worker_s_own_parse_makes(tmp_path: Path, pp: ParseProcess) -> None:
    from customs_edge.core.wire import encode_batch

    key = DeviceKey.load_or_create(tmp_path / "k")
    keys = {"d1": parse_public(key.public)}
    signed = encode_batch("d1", "b1", chained(50), key)
    cases: list[tuple[bytes | str, intake.Keys | None]] = [
        (signed, keys),  # signed: the signature checked in the worker, on the child's hashes
        (signed.replace(b'"k":7}', b'"k":8}'), keys),  # a changed record: forged
        (encode_batch("d1", "b2", chained(50)), None),
        (encode_batch("d1", "b3", chained(50)).decode(), None),  # a str payload
        (encode_batch("d1", "b4", chained(50)), keys),  # unsigned from a registered device: refused
        (encode_batch("d2", "b5", chained(5)), None),  # another device than the topic's: refused
        (message(record(), record(seq=2, prio=9)), None),  # a record to reject: the strict pass, in the worker
        (message(record('{"a": 1}')), None),  # a payload with spaces: the strict pass stores its canonical text
        (b"not json", None),
    ]
    for payload, _ in cases:
        pp.submit(payload)
    for payload, k in reversed(cases):  # taken in another order than submitted (the lane and bulk slices do)
        prepared = pp.take(payload)
        assert prepared is not NOT_SUBMITTED
        # the agent's batches made there; the rest (None) left to the strict pass here
        assert isinstance(prepared, intake.Prepared) == (cases.index((payload, k)) < 6)
        assert outcome(payload, k, prepared) == outcome(payload, k)
    assert pp.parsed == len(cases) and pp.restarts == 0
    assert isinstance(outcome(signed, keys), intake.Incoming)
    assert outcome(cases[1][0], keys)[0] == "forged"  # type: ignore[index]
    assert pp.take(cases[2][0]) is NOT_SUBMITTED  # taken once
    assert pp.take(b"never submitted") is NOT_SUBMITTED


def test_a_child_killed_mid_stream_costs_a_parse_in_the_worker_and_a_new_child_takes_over(
        pp: ParseProcess, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from customs_edge.core.wire import encode_batch

    monkeypatch.setattr(parser, "RESTART_S", 0.0)
    first = [encode_batch("d1", f"a{i}", chained(20)) for i in range(3)]
    for payload in first:
        pp.submit(payload)
    assert pp.take(first[0]) is not NOT_SUBMITTED
    os.kill(pid_of(pp), signal.SIGSTOP)  # nothing more is answered: the rest is queued when it dies
    killed = pid_of(pp)
    more = [encode_batch("d1", f"b{i}", chained(20)) for i in range(3)]
    for payload in more:
        pp.submit(payload)
    with caplog.at_level(logging.ERROR, "customs_edge.hub.parser"):
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: pp.restarts == 1, 10, "the death noticed")
    assert "parse process lost" in caplog.text
    for payload in first[1:] + more:  # unanswered or answered: either way each parses, here or from the answer
        prepared = pp.take(payload)
        assert prepared is NOT_SUBMITTED or payload in first  # queued to the stopped child: never answered
        assert outcome(payload, None, prepared) == outcome(payload)
    later = encode_batch("d1", "c", chained(20))
    pp.submit(later)  # a new child
    assert pid_of(pp) != killed
    parsed = pp.parsed
    assert pp.take(later) is not NOT_SUBMITTED and pp.parsed == parsed + 1


def test_a_hung_child_is_killed_and_its_messages_parsed_in_the_worker(pp: ParseProcess,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from customs_edge.core.wire import encode_batch

    monkeypatch.setattr(parser, "HANG_S", 0.5)
    hung = pid_of(pp)
    os.kill(hung, signal.SIGSTOP)
    payload = encode_batch("d1", "h", chained(20))
    pp.submit(payload)
    assert pp.take(payload) is NOT_SUBMITTED
    assert pp.restarts == 1
    wait_for(lambda: not Path(f"/proc/{hung}").exists() or "Z" in Path(f"/proc/{hung}/stat").read_text().split()[2],
             10, "the hung child killed")


def test_a_child_that_answers_garbage_is_dropped(tmp_path: Path) -> None:
    script = tmp_path / "liar.py"  # says it is ready, then answers every frame with bytes that are no MessagePack
    script.write_text("import struct, sys\n"
                      "out, inp = sys.stdout.buffer, sys.stdin.buffer\n"
                      "out.write(struct.pack('<IQ', 0, 2**64 - 1)); out.flush()\n"
                      "while head := inp.read(12):\n"
                      "    size, ticket = struct.unpack('<IQ', head); inp.read(size)\n"
                      "    out.write(struct.pack('<IQ', 1, ticket) + b'\\xc1'); out.flush()\n")
    pp = ParseProcess([sys.executable, str(script)])
    try:
        assert pp.start()
        pp.submit(b'{"v":1}')
        assert pp.take(b'{"v":1}') is NOT_SUBMITTED  # another object than the one submitted
        payload = message(record())
        pp.submit(payload)
        assert pp.take(payload) is NOT_SUBMITTED and pp.restarts == 1
    finally:
        pp.close()


def test_a_child_that_cannot_start_leaves_the_parse_in_the_worker(caplog: pytest.LogCaptureFixture) -> None:
    pp = ParseProcess(["/nonexistent/python"])
    with caplog.at_level(logging.ERROR, "customs_edge.hub.parser"):
        assert not pp.start()
    assert "parse process did not start" in caplog.text
    payload = message(record())
    pp.submit(payload)  # no child, none started again within RESTART_S: nothing queued, nothing raised
    assert pp.take(payload) is NOT_SUBMITTED and pp.submitted == 0
    pp.close()


def test_close_ends_the_child(pp: ParseProcess) -> None:
    proc = pp._proc
    assert proc is not None and proc.poll() is None
    pp.close()
    assert proc.poll() is not None
    payload = message(record())
    pp.submit(payload)  # closed: nothing starts again
    assert pp.take(payload) is NOT_SUBMITTED and pp.pid is None


def bulk(device_id: str, k: int) -> str:
    """A device's k-th batch of 50 records, over parser.MIN_BYTES (a backlog's batch: what goes to the child)."""
    msg = records_msg(device_id, f"{device_id}-{k}", [rec(s, payload={"note": "x" * 400})
                                                      for s in range(50 * k + 1, 50 * k + 51)])
    assert len(msg) >= parser.MIN_BYTES
    return msg


@pytest.mark.broker
def test_a_hub_with_its_parse_process_stores_and_acks_everything_through_a_kill_of_it(
        tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parser, "RESTART_S", 0.0)
    db = tmp_path / "hub.db"
    hub = HubThread(mosquitto.port, db, client_id="hub-parse", parse_process=True)
    h = hub.hub
    op = Operator(mosquitto.port)
    acked: dict[str, set[int]] = {}

    def on_ack(_c: Any, _u: Any, m: Any) -> None:
        acked.setdefault(m.topic.split("/")[-2], set()).update(
            s for lo, hi in json.loads(m.payload)["ranges"] for s in range(lo, hi + 1))

    op.c.on_message = on_ack
    devices = ("dev-a", "dev-b", "dev-c")

    def send(rounds: range) -> None:  # batches of 50 records over parser.MIN_BYTES, as a backlog's
        for k in rounds:
            for d in devices:
                op.c.publish(f"{PREFIX}/{d}/records", bulk(d, k), 1)

    def all_acked(n: int) -> bool:
        return all(len(acked.get(d, ())) == 50 * n for d in devices)

    try:
        hub.start()
        op.sub(f"{PREFIX}/+/ack")
        send(range(10))
        wait_for(lambda: all_acked(10), 20, "the first rounds acked")
        assert h.parser is not None and h.parser.parsed >= 10 * len(devices)  # the child parsed the bulk
        os.kill(pid_of(h.parser), signal.SIGKILL)
        send(range(10, 20))  # parsed in the worker until a new child runs, then by it
        wait_for(lambda: all_acked(20), 20, "every record acked")
        assert h.parser.restarts == 1
        parsed = h.parser.parsed
        send(range(20, 22))
        wait_for(lambda: all_acked(22), 20, "the later rounds acked")
        assert h.parser.parsed > parsed  # by the new child
        submitted = h.parser.submitted
        op.c.publish(f"{PREFIX}/dev-a/records", records_msg("dev-a", "dev-a-small", [rec(22 * 50 + 1)]), 1)
        wait_for(lambda: 22 * 50 + 1 in acked["dev-a"], 20, "the small batch acked")
        assert h.parser.submitted == submitted  # under MIN_BYTES: parsed in the worker, never a hand-off
    finally:
        op.close()
        hub.stop()
    for d in devices:  # each record once
        n = 22 * 50 + (d == "dev-a")
        assert hub_seqs(db, d) == (list(range(1, n + 1)), n)
