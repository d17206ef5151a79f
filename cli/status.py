"""`customs-edge status --config FILE`: the running unit, as its retained status and health messages on the
broker show it (drivers up/down and their counters, link, last hub ack, backlog), and its outbox on disk.

Read-only everywhere: it subscribes (never publishes), opens the outbox with `mode=ro` (no lock, no cap,
no migration) and creates no file. A broker that cannot be reached is one line, and the outbox still shows.
The status message comes every 30 s and at each connect, the health message every health_interval_s and
when a driver goes up or down: each part says how old it is.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from customs_edge.agent.config import UnitConfig, load_unit_config
from customs_edge.agent.outbox import OutboxError, OutboxStats, read_stats
from customs_edge.core import logs
from customs_edge.core.mqtt import Connected, Lost, Message, MqttLink, Tls
from customs_edge.core.wire import MAX_HEALTH_BYTES, MAX_STATUS_BYTES, topic

RETAINED_WAIT_S = 2.0  # after the subscription: how long to wait for the retained messages


@dataclass
class Live:
    """What the broker holds for the unit: the raw status and health messages (None: none retained)."""

    broker: str
    status: dict[str, Any] | None = None
    health: dict[str, Any] | None = None
    error: str | None = None  # the broker could not be reached, or refused us: in core/mqtt.py's words
    not_asked: bool = False  # the only identity at hand was the unit's own certificate: see own_identity()
    unreadable: list[str] = field(default_factory=list)


@contextmanager
def quiet_link(client_id: str, host: str, port: int, *, credentials: dict[str, Any],
               connect_timeout_s: float) -> Iterator[MqttLink]:
    """A clean-session MqttLink for a command that only listens; its connect-failure log lines are left out
    (the command prints the reason itself), and it is closed on the way out."""
    logging.getLogger("customs_edge.core.mqtt").setLevel(logging.ERROR)
    link = MqttLink(client_id, host, port, **credentials, connect_timeout_s=connect_timeout_s)
    try:
        yield link
    finally:
        link.disconnect(flush_s=0.2)
        link.close()


def add_identity_options(p: Any) -> None:
    p.add_argument("--tls-ca", help="CA certificate the broker's is checked against (default: the config's; "
                   "turns TLS on)")
    p.add_argument("--tls-cert", help="connect as this certificate, not the unit's own (never used: the broker "
                   "takes its name as client id): status needs an operator's (op-*), watch one the ACL lets read "
                   "records")
    p.add_argument("--tls-key", help="its private key, with --tls-cert")


def with_identity(credentials: dict[str, Any], args: Any) -> dict[str, Any]:
    """MqttLink's credentials with --tls-ca / --tls-cert / --tls-key put in place of the config's."""
    if not (args.tls_ca or args.tls_cert):
        return credentials
    old = credentials["tls"] or Tls()
    tls = Tls(args.tls_ca or old.ca, args.tls_cert or old.cert, args.tls_key or old.key, old.server_name)
    return {**credentials, "tls": tls}


OWN_IDENTITY = ("not asked: connecting with the unit's own certificate would take the running unit's session "
                "over (the broker uses the certificate's name as client id); give an operator's (op-*) with "
                "--tls-cert/--tls-key")


def own_identity(cfg: UnitConfig, credentials: dict[str, Any]) -> bool:
    """True when `credentials` present the unit's own client certificate. The shipped broker config sets
    use_username_as_clientid: a second client with it takes the agent's session over (and the agent then
    takes it back), so a read-only command must never connect as the unit."""
    tls, own = credentials.get("tls"), cfg.sync.tls_cert
    return bool(tls and tls.cert and own and os.path.realpath(tls.cert) == os.path.realpath(own))


def read_live(cfg: UnitConfig, wait_s: float = RETAINED_WAIT_S, credentials: dict[str, Any] | None = None) -> Live:
    """Subscribe to the unit's retained status and health topics for up to `wait_s` after connecting."""
    s = cfg.sync
    live = Live(f"{s.host}:{s.port}")
    credentials = credentials or s.credentials()
    if own_identity(cfg, credentials):
        live.error, live.not_asked = OWN_IDENTITY, True
        return live
    topics = {topic(s.topic_prefix, cfg.device_id, kind): kind for kind in ("status", "health")}
    deadline = time.monotonic() + s.connect_timeout_s + 0.5
    with quiet_link(f"customs-edge-status-{os.getpid()}", s.host, s.port, credentials=credentials,
                    connect_timeout_s=s.connect_timeout_s) as link:
        while time.monotonic() < deadline and (live.status is None or live.health is None):
            for ev in link.step(0.2):
                if isinstance(ev, Connected):
                    for t in topics:
                        link.subscribe(t)
                    deadline = time.monotonic() + wait_s
                elif isinstance(ev, Lost):
                    live.error = ev.reason
                    return live
                elif isinstance(ev, Message) and ev.topic in topics:
                    limit = MAX_STATUS_BYTES if topics[ev.topic] == "status" else MAX_HEALTH_BYTES
                    if len(ev.payload) > limit:  # never parsed: anyone on the loopback listener may retain one
                        live.unreadable.append(f"{ev.topic}: {len(ev.payload)} bytes, at most {limit}")
                        continue
                    try:
                        msg = json.loads(ev.payload)
                        if not isinstance(msg, dict):
                            raise ValueError("not a JSON object")
                    except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." past the stack
                        live.unreadable.append(f"{ev.topic}: {exc}")
                        continue
                    setattr(live, topics[ev.topic], msg)
        if not link.connected and live.error is None:
            live.error = f"no answer in {s.connect_timeout_s:g} s"
    return live


