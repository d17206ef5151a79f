"""The console under attack (a security review): the login's `next` neither leaves the console nor injects
headers; the loopback demo refuses a page asked for under another host name (DNS rebinding); an unknown user
costs the same scrypt work as a wrong password; export-labels never writes outside DIR whatever a unit names as
its photo; a body the server will not read closes the connection; failed logins are throttled."""

from __future__ import annotations

import argparse
import http.client
import socket
import time
from pathlib import Path

import pytest

from customs_edge.hub.console import state as state_mod
from customs_edge.hub.console.state import ConsoleState
from tests.consolekit import Client, Running, fever, gate_records, hidden, put, status

PW = "correct horse battery"


@pytest.fixture
def hub(tmp_path: Path) -> Path:
    db = tmp_path / "hub.db"
    put(db, "gate-01", gate_records(), "b1")
    status(db, "gate-01", "gate", "gongbei")
    return db


@pytest.fixture
def console(hub: Path, tmp_path: Path):
    st = ConsoleState(tmp_path / "console.db")
    st.add_user("li", "officer", PW)
    st.close()
    run = Running(hub, tmp_path / "console.db")
    yield run
    run.stop()


def _conn(run: Running) -> http.client.HTTPConnection:
    host, port = run.server.server_address[:2]
    return http.client.HTTPConnection(str(host), int(port), timeout=10)


def _login_raw(run: Running, user: str, password: str, nxt: str) -> http.client.HTTPResponse:
    """A login whose answer is read as sent (no redirect followed), with the form's own token."""
    conn = _conn(run)
    conn.request("GET", "/login")
    r = conn.getresponse()
    page = r.read().decode()
    pre = hidden(page, "pre")
    from urllib.parse import urlencode

    conn.request("POST", "/login", body=urlencode({"user": user, "password": password, "pre": pre, "next": nxt}),
                 headers={"Cookie": f"ce_pre={pre}", "Content-Type": "application/x-www-form-urlencoded"})
    return conn.getresponse()


@pytest.mark.parametrize("nxt", ["/\\evil.example/", "/\t/evil.example/", "/\r\nSet-Cookie: ce_session=fixed; Path=/",
                                 "//evil.example/"])
def test_the_login_next_stays_on_the_console_and_adds_no_header(console: Running, nxt: str) -> None:
    r = _login_raw(console, "li", PW, nxt)
    r.read()
    assert r.status == 303
    assert r.getheader("Location") == "/alerts"  # a browser reads /\host as //host: another site
    assert not any("fixed" in v for k, v in r.getheaders() if k.lower() == "set-cookie")
    assert _login_raw(console, "li", PW, "/fleet?site=a").getheader("Location") == "/fleet?site=a"


def test_the_loopback_demo_refuses_another_host_name(hub: Path, tmp_path: Path) -> None:
    """DNS rebinding: a web page from evil.example re-pointed at 127.0.0.1 reads and acts as the demo officer."""
    run = Running(hub, tmp_path / "c.db", anonymous=True)
    try:
        port = run.server.server_address[1]
        for host, want in ((f"evil.example:{port}", 421), (f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200),
                           ("localhost", 200)):
            conn = _conn(run)
            conn.request("GET", "/alerts", headers={"Host": host})
            r = conn.getresponse()
            body = r.read().decode()
            assert r.status == want, host
            assert ("fever_alert" in body) == (want == 200)
        conn = _conn(run)
        conn.request("POST", "/alert/gate-01/2/ack", body="csrf=x",
                     headers={"Host": f"evil.example:{port}", "Content-Type": "application/x-www-form-urlencoded"})
        assert conn.getresponse().status == 421
    finally:
        run.stop()


def test_an_unknown_user_costs_the_same_scrypt_as_a_wrong_password(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Timing: one scrypt for a wrong password, so one (not two) for a name that is no user."""
    st = ConsoleState(tmp_path / "c.db")
    st.add_user("li", "officer", PW)
    st.login("nobody", "x" * 12)  # whatever is prepared once per process
    calls: list[int] = []
    real = state_mod.Scrypt

    def counting(**kw):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(**kw)

    monkeypatch.setattr(state_mod, "Scrypt", counting)
    assert st.login("li", "wrong password!") is None
    wrong = len(calls)
    calls.clear()
    assert st.login("nobody", "wrong password!") is None
    assert len(calls) == wrong == 1


def test_export_labels_never_writes_outside_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A unit names its photo: `../../victim/evil` would be read from beside the photo store and copied
    two levels above DIR/<label>/, outside DIR."""
    from customs_edge.cli.console import cmd_export_labels

    work = tmp_path / "w"
    hubdb = work / "hub.db"
    photos = work / "h" / "hub.db.photos"
    photos.mkdir(parents=True)
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "evil.jpg").write_bytes(b"\xff\xd8 any file the hub can read")
    (work / "victim").mkdir()
    put(hubdb, "hh-01", [{**fever(1), "type": "identification", "prio": 3, "payload": {
        "model": "wood", "label": "dalbergia_nigra", "photo": "../../victim/evil"}}], "b1")
    st = ConsoleState(work / "console.db")
    st.record("li", "officer", "label", "hh-01", 1, "dalbergia_nigra")
    st.close()
    out = work / "out"
    cmd_export_labels(argparse.Namespace(dir=str(out), db=str(hubdb), photos_dir=str(photos),
                                         state=str(work / "console.db")))
    assert not (work / "victim" / "evil.jpg").exists()
    assert list(out.rglob("*.jpg")) == []
    assert "1 refused" in capsys.readouterr().out


