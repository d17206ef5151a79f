"""Commands to a running unit process over a real mosquitto: ping from the CLI, replays, expiry, retained."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cmdtools import Operator, UnitRig, cli, command, unit_rig
from tests.conftest import wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[UnitRig]:
    yield from unit_rig(tmp_path)


def sync_stats(op: Operator) -> dict[str, int]:
    return dict(op.call("status")["result"]["sync"])


def test_cmd_ping_from_the_cli(rig: UnitRig, capsys: pytest.CaptureFixture[str]) -> None:
    before = time.time()
    code, out, _ = cli(capsys, "cmd", "scale-t1", "ping", rig.broker_flag())
    reply = json.loads(out)
    assert code == 0 and reply["ok"] is True and reply["result"]["pong"] >= before - 5


def test_cmd_without_an_answer_names_the_command_and_the_fix(rig: UnitRig, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "cmd", "no-such-unit", "ping", rig.broker_flag(), "--timeout", "2")
    assert code == 1 and "ping" in err and "no reply within 2 s" in err and "online" in err


def test_a_replayed_command_is_refused_and_counted_also_after_a_restart(rig: UnitRig) -> None:
    op = Operator(rig.broker.port, "scale-t1")
    try:
        ping = command("ping")
        op.send(ping)
        assert op.reply(ping["id"])["ok"] is True
        op.replies.clear()
        op.send(ping)
        again = op.reply(ping["id"])
        assert again["ok"] is False and "replayed" in again["error"]
        assert sync_stats(op)["commands_replayed"] == 1
        # the ids outlive the process
        rig.agent.terminate()
        rig.agent.start()
        op.replies.clear()
        op.send(ping)
        after = op.reply(ping["id"], timeout=60)
        assert after["ok"] is False and "replayed" in after["error"]
    finally:
        op.close()


def test_an_expired_command_is_refused_and_counted(rig: UnitRig) -> None:
    op = Operator(rig.broker.port, "scale-t1")
    try:
        old = command("ping", ts=time.time() - 1000, expires=time.time() - 700)
        op.send(old)
        reply = op.reply(old["id"])
        assert reply["ok"] is False and reply["error"].startswith("expired")
        stale = command("ping", ts=time.time() - 400)  # no expiry given: ts + 300 s by default
        op.send(stale)
        assert op.reply(stale["id"])["error"].startswith("expired")
        assert sync_stats(op)["commands_expired"] == 2
    finally:
        op.close()


def test_an_invalid_command_is_refused_and_its_reply_echoes_the_id(rig: UnitRig) -> None:
    op = Operator(rig.broker.port, "scale-t1")
    try:
        bad = command("format_disk")
        op.send(bad)
        reply = op.reply(bad["id"])
        assert reply["ok"] is False and reply["error"].startswith("bad command: cmd:")
        no_ts = command("ping")
        del no_ts["ts"]
        op.send(no_ts)
        assert "ts: Field required" in op.reply(no_ts["id"])["error"]
    finally:
        op.close()


def test_a_retained_command_is_ignored(tmp_path: Path) -> None:
    gen = unit_rig(tmp_path, start=False)
    rig = next(gen)
    op = Operator(rig.broker.port, "scale-t1")
    try:
        retained = command("resend")
        op.send(retained, retain=True)  # left on the broker before the unit ever connected
        rig.agent.start()
        op.wait_online()
        stats = sync_stats(op)  # answered after the retained copy the subscription brought
        assert stats["commands_retained"] == 1 and stats["commands"] == 1
        assert all(r["id"] != retained["id"] for r in op.replies)
        wait_for(lambda: "retained command ignored" in rig.agent.log_text(), 10, "the warning in the log")
    finally:
        op.close()
        gen.close()


def test_the_seen_ids_are_bounded_and_outlive_expired_commands(tmp_path: Path) -> None:
    from customs_edge.agent.commands import SeenCommands
    from customs_edge.core.wire import Command

    path = tmp_path / "outbox.db.commands.json"
    seen = SeenCommands(path)
    now = 1_000_000.0
    for i in range(SeenCommands.MAX_IDS + 5):
        assert seen.check(Command(id=f"c{i}", cmd="ping", ts=now), now=now) is None
    again = SeenCommands(path)  # as after a restart
    assert len(again.ids) == SeenCommands.MAX_IDS and "c0" not in again.ids and "c5" in again.ids
    assert (again.check(Command(id="c5", cmd="ping", ts=now), now=now) or "").startswith("replayed")
    # an id is forgotten only once its command would be refused as expired anyway
    later = now + SeenCommands.KEEP_S + 1
    assert again.check(Command(id="new", cmd="ping", ts=later), now=later) is None
    assert "c5" not in again.ids
    assert (again.check(Command(id="c5", cmd="ping", ts=now), now=later) or "").startswith("expired")
