"""Risk lists: validation on receipt, every key kind, O(1) lookups, the latest version kept on disk."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from customs_edge.agent.risklist import RiskListError, RiskListStore, parse
from tests.conftest import wait_for

# GTINs with valid check digits: 09506000134352 is the GS1 General Specifications' example GTIN (section 3.4.2
# element string examples use it); the others are built with the mod-10 rule.
GTIN = "09506000134352"


def doc(version: int = 1, *entries: dict, name: str = "hainan") -> bytes:
    lines = [{"risk_list": name, "version": version}, *entries]
    return gzip.compress("\n".join(json.dumps(x) for x in lines).encode())


ENTRIES = (
    {"gtin": GTIN, "serial": "A1B2", "tag": "resold-duty-free", "action": "hold"},
    {"gtin": GTIN, "batch": "L2301", "tag": "recalled-batch", "action": "inspect"},
    {"gtin": "04012345000009", "tag": "restricted-product", "action": "notify"},
    {"code": "HN-DF-2026-000123", "tag": "duty-free-trace", "action": "hold"},
    {"pattern": r"^https://trace\.example\.cn/fake/", "tag": "counterfeit-site", "action": "hold"},
)


def test_every_key_kind_matches_and_nothing_else() -> None:
    m = parse(doc(3, *ENTRIES))
    assert (m.name, m.version, m.entries, len(m.patterns)) == ("hainan", 3, 5, 1)
    hit = m.match(gtin=GTIN, serial="A1B2", batch="L2301", text="x")
    assert {(h.kind, h.tag) for h in hit} == {("gtin_serial", "resold-duty-free"), ("gtin_batch", "recalled-batch")}
    assert [h.tag for h in m.match(gtin="04012345000009", serial="Z", batch=None, text="")] == ["restricted-product"]
    assert [h.kind for h in m.match(gtin=None, serial=None, batch=None, text="HN-DF-2026-000123")] == ["code"]
    assert [h.kind for h in m.match(gtin=None, serial=None, batch=None,
                                    text="https://trace.example.cn/fake/77")] == ["pattern"]
    # near misses: another serial, the serial as a batch, the code with a suffix, the URL elsewhere
    assert m.match(gtin=GTIN, serial="A1B3", batch=None, text="") == []
    assert m.match(gtin=GTIN, serial=None, batch="A1B2", text="") == []
    assert m.match(gtin=None, serial=None, batch=None, text="HN-DF-2026-0001234") == []
    assert m.match(gtin=None, serial=None, batch=None, text="https://trace.example.cn/real/1") == []
    # a code that happens to equal a serial is not a GTIN+serial hit: kinds never collide
    assert m.match(gtin=None, serial=None, batch=None, text="A1B2") == []


@pytest.mark.parametrize(("entry", "words"), [
    ({"gtin": "123", "tag": "t"}, "14 digits"),
    ({"gtin": GTIN, "code": "X", "tag": "t"}, "exactly one"),
    ({"serial": "X", "tag": "t"}, "exactly one"),
    ({"code": "X"}, "needs a 'tag'"),
    ({"pattern": "([", "tag": "t"}, "does not compile"),
])
def test_a_bad_entry_refuses_the_whole_list_naming_its_line(entry: dict, words: str) -> None:
    with pytest.raises(RiskListError, match=words) as exc:
        parse(doc(1, ENTRIES[0], entry))
    assert "line 3" in str(exc.value)


def test_size_bounds_and_headers_are_checked() -> None:
    with pytest.raises(RiskListError, match="at most 100"):
        parse(doc(1, *ENTRIES), max_bytes=100)
    big = doc(1, *[{"code": f"C{i:08d}", "tag": "t"} for i in range(2000)])
    with pytest.raises(RiskListError, match="expanded"):
        parse(big, max_expanded=10_000)
    with pytest.raises(RiskListError, match="line 1"):
        parse(gzip.compress(b'{"version": 1}\n'))
    with pytest.raises(RiskListError, match="empty"):
        parse(b"")


def test_lookups_stay_o1_as_the_list_grows() -> None:
    """The table stays at most half full, so a lookup probes a bounded run of slots whatever the size:
    the longest probe at 100,000 entries is of the same order as at 1,000, and the memory is ~24 bytes per
    entry. (bench/handheld.py times 10^6 entries.)"""
    runs = {}
    for n in (1_000, 100_000):
        m = parse(doc(1, *[{"gtin": GTIN, "serial": f"S{i:07d}", "tag": "t"} for i in range(n)]))
        assert len(m.keys) >= 2 * n and m.nbytes <= 12 * len(m.keys)
        assert m.match(gtin=GTIN, serial=f"S{n - 1:07d}", batch=None, text="")
        assert not m.match(gtin=GTIN, serial=f"S{n:07d}", batch=None, text="")
        runs[n] = m.max_probe
    assert runs[100_000] <= 64, runs


def test_the_store_keeps_the_newest_version_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db.risk-list.gz"
    store = RiskListStore(path)
    assert store.current is None
    assert store.offer(doc(2, *ENTRIES)) == "applied"
    assert store.offer(doc(1, ENTRIES[0])) == "ignored"  # an older retained copy
    assert store.offer(doc(2, ENTRIES[0])) == "ignored"
    assert store.offer(b"\x1f\x8bgarbage").startswith("refused")
    assert store.current is not None and store.current.version == 2 and store.refused == 1
    again = RiskListStore(path)  # a restart, offline: the list is back from disk
    assert again.current is not None and (again.current.version, again.current.entries) == (2, 5)
    again.offer_async(doc(5, ENTRIES[3]))
    assert again.wait_idle(10)
    assert again.current.version == 5 and RiskListStore(path).current.version == 5  # type: ignore[union-attr]


def test_fleet_risk_list_publish_validates_then_publishes_retained(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  mosquitto: Any) -> None:
    from tests.cmdtools import cli

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"risk_list": "x", "version": 1}\n{"gtin": "12", "tag": "t"}\n')
    code, _, err = cli(capsys, "fleet", "risk-list", "publish", str(bad), f"--broker=127.0.0.1:{mosquitto.port}")
    assert code == 1 and "line 2" in err and "14 digits" in err
    good = tmp_path / "list.jsonl"
    good.write_bytes(gzip.decompress(doc(9, *ENTRIES)))
    code, out, _ = cli(capsys, "fleet", "risk-list", "publish", str(good), f"--broker=127.0.0.1:{mosquitto.port}")
    assert code == 0 and "version 9: 5 entries" in out
    got: list[bytes] = []
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="rl-reader")
    c.on_message = lambda _c, _u, m: got.append(m.payload) if m.retain else None
    c.connect("127.0.0.1", mosquitto.port)
    c.loop_start()
    c.subscribe("customs-edge/v1/fleet/risk-list", 1)
    try:
        wait_for(lambda: got, 10, "the retained risk list")
    finally:
        c.loop_stop()
        c.disconnect()
    m = parse(got[0])
    assert (m.name, m.version, m.entries) == ("hainan", 9, 5)
