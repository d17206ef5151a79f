"""The console's HTTP server: standard library only (a port's closed network, no build step).

Every page needs a session (a login with a role) unless the console was started with `anonymous` on a
loopback address for a demo. Forms that change anything are POSTs carrying the session's CSRF token; the
session cookie is HttpOnly and SameSite=Strict; pages are sent with a Content-Security-Policy that allows
only the console's own script and styles. New alerts reach open pages through server-sent events.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import secrets
import ssl
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from customs_edge.core.errors import CustomsEdgeError
from customs_edge.core.mqtt import BrokerSettings
from customs_edge.hub.console import pages
from customs_edge.hub.console.inspection import Inspection
from customs_edge.hub.console.proxies import TrustedProxies, parse_networks
from customs_edge.hub.console.queries import Filters, HubReader
from customs_edge.hub.console.state import ConsoleState, Session, same
from customs_edge.hub.console.throttle import Throttle
from customs_edge.hub.storage import is_postgres, open_store

log = logging.getLogger(__name__)

COOKIE = "ce_session"
PRE = "ce_pre"  # the login form's double-submit token, before any session exists
MAX_FORM = 16 * 1024
IDLE_S = 60.0  # a connection that sends (or takes) nothing this long is closed: no thread held by a silent client
MAX_CONNECTIONS = 200  # open at once; past it a new one is closed at once (each holds a thread)
MAX_STREAMS, MAX_STREAMS_PER_SESSION = 64, 8  # live event streams open at once: in all, and per session
EVENT_POLL_S = 0.2  # how often an open alerts page's stream looks for new alerts: well inside the 1 s promise
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def local_path(nxt: str) -> str:
    """Where to go after the login: a path on this console, else the alerts. Printable ASCII only (a CR or LF
    would start a header of the attacker's in the redirect), and never `//` or `/\\` (a browser reads both as
    another host)."""
    return nxt if re.fullmatch(r"/(?![/\\])[!-~]*", nxt) and "\\" not in nxt else "/alerts"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Console:
    """What the handlers share: the hub's database (read-only), the console's own file, the settings."""

    def __init__(self, hub_db: str | Path, state: str | Path, *, anonymous: bool = False,
                 host: str = "127.0.0.1", inspection: Inspection | None = None,
                 photos: str | Path | None = None, trusted_proxies: Sequence[str] = (),
                 audit_key: str | Path | None = None) -> None:
        self.proxies = TrustedProxies(parse_networks(trusted_proxies))  # whose X-Forwarded-For is read
        self.inspection = inspection  # remote inspection over the broker; None: not configured
        if anonymous and not is_loopback(host):
            raise CustomsEdgeError(f"anonymous access only on a loopback address, not {host}: add users with"
                                   " `customs-edge console user add NAME --role officer` and drop --anonymous")
        open_store(hub_db, readonly=True).close()  # a mistyped path is an error here, not an empty console
        self.reader = HubReader(hub_db)
        # the hub's content-addressed photo store (hub/photos.py): beside a SQLite file, or the workers' --photos-dir
        self.photos = Path(photos) if photos else None if is_postgres(hub_db) else Path(f"{hub_db}.photos")
        self.state = ConsoleState(state, audit_key)
        if not anonymous and not self.state.users():
            raise CustomsEdgeError(f"no console users in {state}: add one with `customs-edge console user add NAME"
                                   " --role admin --state " f"{state}` (or, on loopback for a demo, --anonymous)")
        self.anonymous = Session("demo", "officer", secrets.token_urlsafe(32)) if anonymous else None
        self.throttle = Throttle()
        self.state.decoy()  # prepared now: the first unknown name costs no more than a wrong password
        self.stopping = threading.Event()
        self.streams: dict[str, int] = {}  # open event streams per session (its CSRF token names it)
        self.streams_lock = threading.Lock()

    def stream_slot(self, s: Session) -> bool:
        with self.streams_lock:
            if sum(self.streams.values()) >= MAX_STREAMS or self.streams.get(s.csrf, 0) >= MAX_STREAMS_PER_SESSION:
                return False
            self.streams[s.csrf] = self.streams.get(s.csrf, 0) + 1
            return True

    def stream_done(self, s: Session) -> None:
        with self.streams_lock:
            self.streams[s.csrf] -= 1
            if not self.streams[s.csrf]:
                del self.streams[s.csrf]

    def photo_path(self, sha: str) -> Path | None:
        if self.photos is None or not re.fullmatch(r"[0-9a-f]{64}", sha):
            return None
        f = self.photos / sha[:2] / f"{sha}.jpg"
        return f if f.is_file() else None


class Handler(BaseHTTPRequestHandler):
    server: ConsoleServer
    protocol_version = "HTTP/1.1"
    timeout = IDLE_S  # on the connection's socket (StreamRequestHandler.setup); with TLS, the handshake too

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    # -- plumbing ------------------------------------------------------------------------------------
    @property
    def c(self) -> Console:
        return self.server.console

    def _client(self) -> str:
        """The client's address: the TCP peer's, or behind a trusted reverse proxy the one it forwards for."""
        return self.c.proxies.client(str(self.client_address[0]), self.headers.get_all("X-Forwarded-For"))

    def _cookies(self) -> SimpleCookie:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(self.headers.get("Cookie", ""))
        except CookieError:
            pass
        return jar

    def _session(self) -> Session | None:
        if self.c.anonymous:
            return self.c.anonymous
        m = self._cookies().get(COOKIE)
        return self.c.state.session(m.value if m else None)

    def _send(self, status: int, body: bytes, ctype: str = "text/html; charset=utf-8",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "same-origin")
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _html(self, text: str, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, text.encode(), headers=headers)

    def _redirect(self, to: str, headers: dict[str, str] | None = None) -> None:
        self._send(HTTPStatus.SEE_OTHER, b"", headers={"Location": to, **(headers or {})})

    def _error(self, status: int, text: str, s: Session | None = None) -> None:
        self._html(pages.page(f"{status}", f"<p class=bad>{pages.e(text)}</p>", s), status)

    def _form(self) -> dict[str, str] | tuple[int, str]:
        """The posted form, or (status, why) for a body this server will not read: the connection is then
        closed, so no byte of that body is ever taken for a request of its own."""
        lengths = self.headers.get_all("Content-Length") or ["0"]
        if self.headers.get("Transfer-Encoding") is not None:
            why: tuple[int, str] = (411, "send the form with a Content-Length, not chunked")
        elif len(lengths) > 1 or not re.fullmatch(r"[0-9]{1,12}", lengths[0].strip()):
            why = (400, "a Content-Length is one number of bytes")
        elif int(lengths[0]) > MAX_FORM:
            why = (413, "form too large")
        else:
            body = self.rfile.read(int(lengths[0])).decode("utf-8", "replace")
            try:
                return {k: v[0] for k, v in parse_qs(body, max_num_fields=20).items()}
            except ValueError:
                return 400, "a form has at most 20 fields"
        self.close_connection = True
        return why

    def _secure(self) -> str:
        return "; Secure" if isinstance(self.connection, ssl.SSLSocket) else ""

    def _host_ok(self) -> bool:
        """The loopback demo answers only to a loopback name: a page from another site whose name was
        re-pointed at 127.0.0.1 (DNS rebinding) would otherwise read and act as the demo officer."""
        host = self.headers.get("Host")
        if self.c.anonymous is None or host is None:
            return True
        m = re.fullmatch(r"\[([^\]]*)\](?::[0-9]*)?|([^:]*)(?::[0-9]*)?", host.strip())
        return m is not None and is_loopback((m.group(1) or m.group(2) or "").lower())

    def _same_origin(self) -> bool:
        """A browser's POST says where it comes from: refuse another site's (with the CSRF token, two fences)."""
        origin = self.headers.get("Origin")
        return origin is None or urlsplit(origin).netloc == self.headers.get("Host")

    # -- GET -----------------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        if self.headers.get("Transfer-Encoding") is not None or self.headers.get("Content-Length") not in (None, "0"):
            self.close_connection = True  # a body is not read here: never taken for the next request
        if not self._host_ok():
            return self._error(HTTPStatus.MISDIRECTED_REQUEST, "the demo console answers on its loopback address only")
        url = urlsplit(self.path)
        path, q = url.path, {k: v[0] for k, v in parse_qs(url.query).items()}
        if path.startswith("/static/"):
            return self._static(path.removeprefix("/static/"))
        if path == "/favicon.ico":
            return self._send(204, b"", "image/x-icon")
        if path == "/login":  # one token per browser: a second tab or a stray request must not void the first form
            held = self._cookies().get(PRE)
            # a value of ours only: a quoted cookie may carry any octet, CR LF included, back into Set-Cookie
            ours = held is not None and re.fullmatch(r"[A-Za-z0-9_-]{16,64}", held.value)
            pre = held.value if held is not None and ours else secrets.token_urlsafe(16)
            return self._html(pages.login_page("", pre, q.get("next", "/alerts")), headers={
                "Set-Cookie": f"{PRE}={pre}; HttpOnly; SameSite=Strict; Path=/login{self._secure()}"})
        s = self._session()
        if s is None:
            return self._redirect("/login?next=" + (path if path.startswith("/") else "/"))
        now = time.time()
        if path in ("/", "/alerts"):
            f = _filters(q)
            rows = self._alerts(f, limit=200)
            return self._html(pages.alerts_page(rows, f, self.c.reader.choices(), s, self.c.reader.latest_alert_at()))
        if path in ("/events", "/events/snapshot/") or path.startswith("/events/snapshot/"):
            if not self.c.stream_slot(s):
                return self._error(HTTPStatus.SERVICE_UNAVAILABLE, "too many live pages open: close some", s)
            try:
                if path == "/events":
                    try:
                        after = float(q.get("after") or 0)
                    except ValueError:
                        return self._error(400, "after: a time in seconds", s)
                    return self._events(_filters(q), after)
                return self._snapshot_events(unquote(path.removeprefix("/events/snapshot/")))
            finally:
                self.c.stream_done(s)
        if path.startswith("/alert/"):
            found = self._alert(path)
            if found is None:
                return self._error(404, "no such alert", s)
            a = found
            state = self.c.state.states([a.key])[a.key]
            return self._html(pages.alert_page(a, state, self.c.state.actions(*a.key), s))
        if path == "/fleet":
            return self._html(pages.fleet_page(self.c.reader.fleet(), s, now))
        if path == "/lots":
            lots = self.c.reader.latest("lot_report", 50)
            series: dict[str, list[tuple[float, float]]] = {}
            wanted = {str(r.payload.get("lot_id")) for r in lots[:5]}
            if lots:
                oldest = min(pages.num(r.payload.get("opened"), r.ts) for r in lots[:5])
                for r in self.c.reader.series("ore_analysis", oldest - 60, limit=100000):
                    lot, m = str(r.payload.get("lot_id")), r.payload.get("model")
                    if lot in wanted and isinstance(m, dict) and isinstance(m.get("fe"), (int, float)):
                        series.setdefault(lot, []).append((pages.num(r.payload.get("lot_t")), float(m["fe"])))
            return self._html(pages.lots_page(lots, series, s))
        if path == "/lanes":
            newest = self.c.reader.latest("lane_summary", 1)
            since = (newest[0].ts if newest else now) - 24 * 3600  # the day up to the newest summary
            hours = pages.lane_hours(self.c.reader.series("lane_summary", since, limit=100000),
                                     self.c.reader.confirmations(since))
            return self._html(pages.lanes_page(hours, s))
        if path == "/review":
            idents = self.c.reader.latest("identification", 100)
            labels = self.c.state.labels([r.key for r in idents])
            known = sorted({str(x) for r in idents for x in [r.payload.get("label"),
                                                             *[t[0] for t in pages.as_list(r.payload.get("top3"))
                                                               if isinstance(t, list | tuple) and t]]
                            if isinstance(x, str) and x} | {a.detail for a in labels.values()})
            return self._html(pages.review_page([(r, labels.get(r.key)) for r in idents], known, s))
        if path.startswith("/photo/") and path.endswith(".jpg"):
            sha = path[7:-4]
            photo = self.c.photo_path(sha)
            if photo is None:
                return self._error(404, "no such photo", s)
            return self._send(200, photo.read_bytes(), "image/jpeg")
        if path == "/inspect":
            insp = self.c.inspection
            return self._html(pages.inspect_page(self.c.reader.fleet(), s, None if insp is None else insp.connected))
        if path.startswith("/inspect/"):
            return self._html(pages.view_page(unquote(path.removeprefix("/inspect/")), s))
        if path.startswith("/snapshot/") and path.endswith(".jpg"):
            snap = self.c.inspection.snapshot(unquote(path[10:-4])) if self.c.inspection else None
            if snap is None:
                return self._error(404, "no snapshot", s)
            return self._send(200, snap.jpeg, "image/jpeg")
        if path == "/audit":
            proven, bad = self.c.state.verify_audit()
            return self._html(pages.audit_page(self.c.state.audit(), proven, bad, s))
        return self._error(404, f"no page {path}", s)

    def _alerts(self, f: Filters, limit: int, after: float | None = None) -> list[tuple[Any, str]]:
        out: list[tuple[Any, str]] = []
        before = None
        for _ in range(20):  # the state filter lives in the console's file: page through until enough
            rows = self.c.reader.alerts(f, limit=limit, after=after, before=before)
            states = self.c.state.states([a.key for a in rows])
            out += [(a, states[a.key]) for a in rows if not f.state or states[a.key] == f.state]
            if len(rows) < limit or len(out) >= limit or not f.state:
                break
            before = rows[-1].received_at
        return out[:limit]

    def _alert(self, path: str) -> Any:
        parts = path.split("/")
        if len(parts) < 4:
            return None
        try:
            seq = int(parts[3])
        except ValueError:
            return None
        return self.c.reader.alert(unquote(parts[2]), seq)

    def _static(self, name: str) -> None:
        kinds = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
        if name not in kinds:
            return self._error(404, "not found")
        body = resources.files("customs_edge.hub.console").joinpath("static", name).read_bytes()
        self._send(200, body, kinds[name])

    def _events(self, f: Filters, after: float) -> None:
        """Server-sent events: each new alert (through the page's filters) as a rendered row."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        quiet_since = time.monotonic()
        try:
            self.wfile.write(b"retry: 1000\n\n")
            self.wfile.flush()
            while not self.c.stopping.is_set():
                rows = self._alerts(f, limit=100, after=after)
                for a, state in reversed(rows):
                    msg = json.dumps({"key": f"{a.device_id}/{a.seq}", "html": pages.alert_row(a, state)})
                    self.wfile.write(f"event: alert\ndata: {msg}\n\n".encode())
                    after = max(after, a.received_at)
                if rows or time.monotonic() - quiet_since > 15:
                    if not rows:
                        self.wfile.write(b": still here\n\n")  # a comment: finds a closed page
                    self.wfile.flush()
                    quiet_since = time.monotonic()
                self.c.stopping.wait(EVENT_POLL_S)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            return

    def _snapshot_events(self, device_id: str) -> None:
        """Server-sent events: one per new snapshot of the unit (its number and arrival time)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        insp = self.c.inspection
        seen = 0
        quiet_since = time.monotonic()
        try:
            self.wfile.write(b"retry: 1000\n\n")
            self.wfile.flush()
            while insp is not None and not self.c.stopping.is_set():
                snap = insp.snapshot(device_id)
                if snap is not None and snap.n != seen:
                    seen = snap.n
                    at = time.strftime("%H:%M:%S", time.localtime(snap.at))
                    self.wfile.write(f"event: snapshot\ndata: {json.dumps({'n': snap.n, 'at': at})}\n\n".encode())
                    self.wfile.flush()
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > 15:
                    self.wfile.write(b": still here\n\n")
                    self.wfile.flush()
                    quiet_since = time.monotonic()
                self.c.stopping.wait(0.1)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            return

    # -- POST ----------------------------------------------------------------------------------------
    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        form = self._form()
        if isinstance(form, tuple):
            return self._error(*form)
        if not self._host_ok():
            return self._error(HTTPStatus.MISDIRECTED_REQUEST, "the demo console answers on its loopback address only")
        if not self._same_origin():
            return self._error(403, "a form from another site was refused")
        if path == "/login":
            pre = self._cookies().get(PRE)
            if pre is None or not same(pre.value, form.get("pre", "")):
                return self._error(403, "the login form expired: load the login page again")
            name, addr = form.get("user", ""), self._client()
            wait, first = self.c.throttle.wait_s(name[:64], addr)  # a user's name has at most 64 characters
            if wait > 0:
                if first:
                    self.c.state.record(name[:64] or "-", "-", "login_throttled", detail=addr)
                return self._html(pages.login_page(f"Too many failed logins: try again in {wait / 60:.0f} min.",
                                                   pre.value, form.get("next", "/alerts")), 429,
                                  {"Retry-After": f"{wait:.0f}"})
            token = self.c.state.login(name, form.get("password", ""), addr=addr)
            if token is None:
                self.c.throttle.failed(name[:64], addr)
                return self._html(pages.login_page("Unknown user or wrong password.", pre.value,
                                                   form.get("next", "/alerts")), 401)
            self.c.throttle.succeeded(name[:64], addr)
            nxt = form.get("next", "/alerts")
            secure = self._secure()
            return self._redirect(local_path(nxt),
                                  {"Set-Cookie": f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/{secure}"})
        s = self._session()
        if s is None:
            return self._error(401, "log in first")
        if not same(s.csrf, form.get("csrf", "")):
            return self._error(403, "the form's token does not match your session: reload the page", s)
        if path == "/logout":
            m = self._cookies().get(COOKIE)
            if m:
                self.c.state.logout(m.value)
            return self._redirect("/login", {"Set-Cookie": f"{COOKIE}=; Max-Age=0; Path=/"})
        if path.startswith("/review/"):
            if not s.may("act"):
                return self._error(403, f"a {s.role} may not label identifications: a specialist officer does", s)
            parts = path.split("/")
            try:
                key = (unquote(parts[2]), int(parts[3]))
            except (IndexError, ValueError):
                return self._error(404, "no such identification", s)
            rec = self.c.reader.record(*key, "identification")
            label = (form.get("other") or "").strip() or form.get("label", "")
            if rec is None:
                return self._error(404, "no such identification", s)
            if not re.fullmatch(pages.LABEL_RE, label):
                return self._error(400, "a label is a name such as dalbergia_nigra: letters, digits, '_', '.', '-'",
                                   s)
            self.c.state.record(s.user, s.role, "label", key[0], key[1], label)
            return self._redirect("/review")
        if path.startswith("/inspect/"):
            device_id = unquote(path.removeprefix("/inspect/"))
            if not s.may("act"):
                return self._error(403, f"a {s.role} may not start a remote inspection: an officer does", s)
            if self.c.inspection is None:
                return self._error(409, "remote inspection needs the console started with --broker", s)
            try:
                seconds = int(form.get("seconds", "30"))
            except ValueError:
                seconds = 0
            if seconds not in pages.INSPECT_SECONDS or device_id not in {u["device_id"] for u in self.c.reader.fleet()}:
                return self._error(400, "choose a known unit and one of the offered durations", s)
            self.c.state.record(s.user, s.role, "inspect", device_id, None, f"{seconds} s of snapshots")
            self.c.inspection.request(device_id, seconds)
            return self._redirect(f"/inspect/{quote(device_id, safe='')}")
        if path.startswith("/alert/") and path.endswith(("/ack", "/dispose")):
            if not s.may("act"):
                return self._error(403, f"a {s.role} may not act on alerts: an officer does", s)
            a = self._alert(path.rsplit("/", 1)[0])
            if a is None:
                return self._error(404, "no such alert", s)
            if path.endswith("/ack"):
                if self.c.state.states([a.key])[a.key] == "new":
                    self.c.state.record(s.user, s.role, "ack", a.device_id, a.seq)
            else:
                text = " ".join(form.get("disposition", "").split())[:200]
                note = " ".join(form.get("note", "").split())[:500]
                if not text:
                    return self._error(400, "choose a disposition", s)
                self.c.state.record(s.user, s.role, "dispose", a.device_id, a.seq, text + (f": {note}" if note else ""))
            return self._redirect(path.rsplit("/", 1)[0])
        return self._error(404, f"no form {path}", s)


def _filters(q: dict[str, str]) -> Filters:
    return Filters(**{k: (q.get(k) or None) for k in ("site", "unit_type", "device", "kind", "state")})


class ConsoleServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], console: Console, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(address, Handler)
        self.console = console
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.turned_away = 0  # connections closed at once: MAX_CONNECTIONS were open
        if tls is not None:  # the handshake in the connection's own thread, under its timeout, not in accept()
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.turned_away += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def url(self) -> str:
        host, port = str(self.server_address[0]), self.server_address[1]
        scheme = "https" if isinstance(self.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://{host}:{port}/"

    def shutdown(self) -> None:
        self.console.stopping.set()
        super().shutdown()
        if self.console.inspection is not None:
            self.console.inspection.close()


def serve(hub_db: str | Path, state: str | Path, listen: str = "127.0.0.1:8080", *, anonymous: bool = False,
          tls_cert: str | None = None, tls_key: str | None = None, broker: str | None = None,
          broker_settings: BrokerSettings | None = None, prefix: str = "customs-edge/v1",
          photos: str | Path | None = None, trusted_proxies: Sequence[str] = (),
          audit_key: str | Path | None = None) -> ConsoleServer:
    """A console server bound and ready (call serve_forever, or run it in a thread). `broker` (HOST:PORT):
    remote inspection through it, with `broker_settings` (an operator's certificate where the broker asks).
    `trusted_proxies`: addresses or networks of reverse proxies whose X-Forwarded-For names the client.
    `audit_key`: the audit trail's key file (default: beside the console's file, made there if missing)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    inspection = None
    if broker:
        bhost, _, bport = broker.rpartition(":")
        if not bhost or not bport.isdigit():
            raise CustomsEdgeError(f"--broker {broker!r}: write it HOST:PORT, e.g. 127.0.0.1:1883")
        inspection = Inspection(bhost, int(bport), broker_settings, prefix)
    try:
        console = Console(hub_db, state, anonymous=anonymous, host=host, inspection=inspection, photos=photos,
                          trusted_proxies=trusted_proxies, audit_key=audit_key)
        tls = None
        if tls_cert:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.minimum_version = ssl.TLSVersion.TLSv1_2
            tls.load_cert_chain(tls_cert, tls_key)
        return ConsoleServer((host, int(port)), console, tls)
    except BaseException:  # a start that fails (no hub file yet, the port taken) leaves no broker session behind:
        # a caller retrying (the demo, until the hub has made its file) would otherwise gather one per attempt
        if inspection is not None:
            inspection.close()
        raise
