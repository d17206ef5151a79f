"""`customs-edge hub fleet [--db F] [--json]`: every unit the hub knows, from its database, read-only.
`customs-edge fleet config push|get DEVICE` and `customs-edge cmd DEVICE NAME`: commands to one unit over
the broker (core/wire.py Command), waiting for its answer (agent/remote_config.py for config_push).
`customs-edge fleet model push|rollback|sign|keygen`: cli/fleet_model.py (docs/model-updates.md).

One line per device, at most WIDTH columns: online/offline (the status the unit publishes, offline also
by its last will), when the hub last heard from it, its backlog and the age of its oldest unsent record,
drivers down of drivers and their faults, agent version, config hash and model versions (from its latest
health message). `--json` prints the same with the whole latest health message, for scripts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from customs_edge.core import logs
from customs_edge.core.errors import CustomsEdgeError
from customs_edge.core.mqtt import BrokerSettings, Message, MqttLink, NotConnected, PubAck
from customs_edge.core.wire import COMMAND_TTL_S, MAX_REPLY_BYTES, Command, CommandReply, Health, topic
from customs_edge.hub.storage import open_store
from customs_edge.hub.store import FleetRow

WIDTH = 100
COLUMNS = [("device", 18, "<"), ("state", 7, "<"), ("seen", 5, ">"), ("backlog", 8, ">"), ("oldest", 6, ">"),
           ("drv down", 8, ">"), ("faults", 6, ">"), ("agent", 7, "<"), ("config", 8, "<"), ("models", 0, "<")]


def age(seconds: float | None) -> str:
    """3 -> "3s", 150 -> "2m", 7300 -> "2h", 200000 -> "2d"; None -> "-"."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _latest(row: FleetRow) -> Health | None:
    return Health.model_validate_json(row.health) if row.health else None


def cells(row: FleetRow, now: float) -> list[str]:
    h = _latest(row)
    down = [role for role, d in h.drivers.items() if not d.up] if h else []
    return [logs.escape(row.device_id), logs.escape(row.status or "-"),
            age(None if row.last_seen is None else now - row.last_seen),
            str(h.outbox_pending) if h else "-", age(h.oldest_unsent_age_s) if h else "-",
            f"{len(down)}/{len(h.drivers)}" if h else "-",
            str(sum(d.faults for d in h.drivers.values())) if h else "-",
            logs.escape(h.agent_version) if h else "-", h.config_hash[:8] if h else "-",
            ",".join(f"{logs.escape(n)}@{logs.escape(v)}" for n, v in sorted(h.models.items())) if h else "-"]


def table(rows: list[FleetRow], now: float) -> list[str]:
    def line(values: list[str]) -> str:
        used = sum(w + 1 for _, w, _ in COLUMNS[:-1])
        parts = [f"{_fit(v, w or WIDTH - used):{a}{w}}" for v, (_, w, a) in zip(values, COLUMNS, strict=True)]
        return " ".join(parts).rstrip()

    return [line([name for name, _, _ in COLUMNS])] + [line(cells(r, now)) for r in rows]


def as_json(rows: list[FleetRow], now: float) -> dict[str, Any]:
    return {"now": now, "devices": {r.device_id: {**asdict(r), "health": json.loads(r.health) if r.health else None}
                                    for r in rows}}


def cmd_fleet(db: str, want_json: bool) -> int:
    store = open_store(db, readonly=True)  # a mistyped --db is an error, never a new empty database
    try:
        rows, now = store.fleet(), time.time()
    finally:
        store.close()
    if want_json:
        print(json.dumps(as_json(rows, now), indent=2))
    else:
        print("\n".join(table(rows, now)))
    return 0


# -- commands to one unit ------------------------------------------------------------------------------
PASSWORD_ENV = "CUSTOMS_EDGE_MQTT_PASSWORD"
SIMPLE_COMMANDS = ["ping", "status", "resend", "config_get", "capture"]


