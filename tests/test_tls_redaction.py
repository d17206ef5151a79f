"""Secrets stay out of log lines, config errors, `config` output and the records a unit sends: a broker
password, a camera URL's user:pass@."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from customs_edge.agent.apps.base import App
from customs_edge.agent.config import SyncConfig, load_unit_config, parse_unit_config
from customs_edge.core.errors import ConfigError, DriverFault
from customs_edge.core.logs import LogfmtFormatter
from customs_edge.drivers.camera import CameraConfig, OpenCvCamera
from customs_edge.hub.brokers import free_port
from tests.test_logs import parse

SECRET = "s3cret-Pw"


def unit(**sync: object) -> dict[str, object]:
    return {"device_id": "u1", "type": "scale", "drivers": {"scale": {"driver": "toledo-continuous",
                                                                       "port": "socket://127.0.0.1:1"}},
            "sync": {"username": "u1", **sync}}


def line(msg: str, **extra: object) -> str:
    rec = logging.LogRecord("t", logging.WARNING, __file__, 1, msg, (), None)
    rec.__dict__.update(extra)
    return LogfmtFormatter(with_time=False).format(rec)


def test_url_credentials_never_reach_a_log_line() -> None:
    out = line(f"camera rtsp://admin:{SECRET}@10.0.0.5:554/stream: cannot open",
               url=f"http://op:{SECRET}@cam.local/x?a=1", error=f"reconnect to rtsp://{SECRET}@cam/1 failed",
               plain="mail me at ops@example.org", path="/dev/video0")
    assert SECRET not in out
    fields = parse(out)
    assert fields["event"] == "camera rtsp://***@10.0.0.5:554/stream: cannot open"
    assert fields["url"] == "http://***@cam.local/x?a=1"
    assert fields["error"] == "reconnect to rtsp://***@cam/1 failed"
    assert fields["plain"] == "mail me at ops@example.org" and fields["path"] == "/dev/video0"  # not URLs


def test_an_exception_logged_with_a_url_is_redacted_too() -> None:
    try:
        raise DriverFault(f"camera: rtsp://admin:{SECRET}@cam/1: timeout")
    except DriverFault:
        import sys

        rec = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    out = LogfmtFormatter(with_time=False).format(rec)
    assert SECRET not in out and "rtsp://***@cam/1" in out


@pytest.mark.parametrize("bad", [
    {"password": 12345678},  # a password of the wrong type: the error must not echo it
    {"password": SECRET, "tls_cert": "/x.crt"},  # a section-wide error (cert without key) quotes the section
])
def test_config_errors_never_echo_a_password(tmp_path: Path, bad: dict[str, object]) -> None:
    f = tmp_path / "u.yaml"
    f.write_text(yaml.safe_dump(unit(**bad)))
    with pytest.raises(ConfigError) as exc:
        load_unit_config(f)
    text = str(exc.value)
    assert "sync" in text, text  # the problem is reported...
    assert SECRET not in text and "12345678" not in text  # ...without the password


def test_a_camera_url_in_a_config_error_is_redacted() -> None:
    raw = unit()
    raw["drivers"] = {"cam": {"driver": "camera-opencv", "url": f"ftp://admin:{SECRET}@cam/1"}}
    with pytest.raises(ConfigError) as exc:
        parse_unit_config(raw)
    assert "drivers.cam" in str(exc.value) and SECRET not in str(exc.value)


def test_the_password_is_never_in_config_output_or_a_repr() -> None:
    cfg = SyncConfig.model_validate({"password": SECRET})
    assert cfg.password is not None and cfg.password.get_secret_value() == SECRET
    for shown in (repr(cfg), str(cfg), cfg.model_dump_json(), str(cfg.model_dump())):
        assert SECRET not in shown
    assert cfg.credentials()["password"] == SECRET  # what the MQTT link gets


def test_a_driver_fault_record_carries_the_camera_url_without_credentials() -> None:
    url = f"http://admin:{SECRET}@127.0.0.1:{free_port()}/stream.mjpg"  # nothing listens there
    cam = OpenCvCamera("cam", CameraConfig(url=url))  # type: ignore[call-arg]
    with pytest.raises(DriverFault) as exc:
        cam.open()
    assert SECRET in str(exc.value)  # the driver names the camera it could not open...
    (record,) = App("u1", None).on_fault("cam", exc.value)
    assert record.type == "driver_fault"
    assert SECRET not in str(record.payload) and "http://***@127.0.0.1" in str(record.payload["error"])


def test_the_fault_a_config_push_reply_quotes_carries_no_credentials() -> None:
    """A pushed config that fails to start is rolled back with the drivers' last faults in the reply (on the
    broker, read by hubs and operators): the camera URL's user:pass@ is redacted there too."""
    import queue
    import threading

    from customs_edge.agent.runtime import DriverThread
    from tests.conftest import wait_for

    url = f"http://admin:{SECRET}@127.0.0.1:{free_port()}/stream.mjpg"  # nothing listens there
    stop = threading.Event()
    t = DriverThread(OpenCvCamera("cam", CameraConfig(url=url)), queue.Queue(), stop)  # type: ignore[call-arg]
    t.start()
    try:
        wait_for(lambda: t.last_error, 30, "the camera's fault")
    finally:
        stop.set()
        t.join(10)
    assert SECRET not in t.last_error and "http://***@127.0.0.1" in t.last_error
