"""A camera that serves MJPEG over HTTP: a sanded wood cross-section as the handheld's macro camera sees it.

The world: the end grain of a log section under fixed light (XyloTron-style), seeded: growth rings as
concentric noisy ellipses around a pith (usually outside the field of view, so they sweep across as
arcs), lighter earlywood darkening into latewood with a sharp ring boundary, radial rays, and dark pores
crowded into the earlywood. Each frame adds sensor noise, a pixel or two of hand shake, and its frame
number: as text for a person, and as a 16-bit block code (`read_counter`) that survives JPEG for tests.

Served on 127.0.0.1:N by the shared Endpoints (one thread per client, drop_clients, pause):
    GET /stream.mjpg   multipart/x-mixed-replace; boundary=frame, one image/jpeg part per frame
    GET /snapshot.jpg  one still (image/jpeg)
Faults: pause (the connection stays open, nothing is sent), drop clients, corrupt JPEG bytes (a flipped
bit or a truncated image; the part's Content-Length stays true to what is sent, as a camera's encoder
fault would look).

    customs-edge simulate camera [--fps 10] [--width 640] [--height 480] [--corrupt-rate 0.01] [--seed N]
prints {"urls": {"camera": {"http": "http://127.0.0.1:P/stream.mjpg", "snapshot": ".../snapshot.jpg"}}}
and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Sequence

import cv2
import numpy as np

from customs_edge.simulators.base import (
    Conn,
    DeviceSim,
    Endpoints,
    Faults,
    SocketConn,
    add_endpoint_args,
    run_until_signalled,
)

BOUNDARY = b"frame"
CODE_BITS = 16
CODE_CELL = 12  # px per bit of the counter code; big enough to survive JPEG at quality 50
CODE_X, CODE_Y = 8, 8  # top-left corner of the code strip
SHAKE = 2  # px of hand shake either way
MAX_REQUEST = 8192

# BGR wood tones: pale (ash, oak), mid (walnut-like), red-brown (rosewood, padauk)
PALETTES = ((150, 190, 222), (95, 135, 175), (60, 85, 150))


class WoodSection:
    """Deterministic for a seed: `frame(n)` is the n-th camera frame (HxWx3 uint8 BGR)."""

    def __init__(self, seed: int | None = None, width: int = 640, height: int = 480) -> None:
        if width < CODE_X + CODE_BITS * CODE_CELL + 8 or height < 64:
            raise ValueError("frame too small for the counter code (at least 208x64)")
        self.width, self.height = width, height
        self.seed = seed
        rng = np.random.default_rng(seed)
        self.base = self._section(rng)
        # four noise fields cycled per frame: sensor noise without a costly draw per frame
        self._noise = [rng.normal(0, 3.0, (height, width, 3)).astype(np.int16) for _ in range(4)]
        self._shake_seed = int(rng.integers(2**31))

    def _section(self, rng: np.random.Generator) -> np.ndarray:
        h, w = self.height + 2 * SHAKE, self.width + 2 * SHAKE
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        cx = rng.uniform(-0.8, 0.3) * w  # pith left of or inside the field
        cy = rng.uniform(0.4, 1.8) * h
        dx, dy = x - cx, (y - cy) * rng.uniform(0.8, 1.25)  # a slightly elliptical stem
        r = np.hypot(dx, dy)
        theta = np.arctan2(dy, dx)
        wobble = sum(rng.uniform(3.0, 14.0) / k * np.sin(k * theta + rng.uniform(0, 2 * np.pi)) for k in range(1, 6))
        texture = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 3.0)
        ring_px = rng.uniform(26.0, 60.0)
        rr = r + wobble + 2.5 * texture
        phase = rr / ring_px + 0.2 * np.sin(rr / (ring_px * 3.7) + rng.uniform(0, 2 * np.pi))  # wide and narrow years
        frac = phase % 1.0  # 0 at the start of a year's growth, 1 at its boundary
        tone = 1.0 - 0.45 * frac**3  # light earlywood darkening to the latewood, then the sharp boundary
        n_rays = int(rng.integers(70, 160))
        ray_jitter = 0.8 * np.sin(3 * theta + rng.uniform(0, 2 * np.pi)) + 0.05 * texture
        tone += 0.10 * (0.5 + 0.5 * np.cos(n_rays * theta + ray_jitter)) ** 60  # rays: thin, slightly lighter
        fibres = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 0.8)
        tone *= 1.0 + 0.035 * fibres
        vignette = 1.0 - 0.18 * (((x - w / 2) / w) ** 2 + ((y - h / 2) / h) ** 2)  # fixed ring light falloff
        colour = np.array(PALETTES[int(rng.integers(len(PALETTES)))], dtype=np.float32)
        colour *= rng.uniform(0.9, 1.08, 3).astype(np.float32)
        img = np.clip((tone * vignette)[..., None] * colour, 0, 255).astype(np.uint8)
        # pores (vessels): dark, round to oval, crowded into the earlywood (a ring-porous wood)
        n = int(h * w / 180)
        px, py = rng.uniform(0, w, n), rng.uniform(0, h, n)
        ef = frac[py.astype(int), px.astype(int)]
        keep = rng.random(n) < (1.0 - ef) ** 4
        pore = tuple(int(c * 0.3) for c in colour)
        for xi, yi, ax in zip(px[keep], py[keep], rng.uniform(1.0, 3.5, n)[keep], strict=True):
            axes = (max(1, round(ax)), max(1, round(ax * rng.uniform(0.7, 1.3))))
            cv2.ellipse(img, (int(xi), int(yi)), axes, float(rng.uniform(0, 180)), 0, 360, pore, -1, cv2.LINE_AA)
        return img

    def frame(self, n: int) -> np.ndarray:
        ox, oy = (int(v) for v in np.random.default_rng([self._shake_seed, n]).integers(0, 2 * SHAKE + 1, 2))
        view = self.base[oy: oy + self.height, ox: ox + self.width]
        img = np.clip(view.astype(np.int16) + self._noise[n % len(self._noise)], 0, 255).astype(np.uint8)
        draw_counter(img, n)
        return img


def draw_counter(img: np.ndarray, n: int) -> None:
    """Draw `n` as text and as a 16-bit block code (most significant bit first, white = 1)."""
    x0, y0, c = CODE_X, CODE_Y, CODE_CELL
    cv2.rectangle(img, (x0 - 3, y0 - 3), (x0 + CODE_BITS * c + 2, y0 + c + 2), (0, 0, 0), -1)
    for i in range(CODE_BITS):
        if (n >> (CODE_BITS - 1 - i)) & 1:
            cv2.rectangle(img, (x0 + i * c, y0), (x0 + (i + 1) * c - 1, y0 + c - 1), (255, 255, 255), -1)
    text_y = y0 + c + 22
    cv2.putText(img, f"#{n:06d}", (x0, text_y), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, f"#{n:06d}", (x0, text_y), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)


def read_counter(img: np.ndarray) -> int:
    """The frame number a frame carries (modulo 2**16), read from the block code; BGR or grey."""
    grey = img if img.ndim == 2 else img.mean(axis=2)
    c = CODE_CELL
    n = 0
    for i in range(CODE_BITS):
        cell = grey[CODE_Y + 3: CODE_Y + c - 3, CODE_X + i * c + 3: CODE_X + (i + 1) * c - 3]
        n = (n << 1) | int(cell.mean() > 128)
    return n


class CameraSim(DeviceSim):
    """Serves one HTTP request per connection: the MJPEG stream or one snapshot.

    The camera has its own frame clock (frame n is due at t0 + n / fps) whether anyone watches or not:
    every client gets the current frame, a paused camera's counter jumps by what it did not send, and
    a frame is encoded once however many clients there are."""

    def __init__(self, section: WoodSection, fps: float = 10.0, quality: int = 85,
                 faults: Faults | None = None) -> None:
        super().__init__(faults)
        if fps <= 0:
            raise ValueError("fps must be > 0")
        if not 1 <= quality <= 100:
            raise ValueError("JPEG quality must be 1-100")
        self.section = section
        self.period = 1.0 / fps
        self.quality = quality
        self.t0 = time.monotonic()
        self.sent = 0  # frames written to any client
        self.damaged: list[tuple[int, str]] = []  # (frame number, "truncated" | "altered") per damaged part
        self.requests: list[str] = []  # request paths, for tests and logs
        self._cache: tuple[int, bytes] = (-1, b"")
        self._lock = threading.Lock()

    def frame_no(self, now: float | None = None) -> int:
        return int(((time.monotonic() if now is None else now) - self.t0) / self.period)

    def jpeg(self, n: int) -> bytes:
        """Frame n, JPEG-encoded (the last one is cached for the other clients)."""
        with self._lock:
            if self._cache[0] == n:
                return self._cache[1]
            ok, buf = cv2.imencode(".jpg", self.section.frame(n), [cv2.IMWRITE_JPEG_QUALITY, self.quality])
            if not ok:
                raise RuntimeError("cv2.imencode failed")
            self._cache = (n, buf.tobytes())
            return self._cache[1]

    def serve(self, conn: Conn, stop: threading.Event) -> None:
        request = _read_request(conn, stop)
        if request is None:
            return
        method, path = request
        self.requests.append(path)
        route = path.split("?")[0]
        if method not in ("GET", "HEAD"):
            conn.write(_response(405, "Method Not Allowed", b"only GET\n", "text/plain"))
        elif route == "/snapshot.jpg":
            conn.write(_response(200, "OK", self.jpeg(self.frame_no()), "image/jpeg", head=method == "HEAD"))
        elif route == "/stream.mjpg":
            self._stream(conn, stop, head=method == "HEAD")
        else:
            conn.write(_response(404, "Not Found", b"try /stream.mjpg or /snapshot.jpg\n", "text/plain"))

    def _stream(self, conn: Conn, stop: threading.Event, head: bool) -> None:
        conn.write(b"HTTP/1.1 200 OK\r\n"
                   b"Content-Type: multipart/x-mixed-replace; boundary=" + BOUNDARY + b"\r\n"
                   b"Cache-Control: no-cache, no-store\r\nPragma: no-cache\r\nConnection: close\r\n\r\n")
        if head:
            return
        last = self.frame_no() - 1  # a new client starts with the current frame
        while not stop.is_set() and not conn.closed:
            n = self.frame_no()
            if n == last:
                stop.wait(max(0.0, self.t0 + (n + 1) * self.period - time.monotonic()))
                continue
            last = n
            if self.faults.paused:
                continue  # the connection stays open; nothing arrives
            conn.write(self._part(n))
            self.sent += 1

    def _part(self, n: int) -> bytes:
        good = self.jpeg(n)
        data = self.faults.mangle(good)
        if data != good:
            self.damaged.append((n, "truncated" if len(data) < len(good) else "altered"))
        return (b"--" + BOUNDARY + b"\r\nContent-Type: image/jpeg\r\n"
                + f"Content-Length: {len(data)}\r\n\r\n".encode() + data + b"\r\n")


def _read_request(conn: Conn, stop: threading.Event, timeout: float = 5.0) -> tuple[str, str] | None:
    """(method, path) of the request on `conn`, or None if it is not an HTTP request within `timeout`."""
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
        if stop.is_set() or conn.closed or time.monotonic() > deadline or len(buf) > MAX_REQUEST:
            return None
        buf += conn.read(0.2)
    parts = buf.split(b"\r\n", 1)[0].split(b"\n", 1)[0].decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        conn.write(_response(400, "Bad Request", b"bad request line\n", "text/plain"))
        return None
    return parts[0], parts[1]


def _response(code: int, reason: str, body: bytes, ctype: str, head: bool = False) -> bytes:
    return (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Cache-Control: no-cache\r\nConnection: close\r\n\r\n").encode() + (b"" if head else body)


class HttpEndpoints(Endpoints):
    """Endpoints on loopback TCP only, whose URLs are the camera's HTTP addresses."""

    def __init__(self, sim: CameraSim, tcp_port: int = 0, host: str = "127.0.0.1") -> None:
        super().__init__(sim, use_pty=False, tcp_port=tcp_port, host=host)

    def start(self) -> dict[str, str]:
        base = super().start().pop("socket").replace("socket://", "http://")
        self.urls.update({"http": f"{base}/stream.mjpg", "snapshot": f"{base}/snapshot.jpg"})
        return self.urls

    def clients(self) -> int:
        """Connected clients right now (for tests that wait on a reconnect)."""
        return sum(1 for c in self._conns if isinstance(c, SocketConn) and not c.closed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="customs-edge simulate camera", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fps", type=float, default=10.0, help="frames per second on the stream")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--quality", type=int, default=85, help="JPEG quality 1-100")
    add_endpoint_args(p)  # --tcp-port, --seed and the fault flags apply; --link/--no-pty are refused
    return p


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.link or args.no_pty or args.tcp_port < 0:
        parser.error("a camera is served over HTTP only: --link, --no-pty and --tcp-port -1 do not apply")
    sim = CameraSim(WoodSection(args.seed, args.width, args.height), args.fps, args.quality,
                    Faults(args.corrupt_rate, args.seed))
    run_until_signalled({"camera": HttpEndpoints(sim, tcp_port=args.tcp_port)}, args=args)