def _exchange(run: Running, raw: bytes) -> bytes:
    """Send raw bytes; everything the server answers until it closes the connection (deadline 10 s)."""
    host, port = run.server.server_address[:2]
    s = socket.create_connection((str(host), int(port)), timeout=10)
    got = b""
    try:
        s.sendall(raw)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    except TimeoutError:
        pass
    finally:
        s.close()
    return got


def test_a_body_the_server_does_not_read_is_never_taken_for_a_request(console: Running) -> None:
    smuggled = b"GET /favicon.ico HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    big = (b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
           b"Content-Length: 100000\r\n\r\n" + smuggled)
    got = _exchange(console, big)
    assert got.startswith(b"HTTP/1.1 413") and got.count(b"HTTP/1.1 ") == 1
    chunked = (b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               + f"{len(smuggled):x}\r\n".encode() + smuggled + b"\r\n0\r\n\r\n")
    got = _exchange(console, chunked)
    assert got.startswith(b"HTTP/1.1 411") and got.count(b"HTTP/1.1 ") == 1
    negative = b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"  # read(-1): until the client goes
    got = _exchange(console, negative)
    assert got.startswith(b"HTTP/1.1 400") and got.count(b"HTTP/1.1 ") == 1


def test_failed_logins_are_throttled_per_user(console: Running) -> None:
    c = Client(console.url)
    for _ in range(5):
        assert c.login("li", "wrong password!")[0] == 401
    code, page = c.login("li", PW)  # even the right password waits: a guess is no quicker than a wrong one
    assert code == 429 and "Too many failed logins" in page
    assert c.login("li", "another guess")[0] == 429  # in the audit trail once, not once per try
    assert Client(console.url).login("other", "wrong password!")[0] == 401  # another name is not held up
    state = console.server.console.state
    assert [a.action for a in state.audit()][:3] == ["login_failed", "login_throttled", "login_failed"]


def test_a_label_with_a_line_break_is_refused(console: Running, hub: Path) -> None:
    """`$` matches before a final newline: the label (a folder name on export) must be the whole field."""
    put(hub, "hh-01", [{**fever(1), "type": "identification", "prio": 3, "payload": {
        "model": "wood", "label": "dalbergia_nigra"}}], "b9")
    c = Client(console.url)
    c.login("li", PW)
    _, page = c.get("/review")
    assert c.post("/review/hh-01/1", {"csrf": hidden(page, "csrf"), "label": "dalbergia_nigra\n"})[0] == 400
    assert console.server.console.state.labels() == {}


def _events_status(run: Running, cookie: str) -> tuple[socket.socket, bytes]:
    host, port = run.server.server_address[:2]
    s = socket.create_connection((str(host), int(port)), timeout=10)
    s.sendall(f"GET /events HTTP/1.1\r\nHost: {host}:{port}\r\nCookie: {cookie}\r\n\r\n".encode())
    head = b""
    while b"\r\n" not in head:
        chunk = s.recv(1024)
        if not chunk:
            break
        head += chunk
    return s, head.split(b"\r\n", 1)[0]


def test_one_session_cannot_hold_every_thread_with_event_streams(console: Running) -> None:
    from customs_edge.hub.console.server import MAX_STREAMS_PER_SESSION

    c = Client(console.url)
    c.login("li", PW)
    cookie = "; ".join(f"{k.name}={k.value}" for k in c.jar if k.name == "ce_session")
    held = []
    try:
        for _ in range(MAX_STREAMS_PER_SESSION):
            s, line = _events_status(console, cookie)
            held.append(s)
            assert line == b"HTTP/1.1 200 OK"
        s, line = _events_status(console, cookie)
        held.append(s)
        assert line.startswith(b"HTTP/1.1 503")
        assert c.get("/fleet")[0] == 200  # the pages still answer
    finally:
        for s in held:
            s.close()


