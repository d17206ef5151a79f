"""Test helpers that run the real pieces: a hub thread, an agent subprocess, exactly-once checks."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from customs_edge.hub.service import Hub, HubConfig


class HubThread:
    def __init__(self, port: int, db: Path, **kw: Any) -> None:
        self.hub = Hub(HubConfig(port=port, db=db, **kw))
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.hub.run, args=(self.stop_event,), daemon=True)

    def start(self) -> HubThread:
        self.thread.start()
        if not self.hub.ready.wait(10):
            raise AssertionError("hub did not subscribe within 10 s")
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)


def subscribed_at_broker(op: Any, hubs: list[HubThread]) -> None:
    """HubThread.start() returns once each hub has sent its subscriptions, which the broker may take after a message
    published at once (it is then lost to the hub): wait until each hub has counted a malformed ping (`op.pub`
    sends one until then: QoS 0), whose plain subscription the hub sends after its records, status and health
    ones and the unsubscriptions of kept ones."""
    from tests.conftest import wait_for

    def counted() -> bool:
        op.pub(f"{hubs[0].hub.cfg.topic_prefix}/probe/hub/ping", b"x")
        return all(h.hub.pings.refused["malformed"] for h in hubs)

    wait_for(counted, 10, "each hub's subscriptions taken by the broker", interval=0.1)


class AgentProc:
    """`customs-edge run --config FILE` as the field runs it, in its own process."""

    def __init__(self, cfg: dict[str, Any], workdir: Path) -> None:
        self.cfg = cfg
        self.path = workdir / f"{cfg['device_id']}.yaml"
        self.path.write_text(yaml.safe_dump(cfg))
        self.log = workdir / f"{cfg['device_id']}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProc:
        self.proc = subprocess.Popen([sys.executable, "-m", "customs_edge", "run", "--config", str(self.path)],
                                     stderr=self.log.open("ab"))
        return self

    def kill9(self) -> None:
        assert self.proc
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout: float = 10) -> float:
        """SIGTERM; returns how long the agent took to exit."""
        import time

        assert self.proc
        t0 = time.monotonic()
        self.proc.terminate()
        self.proc.wait(timeout)
        return time.monotonic() - t0

    def log_text(self) -> str:
        return self.log.read_text()


def outbox_state(path: Path) -> tuple[int, set[int]]:
    """(last seq given out, seqs still pending) from an outbox file; (0, set()) before it exists."""
    if not Path(path).exists():
        return 0, set()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name='records'").fetchone():
            return 0, set()
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name='records'").fetchone()
        pending = {r[0] for r in db.execute("SELECT seq FROM records")}
        return (row[0] if row else 0), pending
    finally:
        db.close()


def hub_seqs(path: Path, device_id: str) -> tuple[list[int], int]:
    """(seqs stored at the hub for a device, rows stored) from a hub file."""
    db = sqlite3.connect(path)
    try:
        seqs = [r[0] for r in db.execute("SELECT seq FROM records WHERE device_id=? ORDER BY seq", (device_id,))]
        return seqs, len(seqs)
    finally:
        db.close()


def assert_exactly_once(outbox: Path, hub_db: Path, device_id: str) -> int:
    """Every seq the agent gave out is stored at the hub once, with the content it was first sent with:
    none missing, the outbox empty, no seq reused for other content (a conflict), and the hub's own count of
    stored records agreeing (a record stored twice, or a redelivery counted as new, shows there)."""
    last, pending = outbox_state(outbox)
    seqs, _ = hub_seqs(hub_db, device_id)
    assert last > 0, "the agent produced nothing"
    assert not pending, f"{len(pending)} records still in the outbox"
    lost = sorted(set(range(1, last + 1)) - set(seqs))
    assert not lost, f"lost {len(lost)} of {last}: first {lost[:10]}"
    db = sqlite3.connect(f"file:{hub_db}?mode=ro", uri=True)
    try:
        stored, conflicts = db.execute("SELECT stored, conflicts FROM devices WHERE device_id=?",
                                       (device_id,)).fetchone()
        kept = db.execute("SELECT count(*) FROM conflicts WHERE device_id=?", (device_id,)).fetchone()[0]
    finally:
        db.close()
    assert (stored, conflicts, kept) == (last, 0, 0), f"hub counts stored={stored} conflicts={conflicts}/{kept}"
    return last


def rec(seq: object, **over: object) -> dict[str, Any]:
    """One record as an agent sends it; `over` replaces fields (with anything, valid or not)."""
    return {"seq": seq, "ts": 1.7e9, "boot": "boot-a", "mono": float(seq) if isinstance(seq, int) else 1.0,
            "type": "t", "prio": 1, "payload": {}, **over}


def records_msg(device_id: str, batch: str, records: list[dict[str, Any]]) -> str:
    """A records message. json.dumps writes float NaN and infinities as the tokens NaN and Infinity."""
    return json.dumps({"v": 1, "device_id": device_id, "batch": batch, "records": records})


def assert_reload_refused(agent: AgentProc, text: str, reason: str, timeout: float = 30) -> None:
    """Write `text` as the running agent's config and SIGHUP it: the refusal, naming `reason`, is logged,
    the agent stays up and its records keep coming."""
    from tests.conftest import wait_for

    outbox = Path(agent.cfg["outbox"]["path"])
    agent.path.write_text(text)
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config reload refused" in agent.log_text(), timeout, "the refusal in the log")
    assert reason in agent.log_text()
    n = outbox_state(outbox)[0]
    wait_for(lambda: outbox_state(outbox)[0] > n + 10, timeout, "records to keep coming after the refused reload")
    assert agent.proc.poll() is None and "Traceback" not in agent.log_text()
