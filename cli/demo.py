"""`customs-edge demo`: the main job on a simulated fleet, all on this machine.

Starts a broker (a local mosquitto if installed, else the embedded one), a hub, and for every unit type
a simulator (`customs-edge simulate TYPE`, real wire protocol on a loopback socket or pty) and an agent
(`customs-edge run --config`, the production entry point) configured from configs/TYPE.yaml with the
simulator's URLs. Shows a live per-device table; with --duration S it stops the simulators after S
seconds, lets the agents drain their outboxes, stops everything and reports per device:
  produced   records committed to the agent's outbox (seqs given out)
  delivered  distinct records stored at the hub
  duplicates records stored more than once at the hub (the (device_id, seq) key makes this 0)
  redeliveries_dropped  copies the hub received again and dropped
  dropped_by_cap  records the agent's outbox cap dropped (not lost: dropped by policy, and counted)
  lost       produced, not dropped by policy, and never stored at the hub after the final drain
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from customs_edge.agent import registry
from customs_edge.agent.outbox import OutboxError, read_stats
from customs_edge.configs import config_path
from customs_edge.hub.brokers import Mosquitto, free_port, mosquitto_path, wait_port
from customs_edge.simulators import SIMULATORS

# Children run in their own sessions: Ctrl-C reaches only the demo, which then stops the simulators,
# lets the agents drain, and stops the rest in order.
# Extra simulator flags per type, so that something worth seeing happens within a demo's minute: time
# runs faster, and the rare events come on a schedule, not by chance: a gamma alarm and tramp metal every
# quarter hour of simulated belt time (15 s at 60x), every 10th traveller febrile. The gate has its blackbody in
# view (configs/gate.yaml `reference`), its environment sensor and its stack light's relay module.
SIM_ARGS: dict[str, list[str]] = {
    "scale": ["--cycle", "3"],
    "ore-station": ["--speed", "60", "--gamma-per-h", "0", "--metal-per-h", "0",
                    "--gamma-every", "900", "--metal-every", "900"],
    "gate": ["--speed", "4", "--febrile-share", "0", "--febrile-every", "10", "--blackbody", "20,23,28,31",
             "--environment", "--relay"],
    "handheld": ["--scene-s", "3", "--scan-period", "1", "--capture-every", "3"],
}
# A handheld's scanner sends a capture trigger every 3rd read (its button line), and its simulator writes a
# risk list covering part of what it scans, which the demo publishes retained (as `fleet risk-list publish`).
APP_OVERRIDES: dict[str, dict[str, Any]] = {"handheld": {"position_summary_s": 15}}
DRAIN_TIMEOUT_S = 30.0


@dataclass
class DemoUnit:
    device_id: str
    type: str
    config: Path
    outbox: Path
    sim: subprocess.Popen[str]
    agent: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    urls: dict[str, Any] = field(default_factory=dict)


def available_types() -> list[str]:
    """Unit types whose app, simulator and demo config are all present in this checkout."""
    out = []
    for t in registry.app_names():
        if t not in SIMULATORS or not config_path(t).exists():
            continue
        try:
            registry.lookup("app", t)
            registry.load_object(SIMULATORS[t])
        except (ImportError, AttributeError):
            continue
        out.append(t)
    return out


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "customs_edge", *args]


class Broker:
    def __init__(self, work: Path, kind: str = "auto") -> None:
        if kind == "auto":
            kind = "mosquitto" if mosquitto_path() else "embedded"
        self.kind = kind
        self._mq: Mosquitto | None = None
        self._embedded: Any = None
        if self.kind == "mosquitto":
            self._mq = Mosquitto(work / "broker", persistence=False).start()
            self.port = self._mq.port
        else:
            from customs_edge.hub.embedded_broker import EmbeddedBroker

            self._embedded = EmbeddedBroker("127.0.0.1", free_port())
            self._embedded.start()
            self.port = self._embedded.port
            wait_port(self.port)

    def stop(self) -> None:
        if self._mq:
            self._mq.stop()
        if self._embedded:
            self._embedded.stop()


def _start_sim(unit_type: str, seed: int, work: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    extra = ["--risk-list", str(work / "risk-list.jsonl")] if unit_type == "handheld" else []
    proc = subprocess.Popen(_cli("simulate", unit_type, "--seed", str(seed), *SIM_ARGS.get(unit_type, []), *extra),
                            stdout=subprocess.PIPE, stderr=(work / f"sim-{unit_type}.log").open("wb"), text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"simulator {unit_type} exited: see {work / f'sim-{unit_type}.log'}")
    doc = json.loads(line)
    return proc, {**doc["urls"], **({"risk_list": doc["risk_list"]} if "risk_list" in doc else {})}


def _publish_risk_list(path: Path, port: int) -> None:
    from customs_edge.agent.risklist import encode, risk_list_topic
    from customs_edge.cli.fleet import publish_retained
    from customs_edge.core.mqtt import BrokerSettings

    publish_retained(f"127.0.0.1:{port}", risk_list_topic("customs-edge/v1"), encode(path), BrokerSettings(), 10.0)


def _unit_config(unit_type: str, device_id: str, urls: dict[str, Any], work: Path, port: int) -> dict[str, Any]:
    cfg = yaml.safe_load(config_path(unit_type).read_text())
    cfg["device_id"] = device_id
    cfg.setdefault("site", "demo-port")
    cfg.setdefault("outbox", {})["path"] = str(work / device_id / "outbox.db")
    sync = cfg.setdefault("sync", {})
    sync.update(host="127.0.0.1", port=port)
    cfg["app"] = {**cfg.get("app", {}), **APP_OVERRIDES.get(unit_type, {})}
    for role, endpoints in urls.items():
        drv = cfg["drivers"].get(role) if isinstance(endpoints, dict) else None
        if drv is None:
            continue
        url = endpoints.get("socket") or endpoints.get("http") or endpoints.get("pty")
        key = "url" if "url" in drv else "port"
        drv[key] = url
    return dict(cfg)


def _outbox_counts(path: Path) -> tuple[int, int, int]:
    """(produced, pending, dropped_by_cap) read from the agent's outbox file, read-only."""
    try:
        st = read_stats(path)
    except (OutboxError, sqlite3.Error):  # not created yet
        return 0, 0, 0
    return st.last_seq, st.pending, sum(st.dropped.values())