def test_a_silent_connection_is_closed(hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from customs_edge.hub.console import server as server_mod

    monkeypatch.setattr(server_mod.Handler, "timeout", 0.5)
    monkeypatch.setattr(server_mod, "MAX_CONNECTIONS", 3)
    run = Running(hub, tmp_path / "c.db", anonymous=True)
    try:
        assert _exchange(run, b"GET /fleet HTTP/1.1\r\nHost: 127.0.0.1\r\n").count(b"HTTP/1.1 ") == 0  # closed
        host, port = run.server.server_address[:2]
        silent = [socket.create_connection((str(host), int(port)), timeout=10) for _ in range(3)]
        try:  # all slots held: the next is closed at once, not queued behind them
            assert _exchange(run, b"GET /fleet HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n") == b""
            assert run.server.turned_away >= 1
        finally:
            for s in silent:
                s.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the silent ones gone (closed by us or timed out), slots free again
            got = _exchange(run, b"GET /fleet HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            if got.startswith(b"HTTP/1.1 200"):
                break
        assert got.startswith(b"HTTP/1.1 200")
    finally:
        run.stop()


def test_a_client_silent_in_the_tls_handshake_stops_no_one(hub: Path, tmp_path: Path) -> None:
    """With TLS, the handshake ran inside accept(): one connection sending nothing froze the console."""
    import ssl

    from customs_edge.cli import certs

    ca = tmp_path / "ca"
    certs.init_ca(ca)
    crt, key = certs.issue(ca, "console.local", "broker", sans=["127.0.0.1"])
    run = Running(hub, tmp_path / "c.db", anonymous=True, tls_cert=str(crt), tls_key=str(key))
    try:
        host, port = run.server.server_address[:2]
        silent = socket.create_connection((str(host), int(port)), timeout=10)
        try:
            ctx = ssl.create_default_context(cafile=str(ca / "ca.crt"))
            conn = http.client.HTTPSConnection(str(host), int(port), timeout=10, context=ctx)
            conn.request("GET", "/fleet")
            r = conn.getresponse()
            r.read()
            assert r.status == 200
            conn.request("GET", "/login")
            r = conn.getresponse()
            r.read()
            assert "; Secure" in r.getheader("Set-Cookie", "")  # the login form's token too, over HTTPS only
        finally:
            silent.close()
    finally:
        run.stop()


def test_the_console_file_is_for_its_owner_only(tmp_path: Path) -> None:
    import stat

    st = ConsoleState(tmp_path / "c.db")
    st.add_user("li", "officer", PW)  # scrypt hashes: readable by others, they could be guessed at offline
    st.close()
    assert stat.S_IMODE((tmp_path / "c.db").stat().st_mode) == 0o600


def test_a_login_cookie_not_of_ours_is_not_sent_back(console: Running) -> None:
    """A quoted cookie may carry CR LF (octal escapes): echoed into Set-Cookie it would add headers."""
    conn = _conn(console)
    crlf = '"\\015\\012Set-Cookie: ce_session=fixed\\015\\012abcdefgh"'
    conn.request("GET", "/login", headers={"Cookie": f"ce_pre={crlf}"})
    r = conn.getresponse()
    r.read()
    assert r.status == 200
    assert not any("fixed" in v for _, v in r.getheaders())


def test_malformed_requests_get_an_answer(console: Running) -> None:
    c = Client(console.url)
    c.login("li", PW)
    assert c.get("/events?after=soon")[0] == 400
    _, page = c.get("/alerts")
    form = {f"f{i}": "x" for i in range(30)} | {"csrf": hidden(page, "csrf")}
    assert c.post("/alert/gate-01/2/ack", form)[0] == 400


def test_a_unit_s_odd_payload_breaks_no_page(console: Running, hub: Path) -> None:
    """Payloads are the units' JSON objects, not checked per kind: one odd record must not take a page away."""
    odd = [
        {**fever(10), "payload": {"estimate_c": 38.4, "threshold_c": 37.8, "valid": False, "tags": 5}},
        {**fever(11), "type": "lot_hold", "payload": {"lot_id": "L", "reasons": 7}},
        {**fever(12), "type": "lot_report", "prio": 2, "payload": {
            "lot_id": "L", "opened": "yesterday", "fe": {"value": "high", "u95": "?"},
            "moisture": {"value": "wet"}, "moisture_limit_pct": 9.0, "flags": 3, "reasons": 1}},
        {**fever(13), "type": "ore_analysis", "prio": 1, "payload": {"lot_id": "L", "lot_t": "later",
                                                                       "model": {"fe": 61.0}}},
        {**fever(14), "type": "lane_summary", "prio": 0, "payload": {"screened": "many", "alerts": [1]}},
        {**fever(15), "type": "identification", "prio": 3, "payload": {"model": "wood", "top3": [[1], "x", 5]}},
        {**fever(16), "type": "identification", "prio": 3, "payload": {"model": "wood", "top3": 9}},
    ]
    put(hub, "odd-01", odd, "b7")
    c = Client(console.url)
    c.login("li", PW)
    for page in ("/alerts", "/alert/odd-01/10", "/alert/odd-01/11", "/lots", "/lanes", "/review", "/fleet"):
        code, _ = c.get(page)
        assert code == 200, page
