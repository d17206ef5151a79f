"""Hub memory under load: RSS after startup, then after 10^5 and 10^6 records stored.

    python bench/hub_rss.py [--records 1000000] [--batch 500] [--devices 10] [--via handler|mosquitto] [--json]

Records are the bytes an agent publishes (`encode_batch`, ~250-byte payloads, seqs counting up per device,
`--devices` devices in turn). Two ways in:
  handler    (default) this process builds a Hub and feeds its message handler directly, several
             batches per call as the network loop hands them over; acks and alerts are built and
             dropped (no broker). Measures the store and the message handling alone.
  mosquitto  a real mosquitto on 127.0.0.1 and `customs-edge hub` in its own process; this process
             publishes the batches (QoS 1, at most 8 unacked) and reads the hub process's RSS from
             /proc when the hub's acks for 10^5 and 10^6 records are in. Measures the whole hub,
             MQTT link included.
Prints rss_mb at 0 (= the baseline: after startup, before any record), 10^5 and 10^6 records,
every 10^5 in `samples`, growth_mb = rss(10^6) - rss(10^5) (flat: ~0; the first 10^5 fill SQLite's
page cache), and records_per_s (handler: time inside the handler only; mosquitto: first publish to
last ack). Small batches (--batch 10, as a lightly loaded agent sends) multiply the per-message costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import rss_mb
from customs_edge.core.jsonfast import dumps
from customs_edge.core.records import Pending
from customs_edge.core.wire import encode_batch

PAYLOAD = dumps({"weight": 12.34, "tare": 0.0, "unit": "kg", "net": False, "motion": False, "source": "bench",
                 "note": "x" * 150})
PREFIX = "customs-edge/v1"
STEP = 100_000


def batches(total: int, size: int, devices: int) -> Iterator[tuple[str, bytes, int]]:
    """(topic, payload, records) for `total` records, devices in turn, seqs counting up per device."""
    next_seq = dict.fromkeys(range(devices), 1)
    sent, k = 0, 0
    while sent < total:
        d = k % devices
        n = min(size, total - sent)
        seq0 = next_seq[d]
        recs = [Pending(s, 1.7e9 + s, "boot-bench", float(s), "weighing", 1, PAYLOAD) for s in range(seq0, seq0 + n)]
        next_seq[d] = seq0 + n
        yield f"{PREFIX}/bench-{d}/records", encode_batch(f"bench-{d}", f"b{k}", recs), n
        sent += n
        k += 1


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def via_handler(db: Path, total: int, size: int, devices: int, sample: Callable[[int, float], None]) -> float:
    """Returns the seconds spent in the hub's handler."""
    from customs_edge.hub.service import Hub, HubConfig

    hub = Hub(HubConfig(db=db, port=1))  # never connected: handle() is fed directly
    sample(0, rss_mb())
    done, pending, busy = 0, [], 0.0
    for t, payload, n in batches(total, size, devices):
        pending.append((t, payload))
        done += n
        if len(pending) == 4 or done == total:
            t0 = time.perf_counter()
            hub.handle(pending)
            busy += time.perf_counter() - t0
            pending = []
        if done % STEP == 0:
            sample(done, rss_mb())
    hub.store.close()
    return busy


def via_mosquitto(work: Path, total: int, size: int, devices: int, sample: Callable[[int, float], None]) -> float:
    """Returns the seconds from the first batch published to the last ack."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from customs_edge.hub.brokers import Mosquitto

    broker = Mosquitto(work / "broker", persistence=False).start()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    hub = subprocess.Popen([sys.executable, "-m", "customs_edge", "hub", "--db", str(work / "hub.db"), "--port",
                            str(broker.port), "--client-id", "bench-hub", "--log-level", "WARNING"],
                           env=env, stderr=(work / "hub.log").open("wb"))
    acked = [0]
    cond = threading.Condition()

    def on_message(_c: Any, _u: Any, m: Any) -> None:
        ack = json.loads(m.payload)
        with cond:
            acked[0] += sum(b - a + 1 for a, b in ack["ranges"])
            cond.notify_all()

    def wait_acked(records: int, timeout: float) -> None:
        with cond:
            if not cond.wait_for(lambda: acked[0] >= records, timeout):
                raise RuntimeError(f"hub acks stalled at {acked[0]} records; see {work / 'hub.log'}")

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-agent", protocol=paho.MQTTv311)
    c.on_message = on_message
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        c.subscribe(f"{PREFIX}/+/ack", 1)
        # the hub is up once it answers: publish one record until its ack arrives
        probe = encode_batch("bench-probe", "probe", [Pending(1, 1.7e9, "b", 1.0, "t", 1, "{}")])
        deadline = time.monotonic() + 30
        while not acked[0]:
            if time.monotonic() > deadline or hub.poll() is not None:
                raise RuntimeError(f"the hub did not ack within 30 s; see {work / 'hub.log'}")
            c.publish(f"{PREFIX}/bench-probe/records", probe, qos=1)
            with cond:
                cond.wait(1.0)
        acked[0] = 0
        sample(0, proc_rss_mb(hub.pid))
        t0 = time.monotonic()
        sent, next_mark = 0, STEP
        for t, payload, n in batches(total, size, devices):
            wait_acked(sent - 8 * size, 60)  # at most 8 batches unacked
            c.publish(t, payload, qos=1)
            sent += n
            while next_mark <= total and sent >= next_mark:
                wait_acked(next_mark, 120)
                sample(next_mark, proc_rss_mb(hub.pid))
                next_mark += STEP
        return time.monotonic() - t0
    finally:
        c.loop_stop()
        c.disconnect()
        hub.terminate()
        hub.wait(10)
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--via", choices=["handler", "mosquitto"], default="handler")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    samples: dict[int, float] = {}
    t0 = time.monotonic()

    def sample(n: int, mb: float) -> None:
        samples[n] = round(mb, 1)
        if not args.json:
            print(f"{n:>9} records  rss {mb:7.1f} MiB  {time.monotonic() - t0:6.1f} s", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="hub-rss-") as tmp:
        run = via_handler if args.via == "handler" else via_mosquitto
        busy = run(Path(tmp) / "hub.db" if args.via == "handler" else Path(tmp), args.records, args.batch,
                   args.devices, sample)
    top = max(samples)
    out = {
        "via": args.via, "records": args.records, "batch": args.batch, "devices": args.devices,
        "baseline_rss_mb": samples[0],
        "rss_mb": {str(n): samples[n] for n in (0, STEP, top) if n in samples},
        "growth_mb": round(samples[top] - samples.get(STEP, samples[0]), 1),
        "samples": {str(n): mb for n, mb in sorted(samples.items())},
        "records_per_s": round(args.records / busy),  # handler: in the handler only; mosquitto: end to end
    }
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