def _photos_pending(outbox: Path) -> int:
    """Evidence photos a handheld still holds (agent/photos.py: deleted only on the hub's ack)."""
    return sum(1 for _ in Path(f"{outbox}.photos").glob("??/*.jpg"))


def _hub_counts(hub_db: Path) -> dict[str, dict[str, Any]]:
    if not hub_db.exists():
        return {}
    db = sqlite3.connect(f"file:{hub_db}?mode=ro", uri=True, timeout=5)
    try:
        out: dict[str, dict[str, Any]] = {}
        for dev, received, dups, status in db.execute(
                "SELECT device_id, received, duplicates, status FROM devices").fetchall():
            distinct, total = db.execute(
                "SELECT count(DISTINCT seq), count(*) FROM records WHERE device_id=?", (dev,)).fetchone()
            types = dict(db.execute("SELECT type, count(*) FROM records WHERE device_id=? GROUP BY type",
                                    (dev,)).fetchall())
            out[dev] = {"delivered": distinct, "stored_rows": total, "received": received,
                        "redeliveries_dropped": dups, "status": status, "types": types}
        return out
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()


def _table(units: list[DemoUnit], hub_db: Path, broker: str, elapsed: float) -> str:
    hub = _hub_counts(hub_db)
    lines = [f"customs-edge demo  t={elapsed:5.0f}s  broker={broker}  hub={hub_db}",
             f"{'device':<16}{'type':<13}{'status':<9}{'produced':>9}{'pending':>9}{'at hub':>8}  records by type"]
    for u in units:
        produced, pending, _ = _outbox_counts(u.outbox)
        h = hub.get(u.device_id, {})
        types = ", ".join(f"{k}:{v}" for k, v in sorted(h.get("types", {}).items()))
        lines.append(f"{u.device_id:<16}{u.type:<13}{h.get('status') or '-':<9}{produced:>9}{pending:>9}"
                     f"{h.get('delivered', 0):>8}  {types}")
    return "\n".join(lines)


def _start_console(hub_db: Path, work: Path, listen: str, broker: str) -> Any:
    """The officers' console on the demo's hub, anonymous on loopback; None if the hub's file never appears
    or the address is taken (the demo runs on without it)."""
    from customs_edge.core.errors import CustomsEdgeError
    from customs_edge.hub.console.server import serve

    deadline = time.monotonic() + 15
    while True:
        try:
            server = serve(hub_db, work / "console.db", listen, anonymous=True, broker=broker)
            break
        except CustomsEdgeError:  # the hub has not created its file yet
            if time.monotonic() > deadline:
                return None
            time.sleep(0.2)
        except OSError:
            host = listen.rpartition(":")[0] or "127.0.0.1"
            if listen.endswith(":0"):
                return None
            listen = f"{host}:0"  # the asked port is taken: any free one
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    return server


