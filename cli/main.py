"""customs-edge: the command line a field technician and an operator use.

  customs-edge run --config FILE           run a unit (systemd: customs-edge@NAME.service)
  customs-edge config validate FILE...     check config files (exit 1 with the bad keys)
  customs-edge config schema               JSON Schema of a unit file
  customs-edge probe --config FILE ROLE    read a few frames from one instrument and show them
  customs-edge status --config FILE        the running unit (drivers, link, hub ack, backlog) and its outbox
  customs-edge watch --config FILE         records and alerts as they are produced, one line each
  customs-edge simulate TYPE [...]         serve a simulated device on a pty / loopback socket
  customs-edge hub [--config F] [...]      run a hub;  customs-edge hub stats|fleet [--db F] [--json]
  customs-edge certs init DIR | issue NAME --role R   a development CA, device/hub/operator certificates
  customs-edge fleet config push|get DEVICE [FILE]   change a unit's config over the broker
  customs-edge fleet risk-list publish FILE   publish a risk list (retained, versioned) to the handhelds
  customs-edge cmd DEVICE ping|status|...  send a command to a unit, print its answer
  customs-edge models evaluate NAME        held-out figures of a shipped model
  customs-edge models train wood --images DIR   train an image classifier on DIR/<label>/*.jpg
  customs-edge demo [--duration S --json]  a simulated fleet, broker, agents and hub on this machine
  customs-edge check --config FILE         commissioning: config, models, ports, outbox, broker, clock

Exit codes: 0 ok, 1 a refused config or a failed check (the message names the fix), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict

from customs_edge.agent import registry
from customs_edge.cli import evidence
from customs_edge.core import logs
from customs_edge.core.errors import ConfigError, CustomsEdgeError
from customs_edge.simulators import SIMULATORS
from customs_edge.training import MODELS

log = logging.getLogger("customs_edge")


def _stop_on_signals(reload: threading.Event | None = None) -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if reload is not None:
        signal.signal(signal.SIGHUP, lambda *_: reload.set())
    return stop


def cmd_run(args: argparse.Namespace) -> int:
    from customs_edge.agent.config import load_unit_config
    from customs_edge.agent.runtime import run_forever, tune_gc

    warnings: list[str] = []
    cfg = load_unit_config(args.config, warnings)
    logs.setup(args.log_level or cfg.log_level)
    for w in warnings:  # the same as `config validate` prints: a role the app ignores, a setting the port ignores
        log.warning("config: %s", w, extra={"config": args.config})
    reload = threading.Event()
    stop = _stop_on_signals(reload)
    tune_gc()  # the collector for a long-lived process under load (agent/runtime.py)
    run_forever(cfg, args.config, stop, reload)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from customs_edge.agent.config import load_unit_config, unit_schema

    if args.action == "schema":
        print(json.dumps(unit_schema(), indent=2))
        return 0
    from customs_edge.agent.config import duplicate_units

    bad = 0
    units = {}
    for f in args.files:
        warnings: list[str] = []
        try:
            cfg = load_unit_config(f, warnings)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            bad += 1
        else:
            units[f] = cfg
            print(f"{f}: ok ({cfg.type} {cfg.device_id}, drivers: {', '.join(cfg.drivers) or 'none'})")
        for w in warnings:
            print(f"{f}: warning: {w}", file=sys.stderr)
    for line in duplicate_units(units):
        print(line, file=sys.stderr)
        bad += 1
    return 1 if bad else 0


def cmd_probe(args: argparse.Namespace) -> int:
    from customs_edge.cli import probe

    return probe.main(args)


def _map_size(text: str) -> tuple[int, int]:
    try:
        cols, rows = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write COLSxROWS, e.g. 8x6") from None
    if not (1 <= cols <= 32 and 1 <= rows <= 24):
        raise argparse.ArgumentTypeError(f"{text!r}: at most 32x24 (the MLX90640's pixels)")
    return cols, rows


def cmd_simulate(args: argparse.Namespace) -> int:
    # each simulator parses its own options: `simulate TYPE --help` is its help
    registry.load_object(SIMULATORS[args.type])(args.rest)
    return 0

def cmd_hub(args: argparse.Namespace) -> int:
    from customs_edge.hub.service import Hub
    from customs_edge.hub.storage import is_postgres, open_store

    if args.action == "verify":
        return evidence.cmd_verify(args.db, args.device, args.json, args.keys, args.all_signed)
    if args.action == "fleet":
        from customs_edge.cli.fleet import cmd_fleet

        return cmd_fleet(args.db, args.json)
    if args.action == "stats" and args.lanes:
        from customs_edge.hub.lanes import gate_records, lane_stats

        lane_store = open_store(args.db, readonly=True)
        try:
            lanes = lane_stats(gate_records(lane_store.db))
        finally:
            lane_store.close()
        if args.json:
            print(json.dumps({"lanes": {x.device_id: x.as_dict() for x in lanes}}, indent=2))
        else:
            print(f"{'lane':<20} {'screened':>9} {'alerts':>7} {'followed up':>11} {'confirmed':>9} "
                  f"{'confirmed rate':>14} {'field PPV (95 % CI)':>24}")
            for x in lanes:
                rate = "-" if x.confirmed_rate is None else f"{100 * x.confirmed_rate:.3f} %"
                ppv = "-" if x.field_ppv is None else f"{x.field_ppv:.2f} ({x.field_ppv_ci95[0]:.2f}-" \
                    f"{x.field_ppv_ci95[1]:.2f})" if x.field_ppv_ci95 else f"{x.field_ppv:.2f}"
                print(f"{logs.escape(x.device_id):<20} {x.screened:>9} {x.alerts:>7} {x.followed_up:>11} "
                      f"{x.confirmed:>9} {rate:>14} {ppv:>24}")
        return 0
    if args.action == "stats":
        store = open_store(args.db, readonly=True)  # a mistyped --db is an error, never a new empty database
        rows, refused = store.stats(), store.refused()
        if args.json:
            print(json.dumps({"devices": {r.device_id: asdict(r) for r in rows}, "refused_batches": refused}, indent=2))
        else:
            print(f"{'device':<20} {'received':>9} {'stored':>9} {'dups dropped':>12} {'conflicts':>9} {'rejected':>8} "
                  f"{'gaps':>6} {'status':>8}")
            for r in rows:  # device ids and statuses come from the network: escaped, one line each
                print(f"{logs.escape(r.device_id):<20} {r.received:>9} {r.stored:>9} {r.duplicates:>12} "
                      f"{r.conflicts:>9} {r.rejected:>8} {r.gaps:>6} {logs.escape(r.status or '-'):>8}")
                if r.gaps:
                    print(f"{'':<20} missing seq ranges: {store.gap_ranges(r.device_id)}")
                if r.suspect:
                    print(f"{'':<20} {r.suspect} records quarantined as suspect (an implausible seq jump):"
                          " table `suspect`")
            if refused:
                print("records messages refused whole (never acked): "
                      + ", ".join(f"{k} {n}" for k, n in refused.items()))
        store.close()
        return 0
    logs.setup(args.log_level or "INFO")
    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "db": args.db,
                                   "share_group": args.share_group, "client_id": args.client_id,
                                   "tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key,
                                   "tls_server_name": args.tls_server_name, "keys": args.keys,
                                   "alerts_tls_cert": args.alerts_tls_cert,
                                   "alerts_tls_key": args.alerts_tls_key}.items()
                 if v is not None}
    if args.photos_dir is not None:
        overrides["photos_dir"] = args.photos_dir
    if args.db is not None and is_postgres(args.db):  # several workers share one PostgreSQL (docs/scale.md)
        overrides["postgres"] = overrides.pop("db")
    if args.no_share:
        overrides["share_group"] = None
    if args.require_signatures:
        overrides["require_signatures"] = True
    from customs_edge.cli.hubconfig import load_hub_config

    cfg = load_hub_config(args.config, overrides)  # the file, then the flags on top; every problem at once
    if args.check_config:
        where = "PostgreSQL" if cfg.postgres else f"db {cfg.db}"  # a URL may hold a password: not shown
        print(f"{args.config or 'options'}: ok (broker {cfg.host}:{cfg.port}, {where}"
              f"{', TLS' if cfg.tls() else ''}{', keys ' + str(cfg.keys) if cfg.keys else ''})")
        return 0
    hub = Hub(cfg)
    stop = _stop_on_signals()
    hub.run(stop)
    return 0

def _hub_db_from(config: str | None) -> str | None:
    """`hub stats|fleet|verify --config F`: the database the hub's config names."""
    if config is None:
        return None
    from pathlib import Path

    from customs_edge.agent.config import read_yaml

    raw = read_yaml(Path(config))
    if not isinstance(raw, dict):
        return None
    return str(raw.get("postgres") or raw.get("db") or "") or None