def operator_link(args: argparse.Namespace, client_id: str) -> MqttLink:
    """A clean-session link to the broker of the --broker, --username ($CUSTOMS_EDGE_MQTT_PASSWORD) and TLS flags."""
    host, _, port = args.broker.rpartition(":")
    if not host or not port.isdigit():
        raise CustomsEdgeError(f"--broker {args.broker!r}: write it host:port, e.g. 127.0.0.1:1883")
    settings = BrokerSettings(username=args.username, password=os.environ.get(PASSWORD_ENV) or None,
                              tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                              tls_server_name=args.tls_server_name)
    return MqttLink(client_id, host, int(port), clean_session=True, **settings.credentials(),
                    backoff_min_s=0.2, backoff_max_s=2.0)


def send_command(args: argparse.Namespace, cmd: str, cmd_args: dict[str, Any] | None = None) -> CommandReply:
    """Publish one command to args.device and wait up to args.timeout s for its answer."""
    now = time.time()
    command = Command(id=uuid.uuid4().hex, cmd=cmd, args=cmd_args or {}, ts=now,
                      expires=now + args.ttl)
    t_cmd = topic(args.prefix, args.device, "cmd")
    link = operator_link(args, f"ce-op-{command.id[:12]}")
    deadline = time.monotonic() + args.timeout
    sent = False
    try:
        while time.monotonic() < deadline:
            for ev in link.step(0.2):
                if isinstance(ev, Message) and ev.topic == t_cmd + "/reply" and len(ev.payload) <= MAX_REPLY_BYTES:
                    try:
                        reply = CommandReply.model_validate_json(ev.payload)
                    except ValidationError:  # not an answer of ours: someone else's traffic
                        continue
                    if reply.id == command.id:
                        return reply
            if link.connected and not sent:
                try:  # the subscription is in force before the broker reads the command (one connection)
                    link.subscribe(t_cmd + "/reply", 1)
                    link.publish(t_cmd, command.model_dump_json(), qos=1)
                    sent = True
                except NotConnected:
                    pass
    finally:
        link.close()
    why = "the unit did not answer: is it online (`customs-edge hub fleet`)?" if sent else \
        f"cannot reach the broker at {args.broker}: {link.last_error or 'no connection'}"
    raise CustomsEdgeError(f"{cmd} {command.id} to {args.device}: no reply within {args.timeout:g} s; {why} "
                           "(a unit that is offline gets it when it returns, until the command expires)")


def _print_reply(reply: CommandReply) -> int:
    print(reply.model_dump_json(indent=2))
    return 0 if reply.ok else 1


def cmd_cmd(args: argparse.Namespace) -> int:
    return _print_reply(send_command(args, args.name))


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "get":
        reply = send_command(args, "config_get")
        if not reply.ok or reply.result is None:
            return _print_reply(reply)
        sys.stdout.write(reply.result["text"])
        print(f"sha256 {reply.result['sha256']}  {reply.result['file']} on {args.device}", file=sys.stderr)
        return 0
    text = Path(args.file).read_text(encoding="utf-8-sig")
    push = {"text": text, "sha256": hashlib.sha256(text.encode()).hexdigest(), "probation_s": args.probation}
    reply = send_command(args, "config_push", push)
    print(f"{reply.outcome or 'error'}: {args.device} (command {reply.id})")
    if reply.error:
        print(reply.error)
    elif reply.result:
        print(f"running sha256 {reply.result['sha256']}")
    return 0 if reply.outcome == "applied" else 1


def publish_retained(broker: str, t: str, payload: bytes, settings: BrokerSettings, timeout: float) -> None:
    """Publish one retained QoS 1 message and wait for the broker's PUBACK; CustomsEdgeError if it never came."""
    host, _, port = broker.rpartition(":")
    if not host or not port.isdigit():
        raise CustomsEdgeError(f"--broker {broker!r}: write it host:port, e.g. 127.0.0.1:1883")
    link = MqttLink(f"ce-op-{uuid.uuid4().hex[:12]}", host, int(port), clean_session=True,
                    **settings.credentials(), backoff_min_s=0.2, backoff_max_s=2.0)
    deadline = time.monotonic() + timeout
    mid = None
    try:
        while time.monotonic() < deadline:
            for ev in link.step(0.2):
                if isinstance(ev, PubAck) and ev.mid == mid:
                    return
            if link.connected and mid is None:
                try:
                    mid = link.publish(t, payload, qos=1, retain=True)
                except NotConnected:
                    pass
    finally:
        link.close()
    raise CustomsEdgeError(f"no PUBACK from the broker at {broker} within {timeout:g} s: "
                           f"{link.last_error or 'no connection'}")


