"""Cameras read with OpenCV, opened by URL just like serial ports.

`url` picks the source; the code path after open() is the same for all of them:
  "0", "/dev/video0", "/dev/v4l/by-id/..."   a V4L2 device (USB/UVC camera, Pi camera via v4l2)
  http(s)://host/stream.mjpg, rtsp://...     a network stream, through OpenCV's FFmpeg backend
  a video file (.mp4, .avi, .mkv, ...)       played at its own frame rate, from the start again at its end
  an image file (.jpg, .png, .tif, ...)      a still, delivered at `fps` (1 per second when fps is 0)
  file:///path                               the same as the path
The simulator (`customs-edge simulate camera`) serves http://127.0.0.1:N/stream.mjpg: the driver does not
know, and has no branch for it.

Bounded reads. cv2.VideoCapture.read() can block on a dead stream, so:
  - FFmpeg sources get CAP_PROP_OPEN_TIMEOUT_MSEC = open_timeout_s and CAP_PROP_READ_TIMEOUT_MSEC =
    read_timeout_s (FFmpeg's interrupt callback). A read that times out, or a stream the server ends,
    leaves that capture unusable, so the driver releases it and reconnects on a later read() (each
    attempt bounded by read_timeout_s, at most one per read_timeout_s). Frames that keep arriving
    after a blip mean no fault; no frame for silent_after_s raises DriverSilent and the runtime reopens.
  - The V4L2 backend ignores those properties; it waits for a frame in select() for
    OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT seconds (default 10, read once per process). Before the first
    device is opened the driver sets it to read_timeout_s rounded up, unless the environment already
    sets it. A device that stops delivering raises DriverSilent after silent_after_s.

Corrupt frames. MJPEG streams (FOURCC MJPG: the simulator, most IP and many USB cameras behind a
streamer) are read in FFmpeg's raw mode (CAP_PROP_FORMAT = -1) and decoded here with cv2.imdecode: a
JPEG that lacks its start or end marker, or does not decode, is counted in stats.corrupt and skipped
(FFmpeg's own decoder would conceal the damage and hand over a half-grey frame).

Y16 (UVC thermal cameras such as a FLIR Lepton 3.5 on a PureThermal board): with `y16: true` the device
is asked for FOURCC "Y16 " with RGB conversion off, and each 16-bit pixel is converted to degrees
Celsius as (value - 27315) / 100: the Lepton's radiometric TLinear output is kelvin x 100. Those
readings are ThermalFrames, float32 HxW in °C, like the MLX90640 driver's; a 16-bit
image file (PNG/TIFF holding the raw values) works as a still source for the same path.

cv2 is imported inside open(): it costs ~31 MiB RSS, and a unit without a camera must not pay it.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import numpy as np
from pydantic import Field, field_validator, model_validator

from customs_edge.core.errors import DriverFault
from customs_edge.core.readings import Image, Reading, ThermalFrame
from customs_edge.drivers.base import Driver, DriverConfig, SilenceWatch

SourceKind = Literal["device", "stream", "video", "still"]

STREAM_SCHEMES = frozenset({"http", "https", "rtsp", "rtsps", "rtmp", "udp", "tcp", "srt"})
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm"})
STILL_FPS = 1.0  # a still has no rate of its own
FILE_FPS = 25.0  # a video file that does not state its rate
Y16_OFFSET = 27315  # Lepton TLinear: kelvin x 100
Y16_SCALE = 100.0
V4L_TIMEOUT_ENV = "OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT"
JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
EOI_SLACK = 64  # some cameras pad a few bytes after the end-of-image marker


def classify(url: str) -> tuple[SourceKind, int | str]:
    """What kind of source a camera URL names, and what to hand OpenCV for it. ValueError if none."""
    s = url.strip()
    if not s:
        raise ValueError("empty camera url")
    if s.isdigit():
        return "device", int(s)
    if s.startswith("/dev/"):
        return "device", s
    parts = urlsplit(s)
    scheme = parts.scheme.lower()
    if scheme in STREAM_SCHEMES:
        if not parts.netloc:
            raise ValueError(f"{url!r}: a {scheme}:// url needs a host")
        return "stream", s
    if scheme == "file":
        s = unquote(parts.path)
    elif scheme:
        raise ValueError(f"{url!r}: unsupported scheme {scheme!r} (use a device index, /dev/videoN, "
                         f"{', '.join(sorted(STREAM_SCHEMES))}, or a file path)")
    return ("still" if Path(s).suffix.lower() in IMAGE_SUFFIXES else "video"), s


def y16_to_celsius(raw: np.ndarray) -> np.ndarray:
    """Radiometric Y16 pixels (kelvin x 100, as a Lepton 3.5 sends them) to float32 degrees Celsius."""
    if raw.dtype != np.uint16:
        raise ValueError(f"Y16 frames are uint16, got {raw.dtype}")
    return (raw.astype(np.float32) - Y16_OFFSET) / Y16_SCALE


def as_y16(raw: np.ndarray, width: int, height: int) -> np.ndarray:
    """The HxW uint16 image in what a backend returns for a Y16 capture with RGB conversion off:
    HxW uint16, HxWx2 little-endian bytes, or one row of 2*W*H bytes. ValueError for anything else."""
    if raw.dtype == np.uint16 and raw.ndim == 2:
        return raw
    if raw.dtype == np.uint16 and raw.ndim == 3 and raw.shape[2] == 1:
        return raw[:, :, 0]
    if raw.dtype == np.uint8 and raw.ndim == 3 and raw.shape[2] == 2:
        return np.ascontiguousarray(raw).view("<u2")[:, :, 0]
    if raw.dtype == np.uint8 and raw.size == 2 * width * height and width > 0 and height > 0:
        return np.ascontiguousarray(raw).reshape(-1).view("<u2").reshape(height, width)
    raise ValueError(f"not a 16-bit frame: {raw.dtype} {raw.shape} (is the camera in Y16 mode?)")


def jpeg_complete(data: bytes) -> bool:
    """A JPEG with its start-of-image marker and an end-of-image marker at (or near) its end."""
    return data[:2] == JPEG_SOI and data.rfind(JPEG_EOI, max(2, len(data) - EOI_SLACK)) >= 0


class CameraConfig(DriverConfig):
    driver: Literal["camera-opencv"] = "camera-opencv"
    url: str = Field(min_length=1, description="device index ('0'), /dev/videoN, http(s):// or rtsp:// stream, "
                                               "or a video/image file path")
    width: int | None = Field(None, gt=0, le=16384, description="frame width the app gets: asked of a device, "
                                                               "other sizes are resized to it")
    height: int | None = Field(None, gt=0, le=16384, description="frame height, with width")
    fps: float = Field(0.0, ge=0, le=240, description="cap on frames per second delivered; 0 = as the source "
                                                      "delivers (a still: 1/s)")
    grayscale: bool = Field(False, description="deliver HxW uint8 instead of HxWx3 BGR")
    y16: bool = Field(False, description="UVC thermal camera with 16-bit output (FLIR Lepton): frames in °C")
    open_timeout_s: float = Field(5.0, gt=0, le=60, description="connecting to a stream gives up after this")
    read_timeout_s: float = Field(1.0, gt=0, le=10, description="one read() returns within about this")
    silent_after_s: float = Field(5.0, gt=0, description="no frame for this long is a fault")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        classify(v)  # ValueError -> a config error naming `url`
        return v.strip()

    @model_validator(mode="after")
    def _check(self) -> CameraConfig:
        kind, _ = classify(self.url)
        if (self.width is None) != (self.height is None):
            raise ValueError("set both width and height, or neither")
        if self.y16 and self.grayscale:
            raise ValueError("y16 frames are temperatures: grayscale does not apply")
        if self.y16 and kind not in ("device", "still"):
            raise ValueError("y16 needs a V4L2 device (index or /dev/videoN) or a 16-bit image file")
        return self


def _cv2() -> Any:
    import cv2  # lazily: ~31 MiB RSS that only a unit with a camera pays

    return cv2


class OpenCvCamera(Driver):
    """Yields Image (HxWx3 uint8 BGR, or HxW uint8 with grayscale, and frame_no); with y16,
    ThermalFrame (float32 °C) instead.
    `frame_no` counts frames received from the source since the driver was made (gaps: frames skipped
    by the fps cap). stats: frames, corrupt (undecodable JPEGs), bytes_in (MJPEG), opened, and extra
    'failures' (reads that returned nothing), 'reconnects', 'skipped' (fps cap), 'rewinds' (video files)."""

    Config = CameraConfig
    PRODUCES = (Image, ThermalFrame)
    config: CameraConfig

    @classmethod
    def produces(cls, config: DriverConfig) -> tuple[type[Reading], ...]:
        return (ThermalFrame,) if isinstance(config, CameraConfig) and config.y16 else (Image,)

    def __init__(self, role: str, config: CameraConfig) -> None:
        super().__init__(role, config)
        self.kind, self._target = classify(config.url)
        self._cap: Any = None
        self._still: np.ndarray | None = None
        self._raw_jpeg = False
        self._watch = SilenceWatch(config.silent_after_s)
        self._period = 1.0 / config.fps if config.fps else 0.0
        self._next_due = 0.0
        self._retry_at = 0.0
        self.stats.extra.update(failures=0, reconnects=0, skipped=0, rewinds=0)

    # -- open / close -------------------------------------------------------------------------------

    def open(self) -> None:
        try:
            self._open()
        except DriverFault:
            self.stats.faults += 1
            raise

    def _open(self) -> None:
        cv2 = _cv2()
        self.close()
        if self.kind == "still":
            self._still = self._load_still(cv2)
            self._period = 1.0 / (self.config.fps or STILL_FPS)
        else:
            self._cap = self._capture(cv2, self.config.open_timeout_s)
            if self.kind == "video":
                native = self._cap.get(cv2.CAP_PROP_FPS)
                native = native if math.isfinite(native) and 0 < native <= 1000 else FILE_FPS
                self._period = max(1.0 / native, self._period)
        self.stats.opened += 1
        self._watch.reset()
        self._next_due = time.monotonic()
        self._retry_at = 0.0  # the first reconnect after a lost stream is immediate

    def close(self) -> None:
        cap, self._cap, self._still = self._cap, None, None
        if cap is not None:
            cap.release()

    def _where(self) -> str:
        return f"{self.role}: camera {self.config.url}"

    def _load_still(self, cv2: Any) -> np.ndarray:
        assert isinstance(self._target, str)
        if not Path(self._target).is_file():
            raise DriverFault(f"{self._where()}: cannot open: no such file")
        flags = cv2.IMREAD_UNCHANGED if self.config.y16 else (
            cv2.IMREAD_GRAYSCALE if self.config.grayscale else cv2.IMREAD_COLOR)
        img = cv2.imread(self._target, flags)
        if img is None:
            raise DriverFault(f"{self._where()}: cannot open: not an image OpenCV can read")
        if self.config.y16 and img.dtype != np.uint16:
            raise DriverFault(f"{self._where()}: y16 needs a 16-bit image, this one is {img.dtype}")
        return np.asarray(img)

    def _capture(self, cv2: Any, open_timeout_s: float) -> Any:
        c = self.config
        if self.kind == "device":
            if sys.platform.startswith("linux"):
                os.environ.setdefault(V4L_TIMEOUT_ENV, str(max(1, math.ceil(c.read_timeout_s))))
                cap = cv2.VideoCapture(self._target, cv2.CAP_V4L2)
            else:
                cap = cv2.VideoCapture(self._target)
        else:
            ms = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(open_timeout_s * 1000),
                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(c.read_timeout_s * 1000)]
            cap = cv2.VideoCapture(self._target, cv2.CAP_FFMPEG, ms)
        if not cap.isOpened():
            cap.release()
            why = "no such file" if self.kind == "video" and not Path(str(self._target)).is_file() else \
                "the backend could not open it"
            raise DriverFault(f"{self._where()}: cannot open: {why}")
        try:
            if self.kind == "device":
                self._configure_device(cv2, cap)
            else:
                fourcc = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little")
                self._raw_jpeg = fourcc == b"MJPG" and bool(cap.set(cv2.CAP_PROP_FORMAT, -1))
        except DriverFault:
            cap.release()
            raise
        return cap

    def _configure_device(self, cv2: Any, cap: Any) -> None:
        c = self.config
        if c.y16:
            ok = cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*"Y16 "))
            ok = ok and cap.set(cv2.CAP_PROP_CONVERT_RGB, 0)
            if not ok:
                raise DriverFault(f"{self._where()}: the camera refused Y16 output (is it a radiometric UVC camera?)")
        if c.width and c.height:  # a request: frames of another size are resized in _finish
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, c.width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, c.height)
        if c.fps:
            cap.set(cv2.CAP_PROP_FPS, c.fps)

    # -- read ---------------------------------------------------------------------------------------

    def read(self) -> Reading | None:
        try:
            return self._read()
        except DriverFault:  # DriverSilent included
            self.stats.faults += 1
            raise

    def _read(self) -> Reading | None:
        cv2 = _cv2()  # already imported by open(): a dict lookup
        if self.kind == "still":
            if self._still is None:
                raise DriverFault(f"{self._where()}: not open")
            if not self._wait_due():
                return None
            self.stats.frames += 1
            self._watch.reset()
            return self._finish(cv2, self._still.copy())
        if self._cap is None:
            if self.kind != "stream":
                raise DriverFault(f"{self._where()}: not open")
            self._watch.check(self._where())  # DriverSilent once the window has passed
            if not self._reconnect(cv2):
                return None
        if self.kind == "video" and not self._wait_due():
            return None
        if not self._cap.grab():
            self._failed(cv2)
            return None
        self.stats.frames += 1
        self._watch.reset()
        if self.kind != "video" and self._period and not self._live_due():
            self.stats.extra["skipped"] += 1  # grabbed (the source is alive) but not decoded
            return None
        img = self._retrieve(cv2)
        return None if img is None else self._finish(cv2, img)

    def _wait_due(self) -> bool:
        """Pace files and stills: sleep towards the next due time, at most read_timeout_s."""
        now = time.monotonic()
        if now < self._next_due:
            time.sleep(min(self._next_due - now, self.config.read_timeout_s))
            if time.monotonic() < self._next_due:
                return False
        self._next_due = max(self._next_due + self._period, time.monotonic() - self._period)
        return True

    def _live_due(self) -> bool:
        """The fps cap for live sources: deliver when due, on average `fps` frames a second."""
        now = time.monotonic()
        if now < self._next_due:
            return False
        self._next_due = max(self._next_due + self._period, now - self._period)
        return True

    def _failed(self, cv2: Any) -> None:
        self.stats.extra["failures"] += 1
        if self.kind == "video":  # the end of the file: play it again
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            self.stats.extra["rewinds"] += 1
        elif self.kind == "stream":  # FFmpeg's capture is finished after a timeout or an ended stream
            cap, self._cap = self._cap, None
            cap.release()
        self._watch.check(self._where())

    def _reconnect(self, cv2: Any) -> bool:
        now = time.monotonic()
        if now < self._retry_at:  # wait in this call, try in the next: one read() stays within read_timeout_s
            time.sleep(min(self._retry_at - now, self.config.read_timeout_s))
            return False
        self._retry_at = time.monotonic() + self.config.read_timeout_s
        try:
            self._cap = self._capture(cv2, min(self.config.open_timeout_s, self.config.read_timeout_s))
        except DriverFault:
            return False
        self.stats.extra["reconnects"] += 1
        return True

    def _retrieve(self, cv2: Any) -> np.ndarray | None:
        ok, frame = self._cap.retrieve()
        if not ok or frame is None:
            self.stats.extra["failures"] += 1
            return None
        if not self._raw_jpeg:
            return np.asarray(frame)
        data = np.asarray(frame).reshape(-1)
        self.stats.bytes_in += int(data.size)
        img = None
        if jpeg_complete(data.tobytes()):
            img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE if self.config.grayscale else cv2.IMREAD_COLOR)
        if img is None:
            self.stats.corrupt += 1
            return None
        return np.asarray(img)

    def _finish(self, cv2: Any, img: np.ndarray) -> Image | ThermalFrame:
        c = self.config
        if c.y16:
            h = int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) if self._cap is not None else 0
            w = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH)) if self._cap is not None else 0
            try:
                raw = as_y16(img, w, h)
            except ValueError as exc:
                raise DriverFault(f"{self._where()}: {exc}") from exc
            out = y16_to_celsius(raw)
        else:
            if img.ndim == 3 and img.shape[2] == 4:
                img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
            if c.grayscale and img.ndim == 3:
                img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
            elif not c.grayscale and img.ndim == 2:
                img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
            out = img
        if c.width and c.height and out.shape[:2] != (c.height, c.width):
            out = cv2.resize(out, (c.width, c.height), interpolation=cv2.INTER_AREA)
        if c.y16:
            return ThermalFrame(source=self.role, pixels=out)
        return Image(source=self.role, pixels=out, frame_no=self.stats.frames)
