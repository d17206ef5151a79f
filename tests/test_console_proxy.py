"""The console behind a reverse proxy: X-Forwarded-For is read only from a trusted proxy (`--trusted-proxy`),
right to left past the trusted hops (nginx's real_ip_recursive); from anyone else it is ignored, so a guesser
cannot pick a fresh address per try. The address found is the one throttled and written in the audit trail."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from customs_edge.core.errors import CustomsEdgeError
from customs_edge.hub.console.proxies import TrustedProxies, parse_networks
from customs_edge.hub.console.state import ConsoleState
from customs_edge.hub.console.throttle import PER_NAME
from tests.consolekit import Client, Running, gate_records, put

PW = "correct horse battery"
A, B = "203.0.113.7", "198.51.100.9"  # RFC 5737 documentation addresses: two clients behind the proxy


@pytest.fixture
def hub(tmp_path: Path) -> Path:
    db = tmp_path / "hub.db"
    put(db, "gate-01", gate_records(), "b1")
    st = ConsoleState(tmp_path / "console.db")
    st.add_user("li", "officer", PW)
    st.close()
    return db


def _xff(addr: str) -> dict[str, str]:
    return {"X-Forwarded-For": addr}


def _audit(run: Running) -> list[tuple[str, str]]:
    return [(a.action, a.detail) for a in reversed(run.server.console.state.audit())
            if a.action.startswith("login")]


def test_a_forwarded_for_from_an_untrusted_peer_is_ignored(hub: Path, tmp_path: Path) -> None:
    run = Running(hub, tmp_path / "console.db")
    try:
        c = Client(run.url)
        for i in range(PER_NAME):  # a new "address" each try: the console still sees 127.0.0.1
            assert c.login("li", "wrong password!", _xff(f"192.0.2.{i + 1}"))[0] == 401
        assert c.login("li", PW, _xff("192.0.2.200"))[0] == 429
        assert {d for _, d in _audit(run)} == {"127.0.0.1"}
    finally:
        run.stop()


def test_clients_behind_a_trusted_proxy_are_throttled_apart_and_audited_by_their_address(hub: Path,
                                                                                        tmp_path: Path) -> None:
    run = Running(hub, tmp_path / "console.db", trusted_proxies=["127.0.0.1"])
    try:
        guesser, officer = Client(run.url), Client(run.url)
        for _ in range(PER_NAME):
            assert guesser.login("li", "wrong password!", _xff(A))[0] == 401
        assert guesser.login("li", "another guess", _xff(A))[0] == 429
        assert officer.login("li", PW, _xff(B))[0] == 200  # logged in (the redirect followed): not locked out
        assert officer.get("/alerts")[0] == 200
        assert _audit(run) == [("login_failed", A)] * PER_NAME + [("login_throttled", A), ("login", B)]
        # the proxy's own requests without the header: its own address
        assert Client(run.url).login("li", "wrong password!")[0] == 401
        assert _audit(run)[-1] == ("login_failed", "127.0.0.1")
    finally:
        run.stop()


def test_the_right_most_untrusted_hop_is_the_client(hub: Path, tmp_path: Path) -> None:
    """Client -> CDN edge (10.1.2.3, trusted) -> nginx (127.0.0.1, trusted). Whatever the client wrote on the
    left (a spoofed 6.6.6.6) is to the left of the address the first trusted proxy saw: never reached."""
    run = Running(hub, tmp_path / "console.db", trusted_proxies=["127.0.0.1/32", "10.0.0.0/8"])
    try:
        c = Client(run.url)
        assert c.login("li", "wrong password!", _xff(f"6.6.6.6, {A}, 10.1.2.3"))[0] == 401
        assert c.login("li", "wrong password!", _xff(f"6.6.6.6,{B} ,10.9.9.9 , 10.1.2.3"))[0] == 401
        assert c.login("li", "wrong password!", _xff("10.1.1.1, 10.1.2.3"))[0] == 401  # all ours: the peer
        assert [d for _, d in _audit(run)] == [A, B, "127.0.0.1"]
    finally:
        run.stop()


@pytest.mark.parametrize("header", ["not an address", "", " , ", f"{A}, 999.1.1.1", f"{A}, 10.0.0.1:443",
                                    "\u00e9\u00e9", "x" * 8000, ",".join(["10.0.0.1"] * 500)])
def test_a_malformed_forwarded_for_falls_back_to_the_peer(header: str) -> None:
    proxies = TrustedProxies(parse_networks(["127.0.0.1", "10.0.0.0/8"]))
    assert proxies.client("127.0.0.1", [header]) == "127.0.0.1"


def test_forwarded_for_rules() -> None:
    p = TrustedProxies(parse_networks(["127.0.0.1", "10.0.0.0/8", "fd00::/8"]))
    assert p.client("192.0.2.1", [A]) == "192.0.2.1"  # an untrusted peer's header is its own say
    assert p.client("127.0.0.1", None) == "127.0.0.1"
    assert p.client("127.0.0.1", [A]) == A
    assert p.client("127.0.0.1", ["6.6.6.6", f"{A}, 10.0.0.2"]) == A  # two headers: one list, in order
    assert p.client("::ffff:127.0.0.1", [A]) == A  # a dual-stack socket's form of a trusted IPv4 peer
    assert p.client("fd00::5", ["2001:db8::0:1"]) == "2001:db8::1"
    assert p.client("fd00::5", ["[2001:db8::1]"]) == "2001:db8::1"
    assert TrustedProxies().client("127.0.0.1", [A]) == "127.0.0.1"  # nothing trusted: the header is never read


def test_a_bad_trusted_proxy_is_a_clear_error(hub: Path, tmp_path: Path) -> None:
    with pytest.raises(CustomsEdgeError, match=re.escape("--trusted-proxy '10.0.0.0/33'")):
        Running(hub, tmp_path / "console.db", trusted_proxies=["10.0.0.0/33"])
