"""A handheld inspection unit's instruments together: macro camera (MJPEG over HTTP), serial barcode
scanner and GNSS receiver (NMEA 0183), each on its own loopback endpoint, as the real unit wires them.

Camera: scenes follow one another every `scene_s` seconds: sanded end grain and insects as
simulators/specimens.py photographs them (12 woods, CITES-listed ones among them; 7 insects, quarantine
pests among them) and, every 4th scene, end grain with a product label in the corner carrying a 2-D code:
a QR code drawn by OpenCV's own encoder (ISO/IEC 18004) holding a traceability URL, or a Data Matrix
(ISO/IEC 16022, drawn by zxing-cpp's writer) holding a plain code. `HandheldSim.scene_at(frame_no)` and
`HandheldScanner.triggers` are the ground truth.

Scanner: simulators/scanner.py's reads (GS1 element strings, Digital Link and plain URLs, damaged reads),
and every `capture_every` reads a trigger line (a command barcode on the officer's card: the handheld app
captures a photo when it reads it): `CE-CAPTURE-INSECT` while the camera shows an insect, else `CE-CAPTURE`.

GPS: simulators/gps.py's officer walking a yard, with multipath jumps and fix gaps.

Risk list: `risk_list_text()` is a list (JSON Lines, docs/handheld.md) covering part of the scanner's
catalogue (GTIN + batch for the first products, one GTIN whole) and a pattern on the plain trace URLs,
so that scans hit it; `--risk-list FILE` writes it for `customs-edge fleet risk-list publish FILE`.

    customs-edge simulate handheld [--scene-s 5] [--scan-period 2] [--capture-every 3] [--gps-rate 1]
        [--seed N] [--risk-list FILE]
prints {"urls": {"camera": {"http": ...}, "scanner": {"pty", "socket"}, "gps": {"pty", "socket"}},
"risk_list": FILE} and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from customs_edge.simulators.base import Conn, Endpoints, Faults, add_endpoint_args, run_until_signalled
from customs_edge.simulators.camera import CameraSim, HttpEndpoints, WoodSection
from customs_edge.simulators.gps import GpsSim, GpsWorld
from customs_edge.simulators.scanner import ScannerSim, ScanTruth, ScanWorld

TRIGGERS = ("CE-CAPTURE", "CE-CAPTURE-INSECT")


@dataclass(frozen=True, slots=True)
class Scene:
    index: int
    kind: str  # "wood", "insect" or "label" (end grain with a product label beside it)
    label: str  # the specimen shown (simulators/specimens.py labels): the ground truth
    code_kind: str | None = None  # "qr" | "datamatrix"
    code_text: str | None = None

    @property
    def model(self) -> str:
        """The classifier an officer picks for this scene."""
        return "insects" if self.kind == "insect" else "wood"


def _qr(text: str) -> np.ndarray:
    img = cv2.QRCodeEncoder.create().encode(text)  # 1 px per module, no quiet zone beyond the encoder's
    return np.asarray(img, dtype=np.uint8)


def _datamatrix(text: str) -> np.ndarray:
    import zxingcpp  # the writer only: no independent Data Matrix encoder is at hand

    return np.asarray(zxingcpp.create_barcode(text, zxingcpp.BarcodeFormat.DataMatrix).to_image(scale=1),
                      dtype=np.uint8)


def paste_code(img: np.ndarray, code: np.ndarray, size: int) -> None:
    """A white label with the code (scaled to `size` px, quiet zone of 4 modules) in the lower right."""
    quiet = 4 * max(1, size // max(code.shape))
    sym = cv2.resize(code, (size, size), interpolation=cv2.INTER_NEAREST)
    h, w = img.shape[:2]
    y0, x0 = h - size - 2 * quiet - 10, w - size - 2 * quiet - 10
    img[y0: y0 + size + 2 * quiet, x0: x0 + size + 2 * quiet] = 255
    img[y0 + quiet: y0 + quiet + size, x0 + quiet: x0 + quiet + size] = sym[..., None]


class HandheldScenes(WoodSection):
    """The camera's world: frame n shows scene n // frames_per_scene (cycled): two end-grain photographs,
    an insect, then end grain with a coded product label, each specimen rendered once per scene by
    simulators/specimens.py; every frame adds its own sensor noise."""

    def __init__(self, seed: int | None, fps: float, scene_s: float, width: int = 640, height: int = 480,
                 scenes: int = 12) -> None:
        from customs_edge.simulators import specimens

        self.width, self.height, self.seed = width, height, seed
        base = 0 if seed is None else seed
        rng = np.random.default_rng(base)
        self._window_noise = rng.normal(0, 2.0, (height + 16, width + 16, 3)).astype(np.int16)  # a window per frame
        woods, insects = specimens.labels("wood"), specimens.labels("insects")
        self.frames_per_scene = max(1, round(fps * scene_s))
        self.scenes: list[Scene] = []
        for i in range(scenes):
            wood = woods[(base + i) % len(woods)]
            if i % 4 == 2:
                self.scenes.append(Scene(i, "insect", insects[(base + i) % len(insects)]))
            elif i % 4 == 3:
                kind = "qr" if (i // 4) % 2 == 0 else "datamatrix"
                text = f"https://trace.example.cn/q/HH{base:03d}{i:02d}X" if kind == "qr" \
                    else f"HN-DF-{base:04d}-{i:06d}"
                self.scenes.append(Scene(i, "label", wood, kind, text))
            else:
                self.scenes.append(Scene(i, "wood", wood))
        self._images: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def scene_at(self, n: int) -> Scene:
        return self.scenes[(n // self.frames_per_scene) % len(self.scenes)]

    def image(self, scene: Scene) -> np.ndarray:
        """The scene's photograph without noise (rendered once)."""
        from customs_edge.simulators import specimens

        with self._lock:
            img = self._images.get(scene.index)
            if img is None:
                seed = (0 if self.seed is None else self.seed) * 1000 + scene.index
                render = specimens.insect_image if scene.kind == "insect" else specimens.wood_image
                img = render(scene.label, seed, self.width, self.height)
                if scene.code_text:
                    code = _qr(scene.code_text) if scene.code_kind == "qr" else _datamatrix(scene.code_text)
                    img = img.copy()
                    paste_code(img, code, min(img.shape[:2]) // 3)
                self._images[scene.index] = img
            return img

    def frame(self, n: int) -> np.ndarray:
        dy, dx = n % 16, (n // 16) % 16  # 256 different noise windows: no two frames in a row are identical
        noise = self._window_noise[dy: dy + self.height, dx: dx + self.width]
        img = self.image(self.scene_at(n)).astype(np.int16) + noise
        return np.clip(img, 0, 255).astype(np.uint8)


class HandheldScanner(ScannerSim):
    """The scanner's reads, with a capture trigger line every `capture_every` reads (0: none): CE-CAPTURE
    for end grain, CE-CAPTURE-INSECT when the camera shows an insect (`scene_now`). `triggers` lists
    (monotonic time, the scene on camera) per trigger sent: the ground truth of each identification."""

    def __init__(self, world: ScanWorld, period_s: float, capture_every: int, faults: Faults | None = None,
                 scene_now: Callable[[], Scene] | None = None) -> None:
        super().__init__(world, period_s, crlf=False, faults=faults)
        self.capture_every = capture_every
        self.scene_now = scene_now
        self.reads = 0
        self.triggers: list[tuple[float, Scene | None]] = []
        self._lock = threading.Lock()

    def tick(self, conn: Conn) -> None:
        with self._lock:
            self.reads += 1
            trigger = self.capture_every and self.reads % self.capture_every == 0
            if trigger:
                scene = self.scene_now() if self.scene_now is not None else None
                line = TRIGGERS[1] if scene is not None and scene.kind == "insect" else TRIGGERS[0]
                self.triggers.append((time.monotonic(), scene))
        if trigger:
            self.truth.append(ScanTruth(line, "trigger", text=line))
            conn.write(line.encode() + self.suffix)
            return
        super().tick(conn)


def risk_list_text(world: ScanWorld, version: int = 1, name: str = "demo-risk") -> str:
    """A risk list hitting part of the scanner's catalogue and the camera's QR URLs."""
    lines = [{"risk_list": name, "version": version, "issued": "2026-03-14T08:00:00Z"}]
    for p in world.catalogue[:4]:
        lines.append({"gtin": p.gtin, "batch": p.batch, "tag": "recalled-batch", "action": "inspect"})
    lines.append({"gtin": world.catalogue[4].gtin, "tag": "duty-free-resale", "action": "hold"})
    lines.append({"pattern": r"^https://trace\.example\.cn/q/HH", "tag": "counterfeit-trace-site",
                  "action": "hold"})
    return "\n".join(json.dumps(x) for x in lines) + "\n"


class HandheldSim:
    def __init__(self, seed: int | None = None, *, fps: float = 5.0, scene_s: float = 5.0, scan_period: float = 2.0,
                 capture_every: int = 3, gps_rate: float = 1.0, damaged_rate: float = 0.05,
                 corrupt_rate: float = 0.0) -> None:
        self.scenes = HandheldScenes(seed, fps, scene_s)
        self.camera = CameraSim(self.scenes, fps, 85, Faults(0.0, seed))
        self.scan_world = ScanWorld(seed, damaged_rate)
        self.scanner = HandheldScanner(self.scan_world, scan_period, capture_every, Faults(corrupt_rate, seed),
                                       scene_now=lambda: self.scenes.scene_at(self.camera.frame_no()))
        self.gps_world = GpsWorld(seed)
        self.gps = GpsSim(self.gps_world, gps_rate, Faults(corrupt_rate, seed))

    def endpoints(self, use_pty: bool = True) -> dict[str, Endpoints]:
        return {"camera": HttpEndpoints(self.camera), "scanner": Endpoints(self.scanner, use_pty=use_pty),
                "gps": Endpoints(self.gps, use_pty=use_pty)}

    def scene_at(self, frame_no: int) -> Scene:
        return self.scenes.scene_at(frame_no)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="customs-edge simulate handheld", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fps", type=float, default=5.0, help="camera frames per second")
    p.add_argument("--scene-s", type=float, default=5.0, help="seconds per camera scene")
    p.add_argument("--scan-period", type=float, default=2.0, help="seconds between scanner reads")
    p.add_argument("--capture-every", type=int, default=3, help="a capture trigger line every N reads (0: none)")
    p.add_argument("--gps-rate", type=float, default=1.0, help="NMEA epochs per second")
    p.add_argument("--damaged-rate", type=float, default=0.05, help="share of damaged scanner reads")
    p.add_argument("--risk-list", type=Path, help="write the matching risk list (JSON Lines) to this file")
    add_endpoint_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sim = HandheldSim(args.seed, fps=args.fps, scene_s=args.scene_s, scan_period=args.scan_period,
                      capture_every=args.capture_every, gps_rate=args.gps_rate, damaged_rate=args.damaged_rate,
                      corrupt_rate=args.corrupt_rate)
    extra = {}
    if args.risk_list:
        args.risk_list.write_text(risk_list_text(sim.scan_world), encoding="utf-8")
        extra["risk_list"] = str(args.risk_list)
    run_until_signalled(sim.endpoints(not args.no_pty), extra=extra, args=args)
