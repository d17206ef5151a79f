"""`customs-edge watch --config FILE` (or `--device ID --broker HOST:PORT`): a unit's records and alerts as
they are produced, one line each, like `esphome logs`.

It subscribes to the unit's records topics (`records`, and `alerts` where its ALERT records go) and to the
hub's alert topic for it, and only listens: it publishes nothing and never acks (hub acks go on another topic;
the agent deletes a record only on the hub's ack). The agent resends a batch until the hub acks it (an alert
batch alternately on both topics), so each seq is printed once per session.

With the shipped TLS broker config (configs/broker), the unit's own certificate is never used: the broker
takes a certificate's name as client id, so it would take the running unit's session over. An operator's
(op-*) reads status, health and alerts but not records (`--alerts` then shows only the hub's alerts): watch
records with a read identity the ACL lets read them (a hub's, or a `user` block with
`topic read customs-edge/v1/+/records` and `.../+/alerts`), given with --tls-cert/--tls-key.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from customs_edge.cli.status import OWN_IDENTITY, add_identity_options, own_identity, quiet_link, with_identity
from customs_edge.core import logs
from customs_edge.core.mqtt import Connected, Lost, Message
from customs_edge.core.records import Priority
from customs_edge.core.wire import ALERT_LANE, Alert, Batch, WireRecord, topic

SUMMARY_CHARS = 100
ALERT_MARK = "!!"


class SeenSeqs:
    """Seqs already printed, as sorted disjoint inclusive ranges: a unit's seqs come nearly in order (resends
    repeat old ones), so the list stays short however long the session."""

    def __init__(self) -> None:
        self.ranges: list[list[int]] = []

    def add(self, seq: int) -> bool:
        """True the first time `seq` is seen."""
        r = self.ranges
        i = bisect.bisect_right(r, seq, key=lambda x: x[0]) - 1
        if i >= 0 and r[i][1] >= seq:
            return False
        left = i >= 0 and r[i][1] == seq - 1
        right = i + 1 < len(r) and r[i + 1][0] == seq + 1
        if left and right:
            r[i][1] = r[i + 1][1]
            del r[i + 1]
        elif left:
            r[i][1] = seq
        elif right:
            r[i + 1][0] = seq
        else:
            r.insert(i + 1, [seq, seq])
        return True


def record_line(rec: WireRecord) -> str:
    """`HH:MM:SS.mmm #seq PRIORITY type {payload...}`, alerts marked; escaped: one record, one line."""
    when = datetime.fromtimestamp(rec.ts).strftime("%H:%M:%S.%f")[:-3]
    prio = Priority(rec.prio).name
    mark = f"{ALERT_MARK} {prio}" if rec.prio == Priority.ALERT else prio
    summary = json.dumps(rec.payload, ensure_ascii=False, separators=(",", ":"))
    if not summary.isprintable():  # a U+2028 or the like in a string: JSON's \uXXXX form keeps it on one line
        summary = json.dumps(rec.payload, separators=(",", ":"))
    if len(summary) > SUMMARY_CHARS:
        summary = summary[:SUMMARY_CHARS - 1] + "…"
    return f"{when} #{rec.seq:<7} {mark:<11} {logs.escape(rec.type):<20} {summary}"


class Watcher:
    """Turns messages into lines: `handle(topic, payload)` returns what to print (nothing for a resend)."""

    def __init__(self, records_topic: str, alert_topic: str, *, as_json: bool, alerts_only: bool) -> None:
        self.records_topic, self.alert_topic = records_topic, alert_topic
        self.as_json, self.alerts_only = as_json, alerts_only
        self.seen = SeenSeqs()
        self.unreadable = 0

    def handle(self, t: str, payload: bytes) -> tuple[list[str], list[str]]:
        """(lines for stdout, lines for stderr)."""
        try:
            if t == self.alert_topic:
                alert = Alert.model_validate_json(payload)
                text = (json.dumps({"hub_alert": alert.model_dump()}) if self.as_json else
                        f"{datetime.fromtimestamp(alert.ts).strftime('%H:%M:%S.%f')[:-3]} hub {ALERT_MARK} "
                        f"{alert.alert}: seqs {alert.seqs} stored with other content "
                        f"({alert.conflicts} so far, hub {logs.escape(alert.hub)})")
                return [text], []
            batch = Batch.model_validate_json(payload)
        except ValidationError as exc:
            self.unreadable += 1
            return [], [f"unreadable message on {logs.escape(t)}: {exc.error_count()} problem(s), first: "
                        f"{logs.escape(str(exc.errors()[0]['msg']))}"]
        out = []
        for rec in batch.records:
            if not self.seen.add(rec.seq) or (self.alerts_only and rec.prio != Priority.ALERT):
                continue
            out.append(json.dumps({"device_id": batch.device_id, **rec.model_dump()}) if self.as_json
                       else record_line(rec))
        return out, []


def run(device_id: str, host: str, port: int, *, prefix: str, credentials: dict[str, Any],
        connect_timeout_s: float, as_json: bool, alerts_only: bool, stop: threading.Event,
        out: Callable[[str], None], err: Callable[[str], None]) -> int:
    t_records, t_alert = topic(prefix, device_id, "records"), topic(prefix, device_id, "alert")
    watcher = Watcher(t_records, t_alert, as_json=as_json, alerts_only=alerts_only)
    where = f"{host}:{port}"
    with quiet_link(f"customs-edge-watch-{os.getpid()}", host, port, credentials=credentials,
                    connect_timeout_s=connect_timeout_s) as link:
        def end(*_: Any) -> None:  # Ctrl-C: leave the loop, disconnect cleanly, exit 0
            stop.set()
            link.waker.set()

        signal.signal(signal.SIGINT, end)
        signal.signal(signal.SIGTERM, end)
        while not stop.is_set():
            for ev in link.step(0.5):
                if isinstance(ev, Connected):
                    link.subscribe(t_records)
                    link.subscribe(topic(prefix, device_id, ALERT_LANE))
                    link.subscribe(t_alert)
                    err(f"watching {device_id} on {where} (Ctrl-C to stop)")
                elif isinstance(ev, Lost):
                    err(f"broker {where}: {logs.escape(ev.reason)}; retrying")
                elif isinstance(ev, Message):
                    lines, problems = watcher.handle(ev.topic, ev.payload)
                    for line in lines:
                        out(line)
                    for line in problems:
                        err(line)
    return 0


def _broker(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: write HOST:PORT, e.g. 127.0.0.1:1883")
    return host, int(port)


def cmd_watch(args: argparse.Namespace) -> int:
    if (args.config is None) == (args.device is None) or (args.tls_cert is None) != (args.tls_key is None):
        print("customs-edge watch: give --config FILE, or --device ID (with --broker HOST:PORT); "
              "--tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.config is not None:
        from customs_edge.agent.config import load_unit_config

        cfg = load_unit_config(args.config)
        s = cfg.sync
        device_id, (host, port), prefix, timeout = cfg.device_id, (s.host, s.port), s.topic_prefix, s.connect_timeout_s
        credentials = s.credentials()
        if args.broker:
            host, port = args.broker
    else:
        device_id, (host, port), prefix, timeout = args.device, args.broker or ("127.0.0.1", 1883), args.prefix, 5.0
        credentials = {"username": None, "password": None, "tls": None}
    credentials = with_identity(credentials, args)
    if args.config is not None and own_identity(cfg, credentials):
        print(f"customs-edge watch: {OWN_IDENTITY.replace('not asked: ', '')}; with the shipped ACL that "
              "identity must be allowed to read records (a hub's)", file=sys.stderr)
        return 2

    def out(line: str) -> None:
        print(line, flush=True)

    def err(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    return run(device_id, host, port, prefix=prefix, credentials=credentials, connect_timeout_s=timeout,
               as_json=args.json, alerts_only=args.alerts, stop=threading.Event(), out=out, err=err)


def register(sub: Any, config_help: str) -> None:
    """`customs-edge watch`, on cli/main.py's subcommands."""
    w = sub.add_parser("watch", help="records and alerts as they are produced, one line each",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    w.add_argument("--config", help=config_help + "; its device_id, broker and credentials are used")
    w.add_argument("--device", help="a device id, without a config file")
    w.add_argument("--broker", type=_broker, help="HOST:PORT (default: the config's, or 127.0.0.1:1883)")
    w.add_argument("--prefix", default="customs-edge/v1", help="topic prefix with --device (default customs-edge/v1)")
    add_identity_options(w)
    w.add_argument("--json", action="store_true", help="one JSON object per line")
    w.add_argument("--alerts", action="store_true", help="only priority-3 records (and the hub's alerts)")
    w.set_defaults(fn=cmd_watch)