def cmd_risk_list(args: argparse.Namespace) -> int:
    """`customs-edge fleet risk-list publish FILE`: validate the list, then publish it retained for every unit."""
    from customs_edge.agent.risklist import RiskListError, encode, parse, risk_list_topic

    try:
        payload = encode(Path(args.file))
        m = parse(payload)
    except RiskListError as exc:
        raise CustomsEdgeError(f"{args.file}: {exc}") from None
    settings = BrokerSettings(username=args.username, password=os.environ.get(PASSWORD_ENV) or None,
                              tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                              tls_server_name=args.tls_server_name)
    publish_retained(args.broker, risk_list_topic(args.prefix), payload, settings, args.timeout)
    print(f"published risk list {m.name} version {m.version}: {m.entries} entries ({len(m.patterns)} patterns), "
          f"{len(payload)} bytes, retained on {risk_list_topic(args.prefix)}")
    return 0


def _connection_flags(p: argparse.ArgumentParser, timeout: float, device: bool = True) -> None:
    if device:
        p.add_argument("device", help="the unit's device_id")
    p.add_argument("--broker", default="127.0.0.1:1883", help="host:port of the broker (default 127.0.0.1:1883)")
    p.add_argument("--prefix", default="customs-edge/v1", help="topic prefix (the units' sync.topic_prefix)")
    p.add_argument("--username", help=f"broker user name; its password is read from ${PASSWORD_ENV}")
    p.add_argument("--tls-ca", type=Path, help="CA certificate the broker's is checked against (turns TLS on)")
    p.add_argument("--tls-cert", type=Path, help="the operator's certificate (CN op-NAME)")
    p.add_argument("--tls-key", type=Path, help="the operator's private key (0600), with --tls-cert")
    p.add_argument("--tls-server-name", help="name on the broker's certificate (default: the broker host)")
    p.add_argument("--timeout", type=float, default=timeout, help=f"seconds to wait for the answer ({timeout:g})")
    p.add_argument("--ttl", type=float, default=COMMAND_TTL_S,
                   help=f"seconds the command stays valid, e.g. for an offline unit (default {COMMAND_TTL_S:g})")


def register(sub: Any) -> None:
    """`customs-edge fleet config push|get` and `customs-edge cmd`."""
    f = sub.add_parser("fleet", help="change a unit over the broker: `fleet config push|get DEVICE`;"
                       " `fleet simulate --units N`")
    fsub = f.add_subparsers(dest="what", required=True, metavar="WHAT")
    c = fsub.add_parser("config", help="push a config file to a unit, or get the one it runs")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    push = csub.add_parser("push", help="validate, apply and prove a config on the unit, or roll it back")
    _connection_flags(push, 60.0)
    push.add_argument("file", help="the unit YAML file to push")
    push.add_argument("--probation", type=float, default=20.0,
                      help="seconds every driver of the new config has to deliver a reading (default 20)")
    get = csub.add_parser("get", help="print the config the unit runs (stdout) and its sha256 (stderr)")
    _connection_flags(get, 20.0)
    c.set_defaults(fn=cmd_config)
    from customs_edge.cli import simfleet  # `customs-edge fleet simulate --units N`

    simfleet.register(fsub)
    r = fsub.add_parser("risk-list", help="publish a risk list (retained, versioned) to every handheld")
    rsub = r.add_subparsers(dest="action", required=True, metavar="ACTION")
    rp = rsub.add_parser("publish", help="validate FILE (JSON Lines, gzip or plain) and publish it retained")
    rp.add_argument("file", help="the risk list: a header line, then one entry per line (docs/handheld.md)")
    _connection_flags(rp, 30.0, device=False)
    r.set_defaults(fn=cmd_risk_list)
    from customs_edge.cli.fleet_model import register_model

    register_model(fsub)
    k = sub.add_parser("cmd", help="send a command to a unit and print its answer")
    _connection_flags(k, 20.0)
    k.add_argument("name", choices=SIMPLE_COMMANDS, help="the command")
    k.set_defaults(fn=cmd_cmd)
