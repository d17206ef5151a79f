"""`customs-edge console serve|user|users|export-labels|verify-audit`: the officers' web console, its users and
its audit trail."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from pathlib import Path

from customs_edge.core import logs
from customs_edge.core.errors import CustomsEdgeError

DEFAULT_STATE = "console.db"
PASSWORD_ENV = "CUSTOMS_EDGE_MQTT_PASSWORD"
AUDIT_KEY_HELP = ("the audit trail's key file (default: the console's file's name + .key, beside it; made, 0600, on the"
                  " first start)")


def _state_path(args: argparse.Namespace) -> Path:
    if args.state:
        return Path(args.state)
    from customs_edge.hub.storage import is_postgres

    db = getattr(args, "db", None)
    return Path(db).with_name(DEFAULT_STATE) if db and not is_postgres(db) else Path(DEFAULT_STATE)


def cmd_serve(args: argparse.Namespace) -> int:
    from customs_edge.hub.console.server import serve

    logs.setup(args.log_level)
    from customs_edge.core.mqtt import BrokerSettings

    settings = BrokerSettings(username=args.mqtt_username, password=os.environ.get(PASSWORD_ENV) or None,
                              tls_ca=args.mqtt_tls_ca, tls_cert=args.mqtt_tls_cert, tls_key=args.mqtt_tls_key,
                              tls_server_name=args.mqtt_tls_server_name)
    server = serve(args.db, _state_path(args), args.listen, anonymous=args.anonymous, tls_cert=args.tls_cert,
                   tls_key=args.tls_key, broker=args.broker, broker_settings=settings, prefix=args.prefix,
                   photos=args.photos_dir, trusted_proxies=args.trusted_proxy or (), audit_key=args.audit_key)
    from customs_edge.hub.storage import is_postgres
    from customs_edge.hub.store_pg import redact

    print(f"console: {server.url()}  (hub store {redact(args.db) if is_postgres(args.db) else args.db})", flush=True)
    logging.getLogger(__name__).info("console serving", extra={"url": server.url()})
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.console.stopping.set()
        server.server_close()
    return 0


def cmd_user(args: argparse.Namespace) -> int:
    from customs_edge.hub.console.state import ConsoleState

    state = ConsoleState(_state_path(args), args.audit_key)
    if args.action == "list":
        for name, role in state.users():
            print(f"{name:<24} {role}")
        return 0
    if args.password_file:
        password = Path(args.password_file).read_text().rstrip("\n")
    elif sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise CustomsEdgeError("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not args.name or not args.role:
        raise CustomsEdgeError("user add NAME --role officer|technician|admin")
    state.add_user(args.name, args.role, password)
    print(f"user {args.name} ({args.role}) saved in {state.path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("console", help="the officers' web console: alerts, fleet, lots, lanes, audit trail")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = csub.add_parser("serve", help="serve the console over HTTP(S) from the hub's database")
    s.add_argument("--db", required=True, help="the hub's store, read only: a SQLite file or a postgresql:// URL")
    s.add_argument("--photos-dir", help="the hub's photo store (default: DB.photos beside a SQLite file; with"
                                        " PostgreSQL, the workers' --photos-dir)")
    s.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (default 127.0.0.1:8080)")
    s.add_argument("--state", help=f"the console's own file: users, sessions, audit trail (default: {DEFAULT_STATE}"
                                   " beside --db)")
    s.add_argument("--anonymous", action="store_true", help="no login (a demo; refused unless HOST is loopback)")
    s.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    s.add_argument("--tls-key", help="its private key (PEM)")
    s.add_argument("--broker", help="HOST:PORT of the units' broker: remote inspection (snapshots on request)")
    s.add_argument("--prefix", default="customs-edge/v1", help="topic prefix (the units' sync.topic_prefix)")
    s.add_argument("--mqtt-username", help=f"broker user name; its password is read from ${PASSWORD_ENV}")
    s.add_argument("--mqtt-tls-ca", type=Path, help="CA certificate the broker's is checked against (turns TLS on)")
    s.add_argument("--mqtt-tls-cert", type=Path, help="the console's operator certificate (CN op-NAME)")
    s.add_argument("--mqtt-tls-key", type=Path, help="its private key (0600)")
    s.add_argument("--mqtt-tls-server-name", help="name on the broker's certificate (default: the broker host)")
    s.add_argument("--trusted-proxy", action="append", metavar="CIDR",
                   help="a reverse proxy (address or network; repeat for several) whose X-Forwarded-For names the"
                        " client, for the login throttle and the audit trail; from anyone else the header is ignored")
    s.add_argument("--audit-key", help=AUDIT_KEY_HELP)
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO")
    s.set_defaults(fn=cmd_serve)
    x = csub.add_parser("export-labels", help="reviewed identifications as a training set DIR/<label>/*.jpg")
    x.add_argument("dir", help="where to write the training set")
    x.add_argument("--db", required=True, help="the hub's store: a SQLite file or a postgresql:// URL")
    x.add_argument("--photos-dir", help="the hub's photo store (default: DB.photos beside a SQLite file)")
    x.add_argument("--state", help=f"the console's own file (default: {DEFAULT_STATE} beside --db)")
    x.add_argument("--audit-key", help=AUDIT_KEY_HELP)
    x.set_defaults(fn=cmd_export_labels)
    v = csub.add_parser("verify-audit", help="prove the audit trail's chain with its key (exit 1 if altered)")
    v.add_argument("--state", help=f"the console's own file (default: {DEFAULT_STATE} beside --db)")
    v.add_argument("--db", help="the hub's database: the console's file defaults to console.db beside it")
    v.add_argument("--audit-key", help=AUDIT_KEY_HELP)
    v.set_defaults(fn=cmd_verify_audit)
    for action, text in (("user", "add or change a user (the password from --password-file, a prompt or stdin)"),
                         ("users", "list the users")):
        u = csub.add_parser(action, help=text)
        if action == "user":
            u.add_argument("name", help="the login name")
            u.add_argument("--role", required=True, choices=["officer", "technician", "admin"], help="what they may do")
            u.add_argument("--password-file", help="read the password from this file (first line)")
        u.add_argument("--state", help=f"the console's own file (default {DEFAULT_STATE})")
        u.add_argument("--db", help="the hub's database: the console's file defaults to console.db beside it")
        u.add_argument("--audit-key", help=AUDIT_KEY_HELP)
        u.set_defaults(fn=cmd_user, action="list" if action == "users" else "add")


def cmd_export_labels(args: argparse.Namespace) -> int:
    """Reviewed identifications as a training set: DIR/<label>/<sha256>.jpg (the layout `models train` reads).
    The photo's name comes from the unit's record and the label from the console's file: each is checked to be
    a sha256 and a plain name, so nothing is read or written outside the photo store and DIR."""
    import re
    import shutil

    from customs_edge.hub.console.pages import LABEL_RE
    from customs_edge.hub.console.queries import HubReader
    from customs_edge.hub.console.state import ConsoleState

    state = ConsoleState(_state_path(args), getattr(args, "audit_key", None))
    reader = HubReader(args.db)
    photos = Path(args.photos_dir or f"{args.db}.photos")
    out = Path(args.dir)
    written = missing = refused = 0
    for (device_id, seq), act in sorted(state.labels().items()):
        rec = reader.record(device_id, seq, "identification")
        sha = rec.payload.get("photo") if rec else None
        if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)
                                    and re.fullmatch(LABEL_RE, act.detail)):
            refused += 1
            continue
        src = photos / sha[:2] / f"{sha}.jpg" if sha else None
        if src is None or not src.is_file():
            missing += 1
            continue
        (out / act.detail).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / act.detail / f"{sha}.jpg")
        written += 1
    print(f"{written} reviewed photos written to {out} (DIR/<label>/<sha256>.jpg); {missing} without their photo"
          " at the hub" + (f"; {refused} refused (a photo not named by its sha256, or a label that is no plain name)"
                           if refused else ""))
    return 0


def cmd_verify_audit(args: argparse.Namespace) -> int:
    """The audit trail proven entry by entry: 0 if intact, 1 with the first altered entry named. A trail not
    keyed yet (a console file from before keys) is proven by its plain chain and left so."""
    from customs_edge.hub.console.state import ConsoleState

    path = _state_path(args)
    if not path.is_file():
        raise CustomsEdgeError(f"no console file {path}: name it with --state (or --db, beside which it lies)")
    state = ConsoleState(path, args.audit_key, verify_only=True)
    try:
        proven, bad = state.verify_audit()
    finally:
        state.close()
    how = (f"keyed with {state.key_path}" + (f" after entry {state.keyed_after}" if state.keyed_after else "")
           if state.key is not None else "not keyed yet (the console keys it on its next start)")
    if bad is not None:
        print(f"audit trail of {path}: ALTERED at entry {bad} ({_n(proven)} before it proven; {how})")
        return 1
    print(f"audit trail of {path}: intact, {_n(proven)} proven ({how})")
    return 0


def _n(entries: int) -> str:
    return f"{entries} entr{'y' if entries == 1 else 'ies'}"
