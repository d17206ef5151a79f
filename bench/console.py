"""The officers' console with 10^6 records in the hub's store, measured in headless Chromium.

    python bench/console.py [--records 1000000] [--alerts-every 100] [--json]

Fills a hub database through the hub's own intake and store (10 devices, one ALERT record in every
`--alerts-every`), starts the console on it, and loads pages in Debian's Chromium (Selenium):
  alerts_ttfb_ms / alerts_load_ms   the alerts page's time to first byte and full load (Navigation Timing;
                                    the best and the median of 5 loads), goal < 300 ms
  baseline_ttfb_ms / baseline_load_ms  the same for the console's static stylesheet in the same run: the
                                    server's and browser's floor
  alert_to_row_ms_p50 / _p99        a new alert committed by the hub's store -> its row in the open alerts page
                                    (MutationObserver time on the page's clock, both clocks this machine's),
                                    20 alerts; goal < 1,000 ms
  fleet_load_ms, lots_load_ms, lanes_load_ms  the other pages, full load
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import percentile
from customs_edge.hub import intake
from customs_edge.hub.console.server import serve
from customs_edge.hub.store import HubStore


def record(seq: int, alert: bool) -> dict[str, Any]:
    if alert:
        return {"seq": seq, "ts": time.time(), "boot": "b", "mono": float(seq), "type": "fever_alert", "prio": 3,
                "payload": {"screening": f"s{seq}", "estimate_c": 38.4, "threshold_c": 37.8, "valid": True}}
    return {"seq": seq, "ts": time.time(), "boot": "b", "mono": float(seq), "type": "screening", "prio": 1,
            "payload": {"screening": f"s{seq}", "estimate_c": 36.6, "decision": "normal", "valid": True}}


def fill(db: Path, total: int, every: int, devices: int = 10, batch: int = 1000) -> None:
    store = HubStore(db, "NORMAL")
    per = total // devices
    for start in range(1, per + 1, batch):
        msgs = []
        for d in range(devices):
            recs = [record(s, s % every == 0) for s in range(start, min(start + batch, per + 1))]
            msgs.append(intake.parse(f"customs-edge/v1/gate-{d:02}/records", json.dumps(
                {"v": 1, "device_id": f"gate-{d:02}", "batch": f"b{start}", "records": recs})))
        store.store(msgs)
    for d in range(devices):
        store.set_status(f"gate-{d:02}", "online", "gate", "bench-port")
    store.close()


def timing(driver: Any, url: str) -> tuple[float, float]:
    driver.get(url)
    t = driver.execute_script("const n = performance.getEntriesByType('navigation')[0];"
                              " return [n.responseStart - n.startTime, n.loadEventEnd - n.startTime];")
    return float(t[0]), float(t[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--alerts-every", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from tests.browser import chromium

    work = Path(tempfile.mkdtemp(prefix="bench-console-"))
    db = work / "hub.db"
    t0 = time.monotonic()
    fill(db, args.records, args.alerts_every)
    fill_s = time.monotonic() - t0
    server = serve(db, work / "console.db", "127.0.0.1:0", anonymous=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    base = server.url().rstrip("/")
    out: dict[str, Any] = {"records": args.records, "alerts": args.records // args.alerts_every,
                           "fill_s": round(fill_s, 1)}
    with chromium() as b:
        for name, path in (("alerts", "/alerts"), ("baseline", "/static/console.css")):
            timing(b, base + path)  # warm
            runs = [timing(b, base + path) for _ in range(5)]
            out[f"{name}_ttfb_ms"] = round(min(r[0] for r in runs), 1)
            out[f"{name}_ttfb_ms_median"] = round(statistics.median(r[0] for r in runs), 1)
            out[f"{name}_load_ms"] = round(min(r[1] for r in runs), 1)
            out[f"{name}_load_ms_median"] = round(statistics.median(r[1] for r in runs), 1)
        for name in ("fleet", "lots", "lanes"):
            out[f"{name}_load_ms"] = round(timing(b, f"{base}/{name}")[1], 1)
        b.get(base + "/alerts")
        b.execute_script("window.seen = {}; new MutationObserver(ms => { for (const m of ms) for (const n of"
                         " m.addedNodes) if (n.dataset) window.seen[n.dataset.key] = performance.timeOrigin +"
                         " performance.now(); }).observe(document.querySelector('#alerts tbody'),"
                         " {childList: true});")
        store = HubStore(db)
        lat = []
        for i in range(20):
            seq = 10_000_000 + i
            msg = intake.parse("customs-edge/v1/gate-00/records", json.dumps(
                {"v": 1, "device_id": "gate-00", "batch": f"live{i}", "records": [record(seq, True)]}))
            store.store([msg])
            committed = time.time() * 1000
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                seen = b.execute_script(f"return window.seen['gate-00/{seq}'] || null")
                if seen:
                    lat.append(seen - committed)
                    break
                time.sleep(0.01)
            else:
                raise SystemExit(f"alert {seq} never appeared in the page")
        store.close()
    server.shutdown()
    out["alert_to_row_ms_p50"] = round(percentile(lat, 50), 1)
    out["alert_to_row_ms_p99"] = round(percentile(lat, 99), 1)
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