def cmd_models(args: argparse.Namespace) -> int:
    kw = {"optics": args.optics} if args.name == "fever" and getattr(args, "optics", None) else {}
    result = registry.load_object(MODELS[args.name])(seed=args.seed, **kw)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")
    return 0

def cmd_check(args: argparse.Namespace) -> int:
    from customs_edge.cli import check

    return check.main(args.config, as_json=args.json, frame_timeout_s=args.frame_timeout,
                      outage_hours=args.outage_hours)

def cmd_demo(args: argparse.Namespace) -> int:
    from customs_edge.cli.demo import run_demo
    from customs_edge.hub.brokers import mosquitto_path

    if args.broker == "mosquitto" and mosquitto_path() is None:
        raise CustomsEdgeError("mosquitto is not installed: install it (apt-get install mosquitto) "
                               "or run with --broker embedded")

    return run_demo(duration=args.duration, as_json=args.json, workdir=args.workdir,
                    types=args.types.split(",") if args.types else None, broker_kind=args.broker,
                    console=None if args.console in ("", "off") else args.console)

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
CONFIG_HELP = "the unit's YAML file (e.g. /etc/customs-edge/ore-01.yaml)"

def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("customs-edge")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="customs-edge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run a unit")
    r.add_argument("--config", required=True, help=CONFIG_HELP)
    r.add_argument("--log-level", choices=LOG_LEVELS, help="overrides the config's log_level")
    r.set_defaults(fn=cmd_run)

    c = sub.add_parser("config", help="validate config files or print the schema")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    v = csub.add_parser("validate", help="check unit files, and across them: duplicate device ids and outboxes")
    v.add_argument("files", nargs="+", help="one or more unit YAML files")
    csub.add_parser("schema", help="JSON Schema of a unit file, for editors")
    c.set_defaults(fn=cmd_config)

    pr = sub.add_parser("probe", help="read a few frames from one configured instrument",
                        description="Open one instrument as configured and show what it sends. --hexdump: the "
                                    "wire on stderr, one block per frame, both directions, control calls, Modbus "
                                    "and thermal frames decoded. --scan: which baud rate and parity give frames.")
    pr.add_argument("--config", required=True, help=CONFIG_HELP)
    pr.add_argument("role", help="the driver's role name in the config (a key under drivers:)")
    pr.add_argument("--count", type=int, default=10, help="stop after this many readings (default 10)")
    pr.add_argument("--seconds", type=float, default=10.0, help="give up after this long (default 10)")
    pr.add_argument("--hexdump", action="store_true",
                    help="the wire on stderr, one block per frame (< read, > written, ! control, # decoded)")
    pr.add_argument("--map", type=_map_size, default=(8, 6), metavar="COLSxROWS",
                    help="size of a thermal frame's text heat map (default 8x6)")
    pr.add_argument("--scan", action="store_true",
                    help="try every common baud rate x parity on a serial role and report which give valid frames")
    pr.add_argument("--scan-seconds", type=float, default=1.5,
                    help="how long --scan listens at each setting (default 1.5)")
    pr.set_defaults(fn=cmd_probe)

    from customs_edge.cli import status, watch  # `customs-edge status`, `customs-edge watch`

    status.register(sub, CONFIG_HELP)
    watch.register(sub, CONFIG_HELP)

    s = sub.add_parser("simulate", help="serve a simulated device (`simulate TYPE --help` for its options)",
                       description="Serve a simulated device on a pty and a loopback socket. "
                                   "`customs-edge simulate TYPE --help` lists that simulator's options.")
    s.add_argument("type", choices=sorted(SIMULATORS), help="the simulated device")
    s.add_argument("rest", nargs=argparse.REMAINDER, help="options of that simulator")
    s.set_defaults(fn=cmd_simulate)

    h = sub.add_parser("hub", help="run the hub, or `hub stats`, or `hub fleet` (every unit's health)")
    h.add_argument("action", nargs="?", choices=["run", "stats", "fleet", "verify"], default="run",
                   help="run (default): store what units send; stats: per-device counts from the database; "
                        "fleet: every unit's latest health; verify [DEVICE]: prove each device's stored history "
                        "complete and unaltered, or name the first bad seq (exit 1)")
    h.add_argument("device", nargs="?", help="verify: this device only")
    h.add_argument("--keys", help="key registry: `DEVICE_ID ed25519:BASE64` lines (`customs-edge key CONFIG`);"
                                  " a registered device's batches must be signed by its key; verify: check the"
                                  " batch signatures kept for each registered device too")
    h.add_argument("--require-signatures", action="store_true", help="refuse batches of unregistered devices too")
    h.add_argument("--all-signed", action="store_true", help="verify, with --keys: every record of a registered device"
                   " must be covered by a kept signature (devices registered from their first record: a deleted"
                   " signature is found too)")
    h.add_argument("--config", help="the hub's config file (configs/hub/hub.yaml; `config schema`-style keys of "
                                    "HubConfig); options given here override it")
    h.add_argument("--check-config", action="store_true",
                   help="validate the config (file and options) and the files it names, then exit (0: ok)")
    h.add_argument("--db", default=None, help="the hub's SQLite database, or a postgresql://USER@HOST:PORT/DBNAME"
                                              " URL (several hub workers share one PostgreSQL: docs/scale.md)")
    h.add_argument("--photos-dir", help="evidence photos (default: the --db file's path + .photos)")
    h.add_argument("--host", help="broker host")
    h.add_argument("--port", type=int, help="broker port")
    h.add_argument("--share-group", help="MQTT shared-subscription group (several hubs share the load)")
    h.add_argument("--no-share", action="store_true", help="plain subscription (brokers without $share)")
    h.add_argument("--client-id", help="MQTT client id (default: derived from this machine and the database)")
    h.add_argument("--tls-ca", help="CA certificate the broker's is checked against (turns TLS on)")
    h.add_argument("--tls-cert", help="the hub's certificate (CN hub-NAME, listed in the broker's ACL)")
    h.add_argument("--tls-key", help="the hub's private key (0600), with --tls-cert")
    h.add_argument("--tls-server-name", help="name on the broker's certificate (default: --host)")
    h.add_argument("--alerts-tls-cert", help="the alert lane's own certificate (CN e.g. hub-1-alerts: a second session"
                   " needs a second name), with --alerts-tls-key; without it, with --tls-cert, the lane is off")
    h.add_argument("--alerts-tls-key", help="its private key (0600)")
    h.add_argument("--json", action="store_true", help="stats or fleet as JSON")
    h.add_argument("--lanes", action="store_true", help="stats: per gate lane, fever alerts followed up, "
                                                        "confirmed rate and field PPV (from fever_confirmation)")
    h.add_argument("--log-level", choices=LOG_LEVELS, help="default INFO")
    h.set_defaults(fn=cmd_hub)

    k = sub.add_parser("key", help="print the unit's public key for the hub's key registry (made on first use)")
    k.add_argument("config", help="the unit's config file: the key lives beside its outbox (outbox.path + .key)")
    k.set_defaults(fn=evidence.cmd_key)

    from customs_edge.cli import certs  # `customs-edge certs init|issue`

    certs.register(sub)

    from customs_edge.cli import fleet  # `customs-edge fleet config push|get`, `customs-edge cmd`

    fleet.register(sub)

    from customs_edge.cli import console  # `customs-edge console serve|user|users`

    console.register(sub)

    m = sub.add_parser("models", help="model figures")
    msub = m.add_subparsers(dest="action", required=True, metavar="ACTION")
    ev = msub.add_parser("evaluate", help="train on the synthetic set and print held-out figures")
    ev.add_argument("name", choices=sorted(MODELS), help="the model")
    ev.add_argument("--seed", type=int, default=1, help="data seed (default 1)")
    ev.add_argument("--json", action="store_true", help="print JSON")
    ev.add_argument("--optics", choices=["mlx90640", "lepton35", "ir384"],
                    help="fever: the camera whose model is evaluated (default mlx90640)")
    m.set_defaults(fn=cmd_models)
    from customs_edge.cli import models_train  # `customs-edge models train wood|insects --images DIR`

    models_train.register(msub)

    ck = sub.add_parser("check", help="commissioning: is this unit ready to run? (✓ / ! / ✗ and the fix)",
                        description="One line per check, with the fix for each ! and ✗. "
                                    "Exit code: 0 all passed, 3 warnings, 1 a check failed.")
    ck.add_argument("--config", required=True, help=CONFIG_HELP)
    ck.add_argument("--json", action="store_true", help="print the results as JSON")
    ck.add_argument("--frame-timeout", type=float, default=None,
                    help="seconds to wait for a valid frame per port (default: its silent_after_s)")
    ck.add_argument("--outage-hours", type=float, default=8.0,
                    help="hours of hub outage the outbox must hold at the unit's record rate (default 8)")
    ck.set_defaults(fn=cmd_check)

    d = sub.add_parser("demo", help="simulated fleet + broker + agents + hub on this machine")
    d.add_argument("--duration", type=float, default=None, help="seconds; default: until Ctrl-C")
    d.add_argument("--json", action="store_true", help="print one JSON summary at the end")
    d.add_argument("--workdir", default=None, help="default: a new temporary directory")
    d.add_argument("--types", default=None, help="comma-separated unit types (default: every available one)")
    d.add_argument("--broker", choices=["auto", "mosquitto", "embedded"], default="auto",
                   help="auto: a local mosquitto if installed, else the embedded broker")
    d.add_argument("--console", default="127.0.0.1:8080",
                   help="serve the officers' console here, anonymous on loopback (default 127.0.0.1:8080; a free"
                        " port if taken; off: none)")
    d.set_defaults(fn=cmd_demo)
    return p

def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "hub" and args.all_signed and not args.keys:
        parser.error("hub verify --all-signed checks kept signatures: give the key registry with --keys")
    if args.command == "hub" and args.action in ("stats", "fleet", "verify") and args.db is None:
        from customs_edge.hub.service import DEFAULT_DB

        args.db = str(_hub_db_from(args.config) or DEFAULT_DB)
    # an expected failure is one line that names the fix, never a traceback
    try:
        sys.exit(args.fn(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
    except CustomsEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error:{where}: {exc.strerror or exc}", file=sys.stderr)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(1)
