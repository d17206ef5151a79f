"""The officers' console over HTTP: logins and roles, CSRF, alerts with acknowledgement and disposition in an
audit trail that cannot be edited, filters, the live event stream, fleet, lots and lanes pages."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from customs_edge.core.errors import CustomsEdgeError
from customs_edge.hub.console.server import serve
from customs_edge.hub.console.state import ConsoleState, check_password
from customs_edge.hub.store import HubStore
from tests.consolekit import T0, Client, Running, fever, gate_records, hidden, ore_records, put, status

PW = "correct horse battery"


@pytest.fixture
def hub(tmp_path: Path) -> Path:
    db = tmp_path / "hub.db"
    put(db, "gate-01", gate_records(), "b1")
    put(db, "ore-01", ore_records(), "b2")
    status(db, "gate-01", "gate", "gongbei")
    status(db, "ore-01", "ore-station", "qingdao")
    return db


@pytest.fixture
def console(hub: Path, tmp_path: Path):
    state = ConsoleState(tmp_path / "console.db")
    state.add_user("li", "officer", PW)
    state.add_user("tech", "technician", PW)
    state.close()
    run = Running(hub, tmp_path / "console.db")
    yield run
    run.stop()


def test_passwords_are_kept_as_scrypt_hashes_only(tmp_path: Path) -> None:
    st = ConsoleState(tmp_path / "c.db")
    st.add_user("li", "officer", PW)
    (stored,) = st.db.execute("SELECT pw FROM users").fetchone()
    assert stored.startswith("scrypt$") and PW not in stored
    assert check_password(PW, stored) and not check_password(PW + "x", stored)
    with pytest.raises(CustomsEdgeError, match="at least 10"):
        st.add_user("bo", "officer", "short")
    with pytest.raises(CustomsEdgeError, match="officer, technician, admin"):
        st.add_user("bo", "captain", PW)


def test_anonymous_only_on_loopback_and_never_without_users(hub: Path, tmp_path: Path) -> None:
    with pytest.raises(CustomsEdgeError, match="loopback"):
        serve(hub, tmp_path / "c.db", "0.0.0.0:0", anonymous=True)
    with pytest.raises(CustomsEdgeError, match="console user add"):
        serve(hub, tmp_path / "c.db", "127.0.0.1:0")
    with pytest.raises(CustomsEdgeError, match="--db"):
        serve(tmp_path / "no-such-hub.db", tmp_path / "c.db", "127.0.0.1:0", anonymous=True)
    assert not (tmp_path / "no-such-hub.db").exists()


def test_a_start_that_fails_leaves_no_broker_session_behind(hub: Path, tmp_path: Path) -> None:
    """serve() with a broker: a start refused (no hub file yet, as the demo meets until its hub has made one; the
    port taken) closes the inspection link it opened, where each retry left one more session and thread behind."""
    def sessions() -> int:
        return sum(t.name == "console-mqtt" and t.is_alive() for t in threading.enumerate())

    before = sessions()
    for _ in range(3):
        with pytest.raises(CustomsEdgeError, match="--db"):
            serve(tmp_path / "no-such-hub.db", tmp_path / "c.db", "127.0.0.1:0", anonymous=True,
                  broker="127.0.0.1:9")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            serve(hub, tmp_path / "c.db", f"127.0.0.1:{taken.getsockname()[1]}", anonymous=True,
                  broker="127.0.0.1:9")
    assert sessions() == before


def test_pages_need_a_login_and_a_wrong_password_is_refused_and_audited(console: Running) -> None:
    c = Client(console.url)
    code, page = c.get("/alerts")
    assert code == 200 and "Log in" in page and "fever_alert" not in page  # sent to the login form
    code, page = c.login("li", "wrong password!")
    assert code == 401 and "wrong password" in page
    code, page = c.login("li", PW)
    assert code == 200 and "fever_alert" in page and "lot_hold" in page and "fever_confirmation" in page
    assert "lane_summary" not in page and "ore_analysis" not in page  # alerts only
    assert [a.action for a in console.server.console.state.audit()][:2] == ["login", "login_failed"]


def test_acknowledge_and_dispose_need_the_session_token_and_an_officer(console: Running, hub: Path) -> None:
    officer, tech = Client(console.url), Client(console.url)
    officer.login("li", PW)
    tech.login("tech", PW)
    _, page = officer.get("/alert/gate-01/2")
    token = hidden(page, "csrf")
    assert officer.post("/alert/gate-01/2/ack", {})[0] == 403  # no token: a forged form
    assert officer.post("/alert/gate-01/2/ack", {"csrf": token}, {"Origin": "http://evil.example"})[0] == 403
    _, tpage = tech.get("/alert/gate-01/2")
    assert tech.post("/alert/gate-01/2/ack", {"csrf": hidden(tpage, "csrf")})[0] == 403  # a technician looks
    state = console.server.console.state
    assert state.states([("gate-01", 2)]) == {("gate-01", 2): "new"}
    code, page = officer.post("/alert/gate-01/2/ack", {"csrf": token})
    assert code == 200 and "acknowledged" in page
    code, page = officer.post("/alert/gate-01/2/dispose", {"csrf": token, "disposition": "afebrile on re-check:"
                                                           " released", "note": "clinical 36.9 °C"})
    assert code == 200 and "afebrile on re-check: released: clinical 36.9 °C" in page
    acts = state.actions("gate-01", 2)
    assert [(a.action, a.user, a.role) for a in acts] == [("ack", "li", "officer"), ("dispose", "li", "officer")]
    assert state.states([("gate-01", 2)]) == {("gate-01", 2): "disposed"}
    assert officer.post("/alert/gate-01/999/ack", {"csrf": token})[0] == 404
    assert officer.post("/alert/gate-01/1/ack", {"csrf": token})[0] == 404  # a lane summary is no alert


def test_the_audit_trail_cannot_be_edited_and_an_edit_behind_its_back_is_found(console: Running,
                                                                                 tmp_path: Path) -> None:
    c = Client(console.url)
    c.login("li", PW)
    _, page = c.get("/alert/ore-01/7")
    c.post("/alert/ore-01/7/dispose", {"csrf": hidden(page, "csrf"), "disposition": "seized"})
    db = sqlite3.connect(tmp_path / "console.db")
    for sql in ("UPDATE audit SET user = 'someone'", "DELETE FROM audit"):
        with pytest.raises(sqlite3.IntegrityError, match="cannot be edited"):
            db.execute(sql)
    _, page = c.get("/audit")
    assert "Chain intact" in page
    db.execute("DROP TRIGGER audit_no_update")  # another tool, with write access to the file
    db.execute("UPDATE audit SET detail = 'released' WHERE action = 'dispose'")
    db.commit()
    _, page = c.get("/audit")
    assert "altered at entry" in page


def test_filters_by_site_type_device_kind_and_state(console: Running) -> None:
    c = Client(console.url)
    c.login("li", PW)

    def kinds(query: str) -> set[str]:
        _, page = c.get("/alerts?" + query)
        body = page.split("<tbody>")[1]
        return {k for k in ("fever_alert", "fever_confirmation", "lot_hold") if f"<td>{k}</td>" in body}

    assert kinds("") == {"fever_alert", "fever_confirmation", "lot_hold"}
    assert kinds("site=qingdao") == {"lot_hold"}
    assert kinds("unit_type=gate") == {"fever_alert", "fever_confirmation"}
    assert kinds("device=gate-01&kind=fever_alert") == {"fever_alert"}
    _, page = c.get("/alert/ore-01/7")
    c.post("/alert/ore-01/7/ack", {"csrf": hidden(page, "csrf")})
    assert kinds("state=acknowledged") == {"lot_hold"}
    assert kinds("state=new") == {"fever_alert", "fever_confirmation"}


def test_a_new_alert_reaches_an_open_stream(console: Running, hub: Path) -> None:
    c = Client(console.url)
    c.login("li", PW)
    _, page = c.get("/alerts")
    after = float(page.split('data-after="')[1].split('"')[0])
    stream = c.opener.open(urllib.request.Request(console.url + f"/events?unit_type=gate&after={after!r}"), timeout=10)
    assert stream.headers["Content-Type"] == "text/event-stream"
    assert stream.readline() == b"retry: 1000\n"
    put(hub, "ore-01", [{**ore_records()[-1], "seq": 50}], "b3")  # another unit type: filtered out
    put(hub, "gate-01", [fever(51, est=39.1, ts=T0 + 999)], "b4")
    lines = []
    while not any(x.startswith(b"data:") for x in lines):  # a silent stream fails on the 10 s socket timeout
        lines.append(stream.readline())
    msg = json.loads(next(x for x in lines if x.startswith(b"data:"))[5:])
    assert msg["key"] == "gate-01/51" and "39.1 °C" in msg["html"] and "new" in msg["html"]
    stream.close()


def test_fleet_lots_and_lanes(console: Running, hub: Path) -> None:
    store = HubStore(hub)
    store.set_status("scale-09", "offline", "scale", "gongbei")
    store.db.execute("UPDATE devices SET last_seen = ? WHERE device_id = 'scale-09'", (time.time() - 3600,))
    store.close()
    c = Client(console.url)
    c.login("tech", PW)
    _, page = c.get("/fleet")
    assert '<tr class="silent" data-device="scale-09">' in page and '<tr class="ok" data-device="gate-01">' in page
    _, page = c.get("/lots")
    assert "LOT-7" in page and "<b>hold</b>" in page and "moisture 9.80 % &gt; 0.9 x TML" in page
    assert "61.70 ± 0.20" in page and "<td>-0.35</td>" in page  # margin to the TML limit: 9.45 - 9.80
    assert "<polyline" in page and "Fe % along lot LOT-7" in page
    _, page = c.get("/lanes")
    assert 'data-lane="gate-01"' in page
    assert "<td>160</td><td>3</td><td>1.88 %</td><td>1 of 1</td><td>0.62 %</td>" in page


def test_values_from_the_network_are_escaped_and_the_script_is_our_own(console: Running, hub: Path) -> None:
    put(hub, "gate-01", [{**fever(60), "payload": {"estimate_c": "<script>alert(1)</script>"}}], "b5")
    c = Client(console.url)
    c.login("li", PW)
    with c.opener.open(console.url + "/alerts") as r:
        page = r.read().decode()
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    code, js = c.get("/static/console.js")
    assert code == 200 and "EventSource" in js
    assert c.get("/static/../state.py")[0] == 404


def test_a_specialist_reviews_identifications_and_exports_a_training_set(console: Running, hub: Path,
                                                                         tmp_path: Path) -> None:
    import hashlib
    import subprocess
    import sys

    jpeg = b"\xff\xd8\xff\xe0 a specimen photo \xff\xd9"
    sha = hashlib.sha256(jpeg).hexdigest()
    (Path(f"{hub}.photos") / sha[:2]).mkdir(parents=True)
    (Path(f"{hub}.photos") / sha[:2] / f"{sha}.jpg").write_bytes(jpeg)
    put(hub, "hh-01", [{**fever(1), "type": "identification", "prio": 3, "payload": {
        "model": "wood", "label": "dalbergia_latifolia",
        "top3": [["dalbergia_latifolia", 0.71], ["dalbergia_nigra", 0.2], ["swietenia_mahagoni", 0.05]],
        "cites": "II", "quarantine_pest": False, "alert": True, "photo": sha}}], "b9")
    officer, tech = Client(console.url), Client(console.url)
    officer.login("li", PW)
    tech.login("tech", PW)
    _, page = officer.get("/review")
    assert f'src="/photo/{sha}.jpg"' in page and "dalbergia_nigra 0.20" in page and "not reviewed" in page
    with officer.opener.open(f"{console.url}/photo/{sha}.jpg") as r:
        assert r.read() == jpeg and r.headers["Content-Type"] == "image/jpeg"
    assert officer.get("/photo/../../console.db.jpg")[0] == 404
    token = hidden(page, "csrf")
    _, tpage = tech.get("/review")
    assert tech.post("/review/hh-01/1", {"csrf": hidden(tpage, "csrf"), "label": "dalbergia_nigra"})[0] == 403
    assert officer.post("/review/hh-01/1", {"csrf": token, "other": "../etc"})[0] == 400
    assert officer.post("/review/hh-01/99", {"csrf": token, "label": "dalbergia_nigra"})[0] == 404
    officer.post("/review/hh-01/1", {"csrf": token, "label": "dalbergia_latifolia"})  # confirmed, then corrected
    code, page = officer.post("/review/hh-01/1", {"csrf": token, "label": "dalbergia_latifolia",
                                                  "other": "dalbergia_nigra"})
    assert code == 200 and "reviewed: <b>dalbergia_nigra</b> by li" in page
    out = tmp_path / "training"
    res = subprocess.run([sys.executable, "-m", "customs_edge", "console", "export-labels", str(out), "--db", str(hub),
                          "--state", str(tmp_path / "console.db")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert [p.relative_to(out).as_posix() for p in out.rglob("*.jpg")] == [f"dalbergia_nigra/{sha}.jpg"]
    assert (out / "dalbergia_nigra" / f"{sha}.jpg").read_bytes() == jpeg


def test_the_console_reads_a_postgresql_store(pg_url: str, tmp_path: Path) -> None:
    put(pg_url, "gate-01", gate_records(), "b1")
    put(pg_url, "ore-01", ore_records(), "b2")
    status(pg_url, "gate-01", "gate", "gongbei")
    state = ConsoleState(tmp_path / "console.db")
    state.add_user("li", "officer", PW)
    state.close()
    run = Running(pg_url, tmp_path / "console.db")
    try:
        c = Client(run.url)
        code, page = c.login("li", PW)
        assert code == 200 and "fever_alert" in page and "lot_hold" in page and "lane_summary" not in page
        _, page = c.get("/alerts?site=gongbei")
        assert "<td>fever_alert</td>" in page and "<td>lot_hold</td>" not in page
        _, page = c.get("/alert/gate-01/2")
        c.post("/alert/gate-01/2/ack", {"csrf": hidden(page, "csrf")})
        assert run.server.console.state.states([("gate-01", 2)]) == {("gate-01", 2): "acknowledged"}
        assert "61.70 ± 0.20" in c.get("/lots")[1]
        assert "<td>160</td><td>3</td><td>1.88 %</td>" in c.get("/lanes")[1]
        assert 'data-device="gate-01"' in c.get("/fleet")[1]
    finally:
        run.stop()