def run_demo(duration: float | None = None, as_json: bool = False, workdir: str | None = None,
             types: list[str] | None = None, broker_kind: str = "auto", console: str | None = "127.0.0.1:8080") -> int:
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="customs-edge-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    types = types or available_types()
    if not types:
        raise SystemExit("demo: no unit type has its app, simulator and config installed; nothing to run")
    say = (lambda *_: None) if as_json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    broker = Broker(work, broker_kind)
    say(f"broker: {broker.kind} on 127.0.0.1:{broker.port}; work dir {work}")
    hub_db = work / "hub.db"
    hub_log = (work / "hub.log").open("wb")
    hub = subprocess.Popen(_cli("hub", "--db", str(hub_db), "--port", str(broker.port), "--client-id", "demo-hub"),
                           stderr=hub_log, start_new_session=True)
    units: list[DemoUnit] = []
    stop = threading.Event()
    web = _start_console(hub_db, work, console, f"127.0.0.1:{broker.port}") if console else None
    if web is not None:
        say(f"console: {web.url()}  (open it in a browser: alerts, fleet, ore lots, gate lanes)")
    try:
        for i, t in enumerate(types):
            device_id = f"{t}-01"
            sim, urls = _start_sim(t, seed=i + 1, work=work)
            if "risk_list" in urls:
                _publish_risk_list(Path(urls["risk_list"]), broker.port)
            cfg = _unit_config(t, device_id, urls, work, broker.port)
            path = work / f"{device_id}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            u = DemoUnit(device_id, t, path, Path(cfg["outbox"]["path"]), sim, urls=urls)
            u.log = (work / f"{device_id}.log").open("wb")
            u.agent = subprocess.Popen(_cli("run", "--config", str(path)), stderr=u.log, start_new_session=True)
            units.append(u)
            say(f"{device_id}: simulator {json.dumps(urls)}; agent log {work / (device_id + '.log')}")
        t0 = time.monotonic()
        for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C or a kill: stop in order, drain, report
            signal.signal(sig, lambda *_: stop.set())
        try:
            while not stop.wait(2.0 if not as_json else 0.5):
                elapsed = time.monotonic() - t0
                if not as_json:
                    print("\033[2J\033[H" + _table(units, hub_db, broker.kind, elapsed)
                          + (f"\nconsole: {web.url()}" if web is not None else ""), file=sys.stderr, flush=True)
                if duration is not None and elapsed >= duration:
                    break
                for u in units:
                    if u.agent and u.agent.poll() is not None:
                        raise RuntimeError(f"agent {u.device_id} exited ({u.agent.returncode}): see its log")
        except KeyboardInterrupt:
            pass
        # Stop production, then let every outbox drain to the hub.
        for u in units:
            u.sim.terminate()
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline and any(_outbox_counts(u.outbox)[1] or _photos_pending(u.outbox)
                                                  for u in units):
            time.sleep(0.3)
    finally:
        for u in units:
            if u.sim.poll() is None:
                u.sim.terminate()
            if u.agent and u.agent.poll() is None:
                u.agent.terminate()
        for u in units:
            with contextlib.suppress(subprocess.TimeoutExpired):
                if u.agent:
                    u.agent.wait(10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                u.sim.wait(5)
        time.sleep(0.5)  # the hub's last acks and status messages
        if web is not None:  # before the broker: its inspection link would log the broker's going as a fault
            web.shutdown()
            web.server_close()
        hub.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            hub.wait(10)
        broker.stop()

    hub_counts = _hub_counts(hub_db)
    result: dict[str, Any] = {"devices": {}, "broker": broker.kind, "workdir": str(work),
                              "console": web.url() if web is not None else None}
    for u in units:
        produced, _pending, dropped = _outbox_counts(u.outbox)
        h = hub_counts.get(u.device_id, {})
        delivered = int(h.get("delivered", 0))
        result["devices"][u.device_id] = {
            "type": u.type, "produced": produced, "delivered": delivered,
            "duplicates": int(h.get("stored_rows", 0)) - delivered,
            "redeliveries_dropped": int(h.get("redeliveries_dropped", 0)),
            "dropped_by_cap": dropped, "lost": max(0, produced - dropped - delivered),
            "records_by_type": h.get("types", {}),
        }
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(_table(units, hub_db, broker.kind, time.monotonic() - t0 if units else 0), file=sys.stderr)
        lost = sum(d["lost"] for d in result["devices"].values())
        print(f"\nlost records: {lost}; work dir (logs, configs, outboxes, hub.db): {work}", file=sys.stderr)
    return 0 if all(d["lost"] == 0 for d in result["devices"].values()) else 2