def _age(ts: Any, now: float) -> str:
    return f"{max(0.0, now - ts):.0f} s ago" if isinstance(ts, int | float) else "at an unknown time"


def _v(x: Any) -> str:
    """A value from the network, on one line ('?' when missing)."""
    return "?" if x is None else logs.escape(str(x))


def _count(d: Any) -> str:
    return ", ".join(f"{logs.escape(str(k))} {v}" for k, v in d.items()) if isinstance(d, dict) and d else "none"


def render(cfg: UnitConfig, live: Live, outbox: OutboxStats | None, outbox_error: str | None,
           now: float | None = None) -> Iterator[str]:
    """The human table. Everything that came over the network is escaped: one line stays one line."""
    now = time.time() if now is None else now
    st, he = live.status or {}, live.health or {}
    yield f"unit {cfg.device_id} ({cfg.type})   broker {live.broker}"
    if live.not_asked:
        yield f"  broker     {live.error}"
    elif live.error is not None and live.error.startswith("CONNACK refused"):  # the refusal names the fix
        yield f"  broker     {logs.escape(live.error)}"
    elif live.error is not None:
        yield f"  broker     cannot be reached: {logs.escape(live.error)} (check sync.host, sync.port and the broker)"
    elif not st and not he:
        yield ("  live       nothing retained for this unit: it never connected to this broker, uses another "
               "topic_prefix, or the broker's ACL does not let this identity read its status (with TLS: "
               "--tls-cert/--tls-key of an operator, op-*)")
    for problem in live.unreadable:
        yield f"  unreadable {logs.escape(problem)}"
    if st.get("state") == "online":
        sync = st.get("sync") or {}
        yield (f"  state      online (status {_age(st.get('ts'), now)}; connects {_v(sync.get('connects'))}, "
               f"connect failures {_v(sync.get('connect_failures'))}, ack timeouts {_v(sync.get('ack_timeouts'))})")
        ack_age = sync.get("last_ack_age_s")
        yield (f"  hub ack    up to seq {_v(sync.get('hub_acked_seq'))}"
               + (f", {ack_age:.1f} s before the status" if isinstance(ack_age, int | float) else ", none yet")
               + f" (status {_age(st.get('ts'), now)}; the outbox below is current)")
    elif st.get("state") == "offline":
        yield ("  state      offline: the broker published its will (the unit lost its connection, or was killed)"
               if st.get("ts") is None else f"  state      offline: it stopped cleanly {_age(st.get('ts'), now)}")
    elif st:
        yield f"  state      unknown: {_v(st.get('state'))}"
    # drivers and backlog from the newer of the two messages (status every 30 s, health more often)
    ts = {k: float(m["ts"]) if isinstance(m.get("ts"), int | float) else 0.0 for k, m in (("st", st), ("he", he))}
    if he and (st.get("state") != "online" or ts["he"] >= ts["st"]):
        drivers, pending, source = he.get("drivers"), he.get("outbox_pending"), f"from the health {_age(ts['he'], now)}"
    else:
        ob = st["outbox"] if isinstance(st.get("outbox"), dict) else {}
        drivers, pending, source = st.get("drivers"), ob.get("pending"), f"from the status {_age(ts['st'], now)}"
    if st.get("state") != "online":
        source = f"last known, {source}"
    if st or he:
        yield f"  backlog    {_v(pending)} records not yet acked by the hub ({source})"
    if isinstance(drivers, dict) and drivers:
        yield f"  {'driver':<16} {'state':<6} {'frames':>9} {'corrupt':>8} {'faults':>7}   ({source})"
        for role, d in drivers.items():
            d = d if isinstance(d, dict) else {}
            state = "?" if "up" not in d else "up" if d["up"] else "down"
            yield (f"  {_v(role):<16} {state:<6} {_v(d.get('frames')):>9} {_v(d.get('corrupt')):>8} "
                   f"{_v(d.get('faults')):>7}")
    yield f"outbox {cfg.outbox.path}"
    if outbox is None:
        yield f"  error: {outbox_error}"
        return
    oldest = f", oldest {_age(outbox.oldest_ts, now)}" if outbox.oldest_ts else ""
    yield (f"  pending {outbox.pending}, last seq {outbox.last_seq}, acked seq {outbox.acked_seq}, "
           f"{outbox.used_bytes / 1024:.0f} kB{oldest}")
    yield f"  dropped {_count(outbox.dropped)}; dead letters {_count(outbox.dead_letters)}"


