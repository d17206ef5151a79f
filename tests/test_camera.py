"""The OpenCV camera driver against the MJPEG-over-HTTP simulator (real loopback HTTP, OpenCV's FFmpeg
backend), still and video files it writes itself, Y16 conversion, and the lazy cv2 import."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from customs_edge.agent import registry
from customs_edge.core.errors import DriverFault, DriverSilent
from customs_edge.core.readings import Image, Reading, ThermalFrame
from customs_edge.drivers.camera import CameraConfig, OpenCvCamera, as_y16, classify, jpeg_complete, y16_to_celsius
from customs_edge.simulators.base import Faults
from customs_edge.simulators.camera import CameraSim, HttpEndpoints, WoodSection, read_counter

ROOT = Path(__file__).resolve().parents[1]
W, H = 320, 240


@pytest.fixture(scope="module")
def section() -> WoodSection:
    return WoodSection(seed=7, width=W, height=H)


@pytest.fixture
def camera(section: WoodSection) -> Iterator[tuple[CameraSim, HttpEndpoints]]:
    sim = CameraSim(section, fps=25, faults=Faults(seed=11))
    ep = HttpEndpoints(sim)
    ep.start()
    try:
        yield sim, ep
    finally:
        ep.stop()


def _driver(url: str, **kw: object) -> OpenCvCamera:
    return OpenCvCamera("camera", CameraConfig(url=url, **kw))  # type: ignore[arg-type]


def _read_n(d: OpenCvCamera, n: int, timeout: float = 5.0) -> list[Reading]:
    out: list[Reading] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        r = d.read()
        if r is not None:
            out.append(r)
    return out


# -- the simulator's pictures -------------------------------------------------------------------------

def test_section_is_deterministic_for_a_seed_and_carries_its_frame_number(section: WoodSection) -> None:
    again = WoodSection(seed=7, width=W, height=H)
    assert np.array_equal(section.frame(41), again.frame(41))
    assert not np.array_equal(section.base, WoodSection(seed=8, width=W, height=H).base)
    for n in (0, 1, 41, 12345, 65535):
        assert read_counter(section.frame(n)) == n
    ok, buf = cv2.imencode(".jpg", section.frame(513), [cv2.IMWRITE_JPEG_QUALITY, 50])
    assert ok
    decoded = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    assert read_counter(decoded) == 513  # the block code survives JPEG and grey conversion
    # a wood section, not a flat card: rings and pores give light and dark areas across the frame
    grey = cv2.cvtColor(section.frame(0), cv2.COLOR_BGR2GRAY)[40:, :]
    assert grey.std() > 8 and grey.max() - grey.min() > 80


# -- the driver over HTTP -----------------------------------------------------------------------------

def test_driver_reads_the_mjpeg_stream_with_frames_advancing(camera: tuple[CameraSim, HttpEndpoints]) -> None:
    sim, ep = camera
    d = _driver(ep.urls["http"], read_timeout_s=0.5)
    d.open()
    try:
        got = _read_n(d, 12)
    finally:
        d.close()
    assert len(got) == 12
    assert d._raw_jpeg  # MJPEG parts decoded here, so a damaged one can be counted
    for r in got:
        assert isinstance(r, Image) and r.source == "camera"
        assert r.pixels.shape == (H, W, 3) and r.pixels.dtype == np.uint8
        assert (r.width, r.height) == (W, H)
    counters = [read_counter(r.pixels) for r in got]
    assert all(b > a for a, b in itertools.pairwise(counters)), counters
    assert [r.frame_no for r in got] == list(range(1, 13))
    assert d.stats.frames == 12 and d.stats.corrupt == 0 and d.stats.bytes_in > 12 * 1000
    assert sim.requests[-1] == "/stream.mjpg"


def test_grayscale_resize_and_fps_cap(camera: tuple[CameraSim, HttpEndpoints]) -> None:
    _, ep = camera
    d = _driver(ep.urls["http"], grayscale=True, width=160, height=120, fps=5)
    d.open()
    try:
        got = _read_n(d, 5)
    finally:
        d.close()
    assert len(got) == 5
    assert all(r.pixels.shape == (120, 160) and r.pixels.dtype == np.uint8 for r in got)
    # the stream runs at 25 frames/s; at most 5 a second are decoded, the rest are grabbed and skipped
    assert d.stats.extra["skipped"] >= 8
    gaps = np.diff([r.frame_no for r in got])
    assert float(np.median(gaps)) >= 3


def test_corrupt_jpegs_are_counted_and_skipped_and_reading_goes_on(camera: tuple[CameraSim, HttpEndpoints]) -> None:
    sim, ep = camera
    d = _driver(ep.urls["http"])
    d.open()
    try:
        assert len(_read_n(d, 3)) == 3
        sim.faults.corrupt_next(12)
        got = _read_n(d, 25)
    finally:
        d.close()
    assert len(got) == 25
    truncated = sum(1 for _, how in sim.damaged if how == "truncated")
    assert len(sim.damaged) == 12 and truncated >= 1
    # every truncated JPEG is refused; a flipped bit may still decode (JPEG has no checksum) or may not
    assert truncated <= d.stats.corrupt <= len(sim.damaged)
    assert d.stats.frames == 28 + d.stats.corrupt  # every grabbed part was delivered or counted
    counters = [read_counter(r.pixels) for r in got[-5:]]
    assert counters == sorted(counters) and len(set(counters)) == 5  # clean frames again after the burst


def test_dropped_client_reconnects_without_a_fault(camera: tuple[CameraSim, HttpEndpoints]) -> None:
    sim, ep = camera
    d = _driver(ep.urls["http"], read_timeout_s=0.5, silent_after_s=3)
    d.open()
    try:
        before = _read_n(d, 3)
        ep.drop_clients()  # the camera reboots its web server / the Wi-Fi blinks
        after = _read_n(d, 5)
    finally:
        d.close()
    assert len(before) == 3 and len(after) == 5
    assert d.stats.extra["reconnects"] >= 1 and d.stats.extra["failures"] >= 1
    assert read_counter(after[-1].pixels) > read_counter(before[-1].pixels)
    assert sim.requests.count("/stream.mjpg") >= 2


def test_paused_camera_is_driver_silent_within_the_window_and_reads_stay_bounded(
        camera: tuple[CameraSim, HttpEndpoints]) -> None:
    sim, ep = camera
    d = _driver(ep.urls["http"], read_timeout_s=0.3, silent_after_s=1.0)
    d.open()
    try:
        assert _read_n(d, 3)
        sim.faults.pause(10)  # connection open, nothing sent
        t0 = time.monotonic()
        longest = 0.0
        with pytest.raises(DriverSilent, match=r"camera http://127\.0\.0\.1:\d+/stream\.mjpg"):
            while time.monotonic() - t0 < 5:
                t = time.monotonic()
                try:
                    assert d.read() is None
                finally:
                    longest = max(longest, time.monotonic() - t)
        assert 1.0 <= time.monotonic() - t0 < 3.0
        assert longest < 1.5  # one read() stays near read_timeout_s (FFmpeg's default would block for 30 s)
        sim.faults.resume()
        d.close()
        d.open()  # what the runtime does after the fault
        assert _read_n(d, 2)
    finally:
        d.close()


def test_unopenable_urls_are_driver_faults_naming_the_url(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    urls = [f"http://127.0.0.1:{free}/stream.mjpg", str(tmp_path / "missing.mp4"), str(tmp_path / "missing.jpg"),
            "/dev/video97"]
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    urls.append(str(not_an_image))
    for url in urls:
        d = _driver(url, open_timeout_s=2)
        t0 = time.monotonic()
        with pytest.raises(DriverFault, match="cannot open") as exc:
            d.open()
        assert url in str(exc.value)
        assert time.monotonic() - t0 < 3
        d.close()


def test_stream_open_times_out_on_a_server_that_never_answers() -> None:
    import socket

    with socket.socket() as lst:  # accepts the connection (kernel backlog) and never says a word
        lst.bind(("127.0.0.1", 0))
        lst.listen(4)
        url = f"http://127.0.0.1:{lst.getsockname()[1]}/stream.mjpg"
        d = _driver(url, open_timeout_s=0.5)
        t0 = time.monotonic()
        with pytest.raises(DriverFault, match="cannot open"):
            d.open()
        assert time.monotonic() - t0 < 3.0  # FFmpeg's default open timeout is 30 s


# -- files --------------------------------------------------------------------------------------------

def test_still_file_url_is_delivered_at_the_fps_cap(tmp_path: Path, section: WoodSection) -> None:
    path = tmp_path / "sample 1.png"
    cv2.imwrite(str(path), section.frame(321))
    for url in (str(path), path.as_uri()):
        d = _driver(url, fps=20)
        d.open()
        try:
            t0 = time.monotonic()
            got = _read_n(d, 4)
            took = time.monotonic() - t0
        finally:
            d.close()
        assert len(got) == 4 and 0.1 <= took < 2.0  # 4 frames at 20/s: ~0.15 s, not a busy loop
        assert got[0].pixels.shape == (H, W, 3)
        assert np.array_equal(got[0].pixels, section.frame(321))
        assert read_counter(got[-1].pixels) == 321
        assert [r.frame_no for r in got] == [1, 2, 3, 4]


def test_video_file_plays_at_its_rate_and_starts_again_at_its_end(tmp_path: Path, section: WoodSection) -> None:
    path = tmp_path / "clip.avi"
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 40.0, (W, H))
    assert out.isOpened()
    for n in range(5):
        out.write(section.frame(n))
    out.release()
    d = _driver(str(path), grayscale=True)
    d.open()
    try:
        t0 = time.monotonic()
        got = _read_n(d, 12)
        took = time.monotonic() - t0
    finally:
        d.close()
    assert len(got) == 12 and took >= 0.2  # 40 frames/s from the file's own header
    assert [read_counter(r.pixels) for r in got] == [0, 1, 2, 3, 4] * 2 + [0, 1]
    assert d.stats.extra["rewinds"] == 2


# -- Y16 ----------------------------------------------------------------------------------------------

def test_y16_conversion_to_celsius() -> None:
    raw = np.array([[27315, 30815], [0, 65535]], dtype=np.uint16)
    c = y16_to_celsius(raw)
    assert c.dtype == np.float32
    np.testing.assert_allclose(c, [[0.0, 35.0], [-273.15, 382.2]], atol=1e-3)
    with pytest.raises(ValueError, match="uint16"):
        y16_to_celsius(raw.astype(np.int32))
    # the layouts backends hand back for a Y16 capture with RGB conversion off
    le_bytes = raw.astype("<u2").view(np.uint8).reshape(2, 2, 2)
    assert np.array_equal(as_y16(le_bytes, 2, 2), raw)
    assert np.array_equal(as_y16(le_bytes.reshape(1, 8), 2, 2), raw)
    assert np.array_equal(as_y16(raw[:, :, None], 2, 2), raw)
    with pytest.raises(ValueError, match="Y16 mode"):
        as_y16(np.zeros((2, 2, 3), np.uint8), 2, 2)


def test_y16_still_gives_a_thermal_frame_in_celsius(tmp_path: Path) -> None:
    face = np.full((120, 160), 27315 + 3400, dtype=np.uint16)  # 34.00 °C skin
    face[50:54, 70:74] = 27315 + 3765  # an inner eye corner at 37.65 °C
    path = tmp_path / "lepton.png"
    assert cv2.imwrite(str(path), face)  # 16-bit PNG: the raw TLinear values
    d = _driver(str(path), y16=True, fps=50)
    d.open()
    try:
        r = _read_n(d, 1)[0]
    finally:
        d.close()
    assert isinstance(r, ThermalFrame) and r.pixels.dtype == np.float32
    assert r.pixels.shape == (120, 160)
    assert float(r.pixels.max()) == pytest.approx(37.65, abs=1e-4)
    assert float(np.median(r.pixels)) == pytest.approx(34.0, abs=1e-4)
    eight_bit = tmp_path / "visible.png"
    cv2.imwrite(str(eight_bit), np.zeros((4, 4), np.uint8))
    with pytest.raises(DriverFault, match="16-bit"):
        _driver(str(eight_bit), y16=True).open()


# -- config, registry, imports, CLI -------------------------------------------------------------------

def test_url_kinds_and_config_refusals() -> None:
    assert classify("0") == ("device", 0)
    assert classify("/dev/video2") == ("device", "/dev/video2")
    assert classify("http://127.0.0.1:8080/stream.mjpg")[0] == "stream"
    assert classify("rtsp://10.0.0.5/live")[0] == "stream"
    assert classify("/data/clip.MP4") == ("video", "/data/clip.MP4")
    assert classify("file:///data/a%20b.jpg") == ("still", "/data/a b.jpg")
    for bad, why in [({"url": "ftp://host/x.jpg"}, "unsupported scheme"), ({"url": "http:///x"}, "needs a host"),
                     ({"url": "0", "width": 640}, "both width and height"),
                     ({"url": "http://h/s.mjpg", "y16": True}, "y16 needs"),
                     ({"url": "0", "y16": True, "grayscale": True}, "grayscale"),
                     ({"url": "0", "colour": True}, "Extra inputs")]:
        with pytest.raises(ValueError, match=why):
            CameraConfig(**bad)  # type: ignore[arg-type]
    assert registry.lookup("driver", "camera-opencv") is OpenCvCamera
    assert jpeg_complete(b"\xff\xd8" + b"x" * 100 + b"\xff\xd9" + b"\0" * 8)
    assert not jpeg_complete(b"\xff\xd8" + b"x" * 100)


def test_importing_the_driver_does_not_import_cv2() -> None:
    code = ("import sys, drivers.camera as c; from agent import registry; registry.lookup('driver', 'camera-opencv');"
            "c.CameraConfig(url='0'); assert 'cv2' not in sys.modules, 'cv2 imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_simulate_main_prints_the_urls_and_serves_until_sigterm() -> None:
    code = "import sys; from simulators.camera import main; main(sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", code, "--seed", "3", "--width", "320", "--height", "240"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        urls = json.loads(line)["urls"]["camera"]
        assert urls["http"].startswith("http://127.0.0.1:") and urls["http"].endswith("/stream.mjpg")
        with urllib.request.urlopen(urls["snapshot"], timeout=5) as resp:
            assert resp.headers["Content-Type"] == "image/jpeg"
            img = cv2.imdecode(np.frombuffer(resp.read(), np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (240, 320, 3)
        assert 0 <= read_counter(img) < 100  # the camera's frame clock started moments ago
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(urls["http"].replace("stream.mjpg", "nothing"), timeout=5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
