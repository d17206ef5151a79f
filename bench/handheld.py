"""Handheld: identification and code decoding per photo, risk-list matching at 10^6 entries, the memory of a
running unit, evidence photo delivery beside a raw file copy.

    python bench/handheld.py [--json] [--entries 1000000] [--photos 30] [--unit-seconds 20] [--unit-only]

Each figure beside a baseline measured in the same run, pinned to one core where it is CPU work:
  identify_ms        per 640x480 photo through the shipped wood classifier (preprocessing included), when
                     models/image_classifier.py and models/wood are installed (else null and why);
                     baseline photo_jpeg_ms: encoding the same frame as the evidence JPEG
  decode_ms          zxing-cpp on a frame with a QR or Data Matrix label / on plain end grain (no code);
                     baseline grey_ms: the BGR->grey conversion every decode starts with
  risk_parse_s       loading a list of `entries` GTIN+serial entries; risk_table_mb its table
  risk_match_us      one scan (GTIN+serial, batch, GTIN, code and one pattern probed) against it, hits and
                     misses mixed; baseline dict_lookup_us: a Python dict of the same keys (dict_mb its memory)
  unit_rss_mb        VmRSS of `customs-edge run` on configs/handheld.yaml against `simulate handheld`, after
                     `unit_seconds` of captures every ~1.5 s (goal < 120 MB); unit_captures how many it made;
                     unit_rss_breakdown_mb: anonymous / file-backed, then the largest mappings
  photo_mb_s         evidence photos (~1 MB JPEGs) from a PhotoStore through mosquitto to the hub's archive,
                     each acked after the hub's fsync; baseline copy_mb_s: the same files copied with
                     shutil + fsync into another directory
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import peak_rss_mb, rss_mb  # noqa: E402


def pin_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})


def _ms(fn: Any, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1000


def bench_photo_work(out: dict[str, Any]) -> None:
    import cv2

    from customs_edge.agent.apps.handheld import HandheldApp, HandheldConfig, load_classifier
    from customs_edge.simulators.handheld import HandheldScenes

    scenes = HandheldScenes(5, fps=1, scene_s=1)
    label = next(i for i, s in enumerate(scenes.scenes) if s.code_text)
    plain = next(i for i, s in enumerate(scenes.scenes) if not s.code_text)
    img_label, img_plain = scenes.frame(label), scenes.frame(plain)
    app = HandheldApp("bench", HandheldConfig(models=[]))
    app.decode_frame(img_label)  # imports
    n = 30
    out["decode_ms_label"] = round(_ms(lambda: app.decode_frame(img_label), n), 2)
    out["decode_ms_plain"] = round(_ms(lambda: app.decode_frame(img_plain), n), 2)
    out["decode_found"] = [s.text for s in app.decode_frame(img_label)]
    out["grey_ms"] = round(_ms(lambda: cv2.cvtColor(img_label, cv2.COLOR_BGR2GRAY), n), 3)
    out["photo_jpeg_ms"] = round(_ms(lambda: cv2.imencode(".jpg", img_plain, [cv2.IMWRITE_JPEG_QUALITY, 90]), n), 2)
    try:
        clf = load_classifier("wood", None)
    except Exception as exc:
        out["identify_ms"], out["identify_missing"] = None, f"{type(exc).__name__}: {exc}"[:200]
        return
    clf.classify(img_plain)
    out["identify_ms"] = round(_ms(lambda: clf.classify(img_plain), n), 2)


def bench_risk(out: dict[str, Any], entries: int) -> None:
    from customs_edge.agent.risklist import key_of, parse

    gtin = "09506000134352"
    lines = [json.dumps({"risk_list": "bench", "version": 1})]
    lines += [f'{{"gtin":"{gtin}","serial":"S{i:08d}","tag":"resold","action":"hold"}}' for i in range(entries)]
    lines.append(json.dumps({"pattern": r"^https://trace\.example\.cn/fake/", "tag": "fake"}))
    payload = gzip.compress("\n".join(lines).encode(), 6)
    del lines
    out["risk_payload_mb"] = round(len(payload) / 2**20, 2)
    before = rss_mb()
    t = time.perf_counter()
    m = parse(payload)
    out["risk_parse_s"] = round(time.perf_counter() - t, 2)
    out["risk_table_mb"] = round(m.nbytes / 2**20, 1)
    out["risk_rss_delta_mb"] = round(rss_mb() - before, 1)
    out["risk_max_probe"] = m.max_probe
    rng = random.Random(1)
    scans = [f"S{rng.randrange(2 * entries):08d}" for _ in range(50_000)]  # half hit, half miss
    t = time.perf_counter()
    hits = sum(bool(m.match(gtin=gtin, serial=s, batch="L1", text=f"]d201{gtin}21{s}")) for s in scans)
    out["risk_match_us"] = round((time.perf_counter() - t) / len(scans) * 1e6, 2)
    out["risk_hit_share"] = round(hits / len(scans), 3)
    before = rss_mb()
    table = {key_of("gtin_serial", gtin, f"S{i:08d}"): 0 for i in range(entries)}
    out["dict_mb"] = round(rss_mb() - before, 1)
    keys = [key_of("gtin_serial", gtin, s) for s in scans]
    t = time.perf_counter()
    sum(k in table for k in keys)
    out["dict_lookup_us"] = round((time.perf_counter() - t) / len(keys) * 1e6, 3)
    del table


def _vmrss(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _breakdown(pid: int) -> dict[str, float]:
    """Where a process's VmRSS is, MB: anonymous (written: Python objects, heap, buffers) and file-backed
    (library pages, clean: the kernel can drop them), then the largest mappings by name."""
    out: dict[str, float] = {}
    by_name: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                out[line.split(":")[0][3:].lower()] = round(int(line.split()[1]) / 1024, 1)
        name = ""
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            parts = line.split()
            if parts and "-" in parts[0] and not parts[0].endswith(":"):
                name = Path(parts[5]).name if len(parts) > 5 else "[anon]"
            elif parts and parts[0] == "Rss:":
                by_name[name] = by_name.get(name, 0) + int(parts[1])
    except OSError:
        return out
    for name, kb in sorted(by_name.items(), key=lambda x: -x[1])[:8]:
        out[name.split(".cpython")[0]] = round(kb / 1024, 1)
    return out


def bench_unit(out: dict[str, Any], seconds: float, work: Path) -> None:
    import yaml

    from customs_edge.configs import config_path

    sim = subprocess.Popen([sys.executable, "-m", "customs_edge", "simulate", "handheld", "--seed", "3",
                            "--scan-period", "0.5", "--capture-every", "3"], stdout=subprocess.PIPE, text=True)
    assert sim.stdout is not None
    urls = json.loads(sim.stdout.readline())["urls"]
    cfg = yaml.safe_load(config_path("handheld").read_text())
    cfg["drivers"]["camera"]["url"] = urls["camera"]["http"]
    cfg["drivers"]["scanner"]["port"] = urls["scanner"]["socket"]
    cfg["drivers"]["gps"]["port"] = urls["gps"]["socket"]
    cfg["outbox"]["path"] = str(work / "unit" / "outbox.db")
    cfg["sync"]["port"] = 1  # nothing listens: the unit works offline, as in a hold
    (work / "unit").mkdir()
    path = work / "handheld.yaml"
    path.write_text(yaml.safe_dump(cfg))
    agent = subprocess.Popen([sys.executable, "-m", "customs_edge", "run", "--config", str(path),
                              "--log-level", "WARNING"], stderr=subprocess.DEVNULL)
    peak = 0.0
    try:
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            time.sleep(0.5)
            peak = max(peak, _vmrss(agent.pid) or 0.0)
        out["unit_rss_mb"] = round(_vmrss(agent.pid) or 0.0, 1)
        out["unit_rss_peak_mb"] = round(peak, 1)
        out["unit_rss_breakdown_mb"] = _breakdown(agent.pid)
    finally:
        agent.terminate()
        agent.wait(10)
        sim.terminate()
        sim.wait(10)
    from customs_edge.agent.outbox import read_stats

    out["unit_records"] = read_stats(Path(cfg["outbox"]["path"])).last_seq
    out["unit_captures"] = sum(1 for _ in Path(f"{cfg['outbox']['path']}.photos").glob("??/*.jpg"))


def bench_photos(out: dict[str, Any], n: int, work: Path) -> None:
    import cv2
    import numpy as np

    from customs_edge.agent.photos import PhotoSender, PhotoStore
    from customs_edge.core.mqtt import Message, MqttLink
    from customs_edge.hub.brokers import Mosquitto, mosquitto_path
    from customs_edge.hub.service import Hub, HubConfig
    from customs_edge.simulators.camera import WoodSection

    if mosquitto_path() is None:
        out["photo_mb_s"] = None
        return
    section = WoodSection(9, 1600, 1200)
    store = PhotoStore(work / "dev" / "outbox.db.photos", 4096)
    raw = work / "raw"
    raw.mkdir()
    total = 0
    for i in range(n):
        _, buf = cv2.imencode(".jpg", section.frame(i), [cv2.IMWRITE_JPEG_QUALITY, 95])
        data = buf.tobytes() + np.random.default_rng(i).bytes(16)  # unique bytes per photo
        sha = store.put(data)
        assert sha is not None
        total += len(data)
    out["photo_count"], out["photo_mean_kb"] = n, round(total / n / 1024)
    files = sorted(store.root.glob("??/*.jpg"))
    t = time.perf_counter()
    for f in files:
        dst = raw / f.name
        shutil.copyfile(f, dst)
        with dst.open("rb") as g:
            os.fsync(g.fileno())
    out["copy_mb_s"] = round(total / 2**20 / (time.perf_counter() - t), 1)

    broker = Mosquitto(work / "broker", persistence=False).start()
    hub = Hub(HubConfig(port=broker.port, db=work / "hub.db"))
    stop = threading.Event()
    th = threading.Thread(target=hub.run, args=(stop,), daemon=True)
    th.start()
    hub.ready.wait(10)
    sender = PhotoSender(store, "bench-hh", "customs-edge/v1", window=4)
    link = MqttLink("bench-hh-photos", "127.0.0.1", broker.port, clean_session=True)
    try:
        while not link.connected:
            link.step(0.1)
        link.subscribe(sender.t_ack, 1)
        t = time.perf_counter()
        while store.pending(1):
            for ev in link.step(0.01):
                if isinstance(ev, Message):
                    sender.on_message(ev)
            sender.step(link, True)
            if time.perf_counter() - t > 120:
                raise RuntimeError("photo delivery did not finish in 120 s")
        out["photo_mb_s"] = round(total / 2**20 / (time.perf_counter() - t), 1)
        out["photo_resent"] = store.stats.resent
        out["photo_at_hub"] = sum(1 for _ in (work / "hub.db.photos").glob("??/*.jpg"))
    finally:
        link.close()
        stop.set()
        th.join(10)
        broker.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--photos", type=int, default=30)
    p.add_argument("--unit-seconds", type=float, default=20.0)
    p.add_argument("--unit-only", action="store_true", help="only the running unit's memory (~30 s)")
    args = p.parse_args()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-handheld-") as tmp:
        work = Path(tmp)
        bench_unit(out, args.unit_seconds, work)  # its own processes, before this one grows
        if args.unit_only:
            print(json.dumps(out, indent=2) if args.json else out)
            return
        bench_photos(out, args.photos, work)
        pin_one_core()
        bench_photo_work(out)
        bench_risk(out, args.entries)
    out["bench_rss_mb"], out["bench_peak_rss_mb"] = round(rss_mb(), 1), round(peak_rss_mb(), 1)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k:>22}: {v}")


if __name__ == "__main__":
    main()