def main(config: str, *, as_json: bool = False, wait_s: float = RETAINED_WAIT_S,
         identity: Any = None, out: Callable[[str], None] = print) -> int:
    """0: shown; 1: the outbox cannot be read (a mistyped path: named) or belongs to another unit."""
    cfg = load_unit_config(config)
    outbox: OutboxStats | None = None
    outbox_error: str | None = None
    try:
        outbox = read_stats(cfg.outbox.path)
    except OutboxError as exc:
        outbox_error = f"{exc} (a mistyped path, or the agent never ran on this machine)"
    if outbox is not None and outbox.device_id not in (None, cfg.device_id):
        outbox_error = f"{cfg.outbox.path} belongs to device {outbox.device_id!r}, not {cfg.device_id!r}"
    live = read_live(cfg, wait_s, with_identity(cfg.sync.credentials(), identity) if identity else None)
    if as_json:
        out(json.dumps({"device_id": cfg.device_id, "broker": {"address": live.broker, "error": live.error},
                        "status": live.status, "health": live.health,
                        "outbox": asdict(outbox) if outbox is not None else None, "outbox_error": outbox_error},
                       indent=2))
    else:
        for line in render(cfg, live, outbox, outbox_error):
            out(line)
    if outbox_error is not None:
        print(f"error: {outbox_error}", file=sys.stderr)
        return 1
    return 0


def register(sub: Any, config_help: str) -> None:
    """`customs-edge status`, on cli/main.py's subcommands."""
    import argparse

    st = sub.add_parser("status", help="the running unit (drivers, link, hub ack, backlog) and its outbox on disk",
                        description="The unit's retained status and health on its broker, and its outbox file. "
                                    "Read-only. Exit code: 0 shown, 1 the outbox file cannot be read.")
    st.add_argument("--config", required=True, help=config_help)
    st.add_argument("--json", action="store_true", help="print the raw status, health and outbox as JSON")
    st.add_argument("--wait", type=float, default=RETAINED_WAIT_S,
                    help=f"seconds to wait for the retained messages once connected (default {RETAINED_WAIT_S:g})")

    add_identity_options(st)

    def cmd(args: argparse.Namespace) -> int:
        if (args.tls_cert is None) != (args.tls_key is None):
            print("customs-edge status: --tls-cert and --tls-key go together", file=sys.stderr)
            return 2
        return main(args.config, as_json=args.json, wait_s=args.wait, identity=args)

    st.set_defaults(fn=cmd)
