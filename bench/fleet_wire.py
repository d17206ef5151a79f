"""The hub's ack latency under a steady fleet, with a load generator light enough to leave the machine to the hub.

    python bench/fleet_wire.py [--units 500] [--rate 5] [--warmup 8] [--seconds 20] [--stores sqlite,postgres]
                               [--parse-process on|off] [--json]

bench/hub.py's fleet runs the agent's own Sync for every unit (`customs-edge fleet simulate`): the whole path, but
on this 2-core machine the simulators need more CPU than the hub, and every part waits for a core in turn. Here
each unit is an MQTT session of its own (its own device id, client id and TCP connection, as a unit's) driven from
one asyncio process speaking MQTT 3.1.1 from pre-encoded packets: CONNECT, SUBSCRIBE to its ack topic, then one
one-record batch (core/wire.py encode_batch, the agent's format, unsigned: the hub takes an unregistered device's
batches unsigned, as bench/hub.py's fleet sends them) every 1/rate s on `{prefix}/{device}/records`, QoS 1.
Latency: a batch's PUBLISH written -> its hub ack read (the hub's ack follows its commit), for batches sent after
`--warmup` s (the connect storm), during `--seconds`. Beside it, in the same run: the hub's CPU per record and
peak RSS, the cores used by the generator, the hub (+ PostgreSQL), mosquitto and the rest of the machine
(`other_work`, /proc/stat), and the same latency with `--units 20` as the light-load baseline. The hub runs with
its parse process (hub/parser.py) as configs/hub/hub.yaml ships it; `--parse-process off` parses in the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import os
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import percentile, proc_cpu_s
from bench.hub import PREFIX, Workers, machine_cpu_s, pg_cpu_s
from customs_edge.core.records import Pending
from customs_edge.core.wire import encode_batch
from customs_edge.hub.brokers import Mosquitto

PAYLOAD = ('{"weight":12.34,"tare":0.0,"unit":"kg","net":false,"motion":false,"source":"bench","note":"'
           + "x" * 150 + '"}')  # ~250 bytes, as bench/hub.py's


def _utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    n, length = len(body), bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        length.append(digit | (0x80 if n else 0))
        if not n:
            return bytes([first]) + bytes(length) + body


class Unit(asyncio.Protocol):
    """One unit's MQTT session: what it sent (batch id -> when) and the latencies of the acks it read."""

    def __init__(self, device_id: str, lat: list[float], window: list[float]) -> None:
        self.device_id, self.lat, self.window = device_id, lat, window
        self.buf = bytearray()
        self.sent: dict[str, float] = {}
        self.connected = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.seq, self.mid = 0, 0
        self.topic = _utf8(f"{PREFIX}/{device_id}/records")

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        connect = _utf8("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60) + _utf8(f"wire-{self.device_id}")
        transport.write(_packet(0x10, connect))
        sub = struct.pack("!H", 1) + _utf8(f"{PREFIX}/{self.device_id}/ack") + b"\x00"
        transport.write(_packet(0x82, sub))

    def publish(self) -> None:
        assert self.transport is not None
        self.seq += 1
        self.mid = self.mid % 65535 + 1
        batch = f"w{self.seq}"
        rec = Pending(self.seq, time.time(), "boot-wire", time.monotonic(), "weighing", 1, PAYLOAD)
        body = self.topic + struct.pack("!H", self.mid) + encode_batch(self.device_id, batch, [rec])
        self.transport.write(_packet(0x32, body))
        self.sent[batch] = time.monotonic()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 2:
            n, mult, i = 0, 1, 1
            while True:
                if i >= len(self.buf):
                    return
                b = self.buf[i]
                n += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    break
            if len(self.buf) < i + n:
                return
            kind, body = self.buf[0] & 0xF0, bytes(self.buf[i:i + n])
            del self.buf[:i + n]
            if kind == 0x20 and not self.connected.done():  # CONNACK
                self.connected.set_result(body[1] == 0)
            elif kind == 0x30:  # PUBLISH (QoS 0: the hub's acks): topic, payload
                tlen = struct.unpack("!H", body[:2])[0]
                ack = json.loads(body[2 + tlen:])
                t = self.sent.pop(ack.get("batch", ""), None)
                if t is not None and self.window[0] <= t < self.window[1]:
                    self.lat.append(time.monotonic() - t)


async def drive(port: int, units: int, rate: float, warmup: float, seconds: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    window = [float("inf"), float("inf")]
    fleet: list[Unit] = []
    for k in range(units):
        _, u = await loop.create_connection(lambda k=k: Unit(f"wire-{k:04d}", lat, window), "127.0.0.1", port)
        fleet.append(u)
    ok = await asyncio.gather(*(u.connected for u in fleet))
    if not all(ok):
        raise RuntimeError("a CONNACK refused")
    t0 = time.monotonic()
    window[:] = [t0 + warmup, t0 + warmup + seconds]
    period = 1.0 / rate
    due = [(t0 + period * k / units, k) for k in range(units)]  # spread over one period, as a fleet's clocks are
    end = window[1]
    while (now := time.monotonic()) < end:
        while due[0][0] <= now:
            at, k = due[0]
            fleet[k].publish()
            heapq.heapreplace(due, (at + period, k))
        await asyncio.sleep(max(0.0, due[0][0] - time.monotonic()))
    await asyncio.sleep(2.0)  # the last acks of the window
    unacked = sum(1 for u in fleet for t in u.sent.values() if window[0] <= t < window[1])
    for u in fleet:
        if u.transport is not None:
            u.transport.write(b"\xe0\x00")  # DISCONNECT
            u.transport.close()
    return {"lat": lat, "unacked": unacked}


def run(store: str, args: argparse.Namespace, work: Path, units: int, pg: Any) -> dict[str, Any]:
    db = str(work / f"{store}-{units}.db") if store == "sqlite" else pg.new_database()
    broker = Mosquitto(work / f"broker-{store}-{units}", persistence=False).start()
    ws = Workers(1, db, broker.port, work, parse_process=args.parse_process == "on")
    try:
        mosq = broker.proc.pid if broker.proc else 0
        pgc = pg if store == "postgres" else None
        me = os.getpid()

        def cores() -> tuple[float, ...]:
            return (proc_cpu_s(me), ws.cpu_s(), pg_cpu_s(pgc) if pgc else 0.0, proc_cpu_s(mosq), machine_cpu_s(),
                    time.monotonic())

        # the window's CPU: sampled at its edges from a thread-free timer inside the run
        marks: list[tuple[float, ...]] = []

        async def main() -> dict[str, Any]:
            loop = asyncio.get_running_loop()
            loop.call_later(args.warmup + 1.0, lambda: marks.append(cores()))  # after the connects
            loop.call_later(args.warmup + args.seconds + 1.0, lambda: marks.append(cores()))
            return await drive(broker.port, units, args.rate, args.warmup, args.seconds)

        res = asyncio.run(main())
        rss = ws.rss_mb()[0]
    finally:
        ws.stop()
        broker.stop()
    lat = res["lat"]
    (g0, h0, d0, m0, a0, w0), (g1, h1, d1, m1, a1, w1) = marks[0], marks[-1]
    dt = max(1e-9, w1 - w0)
    used = {"generator": (g1 - g0) / dt, "hub": (h1 - h0) / dt, "postgres": (d1 - d0) / dt, "mosquitto": (m1 - m0) / dt}
    per = (units * args.rate * dt) / 1e6  # records offered in the CPU window, in millions
    sent = units * args.rate * args.seconds
    return {"units": units, "rate_per_unit": args.rate, "offered_records_per_s": units * args.rate,
            "acked_in_window": len(lat), "sent_in_window": round(sent), "unacked_in_window": res["unacked"],
            "ack_latency_p50_ms": round(percentile(lat, 50) * 1000, 2),
            "ack_latency_p99_ms": round(percentile(lat, 99) * 1000, 2),
            "ack_latency_max_ms": round(max(lat) * 1000, 2) if lat else None,
            "hub_cpu_us_per_record": round((h1 - h0) / per, 1),
            "db_cpu_us_per_record": round((d1 - d0) / per, 1) if store == "postgres" else None,
            "generator_cpu_us_per_record": round((g1 - g0) / per, 1), "hub_rss_mb": rss,
            "cores_used": {**{k: round(v, 2) for k, v in used.items()},
                           "other_work": round(max(0.0, (a1 - a0) / dt - sum(used.values())), 2)},
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=500)
    ap.add_argument("--baseline-units", type=int, default=20)
    ap.add_argument("--rate", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=8.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--stores", default="sqlite,postgres")
    ap.add_argument("--parse-process", choices=["on", "off"], default="on",
                    help="the hub's parse_process (hub/parser.py): on, as configs/hub/hub.yaml ships")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out: dict[str, Any] = {"cores": os.cpu_count(), "loadavg_1m_before": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="bench-wire-") as tmp:
        work = Path(tmp)
        pg = None
        if "postgres" in args.stores:
            from tests.pg import PgCluster  # the throwaway cluster bench/hub.py uses

            pg = PgCluster(durable=True).start()
        try:
            for store in args.stores.split(","):
                out[store] = {"fleet": run(store, args, work, args.units, pg),
                              "baseline_light_load": run(store, args, work, args.baseline_units, pg)}
                if not args.json:
                    print(store, json.dumps(out[store]))
        finally:
            if pg is not None:
                pg.stop()
    print(json.dumps(out, indent=None if not args.json else 2))


if __name__ == "__main__":
    main()
