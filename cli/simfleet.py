"""`customs-edge fleet simulate --units N --broker HOST:PORT`: N simulated units in this process
(agent/simfleet.py), each with its own device id, outbox and MQTT session, producing records at --rate per
unit against one broker and its hub. Prints a line of figures every --every seconds (JSON lines with
--json) and a summary at the end; Ctrl-C or --duration ends it (the units then publish "offline").
"""

from __future__ import annotations

import argparse
import json
import signal
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from customs_edge.core.errors import CustomsEdgeError


def _broker(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise CustomsEdgeError(f"--broker {text!r}: give HOST:PORT, e.g. 127.0.0.1:1883")
    return host, int(port)


def cmd_simulate(args: argparse.Namespace) -> int:
    from customs_edge.agent.simfleet import SimFleet

    if args.units < 1:
        raise CustomsEdgeError("--units must be at least 1")
    host, port = _broker(args.broker)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ce-fleet-"))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    fleet = SimFleet(args.units, workdir, host=host, port=port, rate=args.rate, prefix=args.prefix,
                     topic_prefix=args.topic_prefix, ack_timeout_s=args.ack_timeout, burst=args.backlog,
                     limit=args.records, outbox=args.outbox, signing=not args.unsigned, threads=args.threads,
                     put_every_s=args.put_every, timed=not args.counts_only, spread_s=args.spread)
    if args.wait_for:
        _print({"t": 0.0, "ready": True, "units": args.units, "produced": fleet.figures().produced}, True)
        go = Path(args.wait_for)
        while not go.exists():
            if stop.wait(0.02):
                fleet.stop()
                return 0
    fleet.start()
    t0 = time.monotonic()
    deadline = t0 + args.duration if args.duration else None

    def report(final: bool = False) -> dict[str, Any]:
        f = fleet.figures()
        last_ack = max((u.sync.stats.last_ack_mono for u in fleet.units), default=0.0)
        return {"t": round(time.monotonic() - t0, 1), **asdict(f), "connected": fleet.connected(),
                "last_ack_s": round(last_ack - t0, 3) if last_ack else None,
                "latency_window_s": round(time.monotonic() - measured_from, 2),
                "workdir": str(workdir), **({"final": True} if final else {})}

    next_report = t0 + args.every
    warm = args.warmup > 0
    measured_from = t0
    try:
        while not stop.wait(0.2):
            now = time.monotonic()
            if warm and now - t0 >= args.warmup:
                fleet.reset_latencies()  # the figures from here on: the connect storm and key files behind
                warm, measured_from = False, now
            if deadline is not None and now >= deadline:
                break
            if args.records is not None and all(u.produced >= args.records for u in fleet.units) \
                    and fleet.figures().pending == 0:
                break
            if now >= next_report:
                next_report += args.every
                _print(report(), args.json)
    finally:
        fleet.stop()
    _print(report(final=True), args.json)
    if args.latencies:
        Path(args.latencies).write_text(json.dumps([round(x * 1000, 2) for u in fleet.units
                                                    for x in u.outbox.latencies]))
    return 0


def _print(fig: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(fig), flush=True)
        return
    print(f"{fig['t']:>7.1f}s units {fig['units']} connected {fig['connected']} produced {fig['produced']} acked"
          f" {fig['acked']} pending {fig['pending']} ack latency p50 {fig['latency_p50_ms']} ms p99"
          f" {fig['latency_p99_ms']} ms resends {fig['hub_resends']}", flush=True)


def register(fsub: Any) -> None:
    s = fsub.add_parser("simulate", help="N simulated units in one process against a broker and hub (load, demo)",
                        description=__doc__)
    s.add_argument("--units", type=int, default=10, help="simulated units (default 10)")
    s.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT of the broker (default 127.0.0.1:1883)")
    s.add_argument("--rate", type=float, default=5.0, help="records per second per unit (default 5)")
    s.add_argument("--records", type=int, default=None, help="records per unit, then stop once all are acked")
    s.add_argument("--backlog", type=int, default=0, help="records each unit holds before it connects")
    s.add_argument("--duration", type=float, default=None, help="seconds; default: until Ctrl-C")
    s.add_argument("--prefix", default="sim", help="device ids are PREFIX-0000, PREFIX-0001, ... (default sim)")
    s.add_argument("--topic-prefix", default="customs-edge/v1", help="the hub's topic prefix")
    s.add_argument("--ack-timeout", type=float, default=10.0, help="seconds before an unacked batch is resent")
    s.add_argument("--workdir", default=None, help="outboxes here (default: a new temporary directory)")
    s.add_argument("--every", type=float, default=5.0, help="seconds between progress lines (default 5)")
    s.add_argument("--json", action="store_true", help="JSON lines")
    s.add_argument("--warmup", type=float, default=0.0, help="seconds before the latency figures start")
    s.add_argument("--latencies", default=None, help="write every ack latency (ms) measured to this JSON file")
    s.add_argument("--outbox", choices=["sqlite", "memory"], default="sqlite",
                   help="sqlite: the production outbox, a file per unit (default); memory: the same contract in memory"
                        " (no disk writes: for fleets larger than the machine's disk and CPU would carry)")
    s.add_argument("--unsigned", action="store_true", help="send unsigned batches (a unit without a device key)")
    s.add_argument("--put-every", type=float, default=None, metavar="S",
                   help="each unit commits its due records every S seconds (default 0.05: one record per commit"
                        " and per batch at 5/s; 1.0: five)")
    s.add_argument("--threads", type=int, default=1, help="driver threads the units are shared among (default 1)")
    s.add_argument("--spread", type=float, default=1.0, metavar="S",
                   help="units start (first connect, first record) spread over S seconds (default 1; 0: all at once)")
    s.add_argument("--wait-for", default=None, metavar="FILE",
                   help="put the backlog, print a JSON line {\"ready\": true}, and start only once FILE exists (several"
                        " simulate processes connecting together)")
    s.add_argument("--counts-only", action="store_true",
                   help="count acked records without timing each (a backlog of millions)")
    s.set_defaults(fn=cmd_simulate)
