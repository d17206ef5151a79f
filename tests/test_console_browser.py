"""The console in a real browser (headless Chromium) against a hub fed over a real broker: log in, see the
alerts, a new alert appearing live with its sound, mute, acknowledge and dispose, and every page. Screenshots
go to the test's directory (and to $CONSOLE_SHOTS when set, which is how docs/console-*.png were made)."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from customs_edge.hub.console.state import ConsoleState
from tests.browser import chromium
from tests.conftest import wait_for
from tests.consolekit import T0, Running, fever, gate_records, ore_records
from tests.fleet import HubThread, records_msg

PW = "correct horse battery"


def stored(db: Path, device_id: str, seq: int) -> bool:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT 1 FROM records WHERE device_id=? AND seq=?", (device_id, seq)).fetchone() is not None
    finally:
        con.close()


def text_of(b, element_id: str) -> str:
    """An element's text, or "" while the page is being replaced (a form's POST and redirect)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return str(b.find_element("id", element_id).text)
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


@pytest.mark.broker
def test_an_officer_works_the_alerts_in_a_browser(mosquitto, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    db = tmp_path / "hub.db"
    hub = HubThread(mosquitto.port, db).start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-units")
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()

    def send(device_id: str, batch: str, records: list) -> None:
        pub.publish(f"customs-edge/v1/{device_id}/records", records_msg(device_id, batch, records), qos=1)

    for device, unit_type, site in (("gate-01", "gate", "gongbei"), ("ore-01", "ore-station", "qingdao")):
        pub.publish(f"customs-edge/v1/{device}/status", f'{{"state":"online","device_id":"{device}","ts":{T0},'
                    f'"type":"{unit_type}","site":"{site}"}}', qos=1, retain=True)
    send("gate-01", "b1", gate_records())
    send("ore-01", "b2", ore_records())
    wait_for(lambda: stored(db, "gate-01", 4) and stored(db, "ore-01", 7), 15, "the records at the hub")
    state = ConsoleState(tmp_path / "console.db")
    state.add_user("li", "officer", PW)
    state.close()
    console = Running(db, tmp_path / "console.db")
    shots = [tmp_path]
    if os.environ.get("CONSOLE_SHOTS"):
        shots.append(Path(os.environ["CONSOLE_SHOTS"]))

    def shot(driver, name: str) -> None:
        driver.save_screenshot(str(tmp_path / f"console-{name}.png"))
        for d in shots[1:]:
            shutil.copy(tmp_path / f"console-{name}.png", d / f"console-{name}.png")

    try:
        with chromium() as b:
            b.get(console.url + "/alerts")
            assert "Log in" in b.title
            b.find_element(By.ID, "user").send_keys("li")
            b.find_element(By.ID, "password").send_keys(PW)
            b.find_element(By.ID, "login").click()
            wait_for(lambda: "Alerts" in b.title, 10, "the alerts page after the login")
            rows = b.find_elements(By.CSS_SELECTOR, "#alerts tbody tr")
            assert {r.find_elements(By.TAG_NAME, "td")[4].text for r in rows} == {
                "fever_alert", "fever_confirmation", "lot_hold"}
            # a new alert while the page is open: it appears without a reload, with a sound
            wait_for(lambda: b.execute_script("return window.ceBeeps === 0"), 5, "the page's script")
            send("gate-01", "b3", [fever(20, est=39.4, ts=T0 + 3000)])
            wait_for(lambda: b.find_elements(By.CSS_SELECTOR, 'tr[data-key="gate-01/20"]'), 10, "the live alert")
            assert b.execute_script("return window.ceBeeps") == 1
            assert "39.4 °C" in b.find_element(By.CSS_SELECTOR, "#alerts tbody tr").text  # newest first
            shot(b, "alerts")
            b.find_element(By.ID, "mute").click()
            assert b.find_element(By.ID, "mute").text == "Sound off"
            send("gate-01", "b4", [fever(21, est=38.9, ts=T0 + 3100)])
            wait_for(lambda: b.find_elements(By.CSS_SELECTOR, 'tr[data-key="gate-01/21"]'), 10, "the second alert")
            assert b.execute_script("return window.ceBeeps") == 1  # muted: no sound
            # acknowledge, then dispose
            b.find_element(By.CSS_SELECTOR, 'tr[data-key="gate-01/20"] a').click()
            wait_for(lambda: b.find_elements(By.ID, "ack"), 10, "the alert's page")
            assert b.find_element(By.ID, "state").text == "new"
            assert b.find_elements(By.CSS_SELECTOR, "svg.thermal rect")  # the thermal thumbnail
            b.find_element(By.ID, "ack").click()
            wait_for(lambda: text_of(b, "state") == "acknowledged", 10, "acknowledged")
            Select(b.find_element(By.ID, "disposition")).select_by_visible_text(
                "referred after a clinical thermometer reading")
            b.find_element(By.ID, "note").send_keys("clinical thermometer 38.2 °C")
            b.find_element(By.ID, "dispose").click()
            wait_for(lambda: text_of(b, "state") == "disposed", 10, "disposed")
            trail = b.find_element(By.ID, "trail").text
            assert "ack by li (officer)" in trail
            assert "dispose by li (officer): referred after a clinical thermometer reading: clinical thermometer" \
                   " 38.2 °C" in trail
            shot(b, "alert")
            for path, expect, name in (("/fleet", "gate-01", "fleet"), ("/lots", "LOT-7", "lots"),
                                       ("/lanes", "alarm rate", "lanes"), ("/audit", "Chain intact", "audit")):
                b.get(console.url + path)
                assert expect in b.find_element(By.TAG_NAME, "main").text, path
                shot(b, name)
            b.get(console.url + "/alerts?state=new")
            keys = {r.get_attribute("data-key") for r in b.find_elements(By.CSS_SELECTOR, "#alerts tbody tr")}
            assert "gate-01/20" not in keys and "gate-01/21" in keys
            b.set_window_size(800, 1100)  # a tablet
            b.get(console.url + "/alerts")
            assert b.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
            shot(b, "tablet")
    finally:
        console.stop()
        pub.loop_stop()
        pub.disconnect()
        hub.stop()
