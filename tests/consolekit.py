"""Test helpers for the console: records as the units send them, and an HTTP client with a cookie jar."""

from __future__ import annotations

import http.cookiejar
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from customs_edge.hub import intake
from customs_edge.hub.console.server import ConsoleServer, serve
from customs_edge.hub.storage import open_store
from tests.fleet import rec, records_msg

T0 = 1_780_000_000.0  # a unit clock in 2026


def fever(seq: int, est: float = 38.4, ts: float = T0) -> dict[str, Any]:
    return rec(seq, ts=ts, type="fever_alert", prio=3, payload={
        "screening": f"gate-01:{seq}", "estimate_c": est, "threshold_c": 37.8, "valid": True, "tags": [],
        "thumbnail": {"w": 4, "h": 3, "scale": 0.1,
                      "data": [300, 310, 320, 330, 340, 385, 380, 330, 300, 300, 310, 300]}})


def gate_records(start: int = 1) -> list[dict[str, Any]]:
    """A lane's hour: two summaries, a fever alert and its confirmation."""
    return [
        rec(start, ts=T0, type="lane_summary", prio=0, payload={"screened": 100, "alerts": 2}),
        fever(start + 1, ts=T0 + 60),
        rec(start + 2, ts=T0 + 120, type="fever_confirmation", prio=3, payload={
            "screening": f"gate-01:{start + 1}", "measured_c": 38.3, "confirmed": True, "by": "officer-7",
            "estimate_c": 38.4}),
        rec(start + 3, ts=T0 + 1800, type="lane_summary", prio=0, payload={"screened": 60, "alerts": 1}),
    ]


def ore_records(start: int = 1) -> list[dict[str, Any]]:
    out = [rec(start + i, ts=T0 + 60 * i, type="ore_analysis", prio=1, payload={
        "lot_id": "LOT-7", "lot_t": 500.0 * i, "model": {"fe": 61.5 + 0.1 * i, "sio2": 4.1, "h2o": 8.2}})
        for i in range(5)]
    out.append(rec(start + 5, ts=T0 + 400, type="lot_report", prio=2, payload={
        "lot_id": "LOT-7", "opened": T0 - 10, "decision": "hold", "reasons": ["moisture 9.80 % > 0.9 x TML"],
        "flags": ["foreign_matter"], "fe": {"value": 61.7, "u95": 0.2}, "sio2": {"value": 4.1, "u95": 0.1},
        "moisture": {"value": 9.8, "u95": 0.3}, "moisture_limit_pct": 9.45, "increments": 42,
        "gamma_alarms": 0, "neutron_alarms": 0, "foreign_matter": 1}))
    out.append(rec(start + 6, ts=T0 + 400, type="lot_hold", prio=3, payload={
        "lot_id": "LOT-7", "decision": "hold", "reasons": ["moisture 9.80 % > 0.9 x TML"]}))
    return out


def put(db: Path | str, device_id: str, records: list[dict[str, Any]], batch: str = "b") -> None:
    """Store records through the hub's own intake and store, as the hub does with a records message."""
    store = open_store(db)
    try:
        store.store([intake.parse(f"customs-edge/v1/{device_id}/records", records_msg(device_id, batch, records))])
    finally:
        store.close()


def status(db: Path | str, device_id: str, unit_type: str, site: str) -> None:
    store = open_store(db)
    try:
        store.set_status(device_id, "online", unit_type, site)
    finally:
        store.close()


class Running:
    def __init__(self, db: Path | str, state: Path, **kw: Any) -> None:
        self.server: ConsoleServer = serve(db, state, "127.0.0.1:0", **kw)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()
        self.url = self.server.url().rstrip("/")

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Client:
    """A browser without the browser: cookies, forms with their hidden fields, no redirects followed blindly."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def get(self, path: str) -> tuple[int, str]:
        try:
            with self.opener.open(self.base + path, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def post(self, path: str, form: dict[str, str], headers: dict[str, str] | None = None) -> tuple[int, str]:
        req = urllib.request.Request(self.base + path, data=urllib.parse.urlencode(form).encode(),
                                     headers=headers or {}, method="POST")
        try:
            with self.opener.open(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def login(self, user: str, password: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        _, page = self.get("/login")
        pre = hidden(page, "pre")
        return self.post("/login", {"user": user, "password": password, "pre": pre, "next": "/alerts"}, headers)


def hidden(page: str, name: str) -> str:
    m = re.search(rf'name="?{name}"? value="([^"]*)"', page)
    assert m, f"no hidden {name} field in the page"
    return m.group(1)
