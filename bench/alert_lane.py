"""Alert latency during a backlog burst (issue 12): the hub's alert lane against the single queue it replaces.

    python bench/alert_lane.py [--units 200] [--records 10000] [--batch 500] [--alerts 10] [--txn-s 0.2] [--json]

A real mosquitto on 127.0.0.1 and a hub (hub/service.py, SQLite, in this process's thread). The hub's sessions
are made (it starts and stops), then `--units` units' backlog (`--records` each, in batches of `--batch`,
~250-byte payloads, as `encode_batch` publishes them) is queued at the broker, and the hub is started again:
the whole burst waits for it at once (more than units reconnecting with their sync windows would queue).
While it drains, another unit publishes `--alerts` one-record ALERT batches, one every `--every-s`; an alert's
latency runs from its publish to the hub's ack of it (the ack follows the commit). Two runs, each on a fresh
broker and hub file:
  lane      alerts on `{device}/alerts`, the hub's alert lane, bulk stored in transactions of about `--txn-s`
  baseline  alerts on `{device}/records` behind the backlog, one transaction per burst read (the hub as it was)
Prints, per run, the drain time (first record stored to the last one stored: the burst's time until every record
is stored), records/s, the CPU time of this process (the hub, and the alerting client) per record (wall-clock
rates depend on what else runs on the machine; CPU time much less), and the alerts' latency p50/p99/max.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.hub_rss import batches
from customs_edge.core.records import Pending
from customs_edge.core.wire import encode_batch
from customs_edge.hub.brokers import Mosquitto
from customs_edge.hub.service import Hub, HubConfig

PREFIX = "customs-edge/v1"


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


class Client:
    def __init__(self, port: int) -> None:
        self.c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        self.c.max_inflight_messages_set(1000)
        self.acks: dict[str, float] = {}
        self.c.on_message = lambda _c, _u, m: self.acks.setdefault(json.loads(m.payload)["batch"], time.monotonic())
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        while not self.c.is_connected():
            time.sleep(0.01)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def run(args: argparse.Namespace, lane: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="alert-lane-") as tmp:
        mq = Mosquitto(Path(tmp) / "broker", persistence=False).start()
        db = Path(tmp) / "hub.db"
        try:
            cfg = HubConfig(port=mq.port, db=db, client_id="hub-bench", synchronous="FULL")
            first = Hub(cfg)  # its persistent sessions, subscribed, then gone: the broker queues for them
            stop = threading.Event()
            t = threading.Thread(target=first.run, args=(stop,))
            t.start()
            first.ready.wait(10)
            stop.set()
            t.join()
            pub = Client(mq.port)
            t0 = time.monotonic()
            infos = [pub.c.publish(topic, payload, qos=1)
                     for topic, payload, _ in batches(args.units * args.records, args.batch, args.units)]
            for i in infos:
                i.wait_for_publish(600)
            queued_s = time.monotonic() - t0
            total = args.units * args.records
            pub.c.subscribe(f"{PREFIX}/alerting-unit/ack", 1)
            hub = Hub(cfg)
            if not lane:
                hub.BULK_TXN_S = float("inf")  # type: ignore[misc]  # one transaction per burst read, as before
            else:
                hub.BULK_TXN_S = args.txn_s  # type: ignore[misc]
            stop = threading.Event()
            t = threading.Thread(target=hub.run, args=(stop,))
            t.start()
            reader = sqlite3.connect(f"file:{db}?mode=ro", uri=True)

            def stored() -> int:
                return int(reader.execute("SELECT coalesce(sum(stored), 0) FROM devices").fetchone()[0])

            while stored() == 0:
                time.sleep(0.01)
            start, cpu0 = time.monotonic(), time.process_time()
            sent: dict[str, float] = {}
            for k in range(args.alerts):
                batch = f"alert-{k}"
                rec = Pending(k + 1, time.time(), "boot-bench", float(k), "radiation_alarm", 3, '{"cps":900}')
                pub.c.publish(f"{PREFIX}/alerting-unit/{'alerts' if lane else 'records'}",
                              encode_batch("alerting-unit", batch, [rec]), qos=1)
                sent[batch] = time.monotonic()
                time.sleep(args.every_s)
            while stored() < total + args.alerts and time.monotonic() - start < args.timeout_s:
                time.sleep(0.02)
            drained, cpu = time.monotonic() - start, time.process_time() - cpu0
            done = stored()
            deadline = time.monotonic() + 30
            while len(pub.acks) < len(sent) and time.monotonic() < deadline:
                time.sleep(0.02)
            lat = [pub.acks[b] - s for b, s in sent.items() if b in pub.acks]
            connects = {"bulk": hub.link.connects, "lane": hub.lane.connects if hub.lane else None}
            stop.set()
            t.join()
            pub.close()
            reader.close()
        finally:
            mq.stop()
    return {"alerts_on": "alerts (lane)" if lane else "records (one queue)", "records": total,
            "queued_s": round(queued_s, 2), "stored": done - args.alerts, "drain_s": round(drained, 2),
            "records_per_s": round(total / drained), "cpu_us_per_record": round(cpu / total * 1e6, 1),
            "alerts": len(sent), "alerts_acked": len(lat),
            "alert_ms_p50": round(1000 * (pct(lat, 50) or 0)), "alert_ms_p99": round(1000 * (pct(lat, 99) or 0)),
            "alert_ms_max": round(1000 * max(lat, default=0)), "alert_ms": [round(1000 * x) for x in lat],
            "hub_connects": connects}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", type=int, default=200)
    p.add_argument("--records", type=int, default=10000, help="per unit")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--alerts", type=int, default=10)
    p.add_argument("--every-s", type=float, default=0.5, help="between two alerts")
    p.add_argument("--txn-s", type=float, default=Hub.BULK_TXN_S, help="the lane run's bulk transaction target")
    p.add_argument("--timeout-s", type=float, default=600)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    out = {"lane": run(args, True), "baseline": run(args, False),
           "args": {k: v for k, v in vars(args).items() if k != "json"}}
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
