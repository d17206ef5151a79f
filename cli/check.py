"""`customs-edge check --config FILE`: is this unit ready to run? One line per check, ✓ / ! / ✗, and for
every ! and ✗ the fix to try. Read-only, like `status`: it creates no outbox and takes no lock a running
unit needs (it opens each port for a moment, exclusively, as the unit would; a port the running unit
holds is reported as held, with the process that holds it).

  config            the file loads and validates (every problem with its key and line)
  cross-references  warnings of `config validate`: roles the app does not read, ignored port settings
  models            the app's model files are present and match their manifests (the app loads them)
  port <role>       exists (else the serial ports present, by /dev/serial/by-id name), is not held by
                    another process, opens, and yields a valid frame within its silence window
  outbox            its directory is writable, not on a RAM disk, with room for outbox.max_mb
  outage headroom   room, in outbox.max_mb and on the disk, for --outage-hours of records at the unit's
                    rate, learnt read-only from the records in its outbox file (a ! when it has none)
  broker            reachable, and the CONNACK accepted (a refusal in words)
  hub               a round trip: a ping on the unit's hub/ping topic answered by a hub (hub/pings.py), with
                    the unit's own credentials (so the broker's ACL is checked too); skipped in ack_mode broker
  clock             not before this software was built (a Pi without RTC before NTP), and its offset to
                    the hub's clock from that round trip (as the agent's health does from acks): ! over
                    1 s, ✗ over 60 s

Exit code by the worst result: 0 all ✓, 3 a warning (!), 1 a failure (✗).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import math
import os
import shutil
import sqlite3
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from customs_edge.agent import registry
from customs_edge.agent.config import UnitConfig, load_unit_config
from customs_edge.agent.outbox import OutboxError, read_stats
from customs_edge.core.errors import ConfigError, CustomsEdgeError, DriverFault
from customs_edge.core.mqtt import Connected, Lost, Message, MqttLink
from customs_edge.core.wire import HUB_PING, HUB_PONG, HubPing, HubPong, topic
from customs_edge.drivers.base import DriverConfig, SerialPortConfig

OK, WARN, FAIL = "ok", "warn", "fail"
MARK = {OK: "✓", WARN: "!", FAIL: "✗"}
EXIT = {OK: 0, WARN: 3, FAIL: 1}
RANK = {OK: 0, WARN: 1, FAIL: 2}
MIB = 1 << 20
VOLATILE_FS = {"tmpfs", "ramfs"}


@dataclass
class Result:
    check: str
    state: str
    detail: str
    fix: str = ""


def run_checks(path: str | Path, *, frame_timeout_s: float | None = None, now: float | None = None,
               outage_hours: float = 8.0) -> list[Result]:
    warnings: list[str] = []
    try:
        cfg = load_unit_config(path, warnings)
    except ConfigError as exc:
        return [Result("config", FAIL, f"{path}: " + "; ".join(exc.problems),
                       f"edit the keys named (each with its line); `customs-edge config validate {path}`"),
                check_clock(now)]
    out = [Result("config", OK, f"{path}: {cfg.type} unit {cfg.device_id}, drivers: {', '.join(cfg.drivers)}")]
    out += [Result("cross-references", WARN, w, "fix or remove that key (config validate prints the same)")
            for w in warnings] or [Result("cross-references", OK, "drivers, app points and port settings agree")]
    out.append(check_models(cfg))
    out += [check_port(role, dc, frame_timeout_s) for role, dc in cfg.drivers.items()]
    out.append(check_outbox(cfg))
    out.append(check_headroom(cfg, outage_hours))
    out.append(check_broker(cfg))
    if out[-1].state == FAIL:
        out.append(Result("hub", FAIL, "not reached: the broker check failed", "fix the broker first (above)"))
        out.append(check_clock(now))
    else:
        hub, offset = check_hub(cfg)
        out += [hub, check_clock(now, offset)]
    return out


def worst(results: list[Result]) -> str:
    return max((r.state for r in results), key=RANK.__getitem__, default=OK)


def render(results: list[Result]) -> str:
    lines = []
    for r in results:
        lines.append(f"{MARK[r.state]} {r.check}: {r.detail}")
        if r.fix and r.state != OK:
            lines.append(f"    fix: {r.fix}")
    return "\n".join(lines)


def main(path: str, *, as_json: bool = False, frame_timeout_s: float | None = None, outage_hours: float = 8.0) -> int:
    # the link's own warnings would repeat the broker line: the results are the report
    logging.getLogger("customs_edge").addHandler(logging.NullHandler())
    results = run_checks(path, frame_timeout_s=frame_timeout_s, outage_hours=outage_hours)
    state = worst(results)
    if as_json:
        print(json.dumps({"result": state, "checks": [asdict(r) for r in results]}, indent=2, ensure_ascii=False))
    else:
        print(render(results))
    return EXIT[state]


def check_models(cfg: UnitConfig) -> Result:
    """The app loads its models as the running unit would: a missing file or one that does not match its
    manifest (hash, inputs, outputs) is refused here, not at the first reading."""
    try:
        registry.lookup("app", cfg.type)(cfg.device_id, cfg.app)  # loads and verifies its models
    except (CustomsEdgeError, OSError, ValueError) as exc:
        return Result("models", FAIL, str(exc), "reinstall the package (its model files are part of it), or point "
                      "app.model_manifest at a manifest whose files are present and unchanged")
    return Result("models", OK, "every model of the app present and matching its manifest (or none needed)")


def check_port(role: str, dc: DriverConfig, frame_timeout_s: float | None = None) -> Result:
    name = f"port {role}"
    port = getattr(dc, "port", None) or getattr(dc, "url", None) or dc.driver
    if isinstance(dc, SerialPortConfig) and "://" not in dc.port:
        if not os.path.exists(dc.port):
            return Result(name, FAIL, f"{dc.port} does not exist",
                          f"serial ports present: {', '.join(serial_ports()) or 'none'}; write the "
                          "/dev/serial/by-id name (stable across reboots and replugging)")
        holders = holders_of(dc.port)
        if holders:
            return Result(name, FAIL, f"{dc.port} is held by {', '.join(holders)}",
                          "stop that process (a running unit: systemctl stop customs-edge@NAME), then check again")
    timeout = frame_timeout_s or float(getattr(dc, "silent_after_s", 5.0))
    driver = registry.lookup("driver", dc.driver)(role, dc)
    t0 = time.monotonic()
    try:
        driver.open()
    except DriverFault as exc:
        return Result(name, FAIL, str(exc), "check the path or URL, the cable, and that the device server is up"
                      if "exclusively lock" not in str(exc) else
                      "stop the other process that has it open (a running unit?), then check again")
    try:
        while time.monotonic() - t0 < timeout:
            with contextlib.suppress(DriverFault):  # silence within the window: keep waiting
                if (reading := driver.read()) is not None:
                    return Result(name, OK, f"{port}: a valid {reading.KIND} frame after "
                                  f"{time.monotonic() - t0:.1f} s")
    finally:
        driver.close()
    st = driver.stats
    if st.corrupt or st.bytes_in:
        return Result(name, FAIL, f"{port}: {st.bytes_in} bytes, {st.corrupt} corrupt frames and no valid one in "
                      f"{timeout:.0f} s", "match baudrate, parity, bytesize, stopbits and the checksum setting to "
                      f"the instrument's; `customs-edge probe --config FILE {role} --hexdump` shows the bytes")
    return Result(name, FAIL, f"{port}: opened, but nothing arrived in {timeout:.0f} s",
                  "check the wiring (TX/RX, RS-485 A/B), that the instrument is on and set to send "
                  "(continuous output, or answering this protocol's polls), and its address")


def serial_ports() -> list[str]:
    """Serial ports on this machine, by their stable /dev/serial/by-id name when they have one."""
    by_id = sorted(glob.glob("/dev/serial/by-id/*"))
    named = {os.path.realpath(p) for p in by_id}
    raw = sorted(p for pat in ("/dev/ttyUSB*", "/dev/ttyACM*", "/dev/ttyAMA*", "/dev/serial[0-9]")
                 for p in glob.glob(pat) if os.path.realpath(p) not in named)
    return by_id + raw


def holders_of(path: str) -> list[str]:
    """'pid N (command)' of every other process with `path` open (those /proc lets us see)."""
    target = os.path.realpath(path)
    out = []
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        pid = fd_dir.split("/")[2]
        if int(pid) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if any(os.path.realpath(os.path.join(fd_dir, fd)) == target for fd in os.listdir(fd_dir)):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                out.append(f"pid {pid} ({cmd.strip()[:60]})")
    return out


def port_locked(path: str) -> bool:
    """Whether a process holds `path` with an exclusive flock, as a running unit holds its serial ports
    (pyserial's exclusive=True); another process merely having it open (a simulator's pty) does not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we may have taken
    return False


def check_outbox(cfg: UnitConfig) -> Result:
    path = cfg.outbox.path
    d = path.parent
    existing = next(p for p in (d, *d.parents) if p.exists())
    if not existing.is_dir():
        return Result("outbox", FAIL, f"{existing} is a file, so {d} cannot be created",
                      "set outbox.path to a file in a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return Result("outbox", FAIL, f"{existing} is not writable ({exc.strerror})",
                      "give the service user the directory (chown), or check the file system is mounted rw")
    fstype = mount_type(existing)
    if fstype in VOLATILE_FS:
        return Result("outbox", WARN, f"{existing} is on {fstype}: records are lost at power off",
                      "put outbox.path on persistent storage (e.g. /var/lib/customs-edge)")
    free = shutil.disk_usage(existing).free
    if free < cfg.outbox.max_mb * MIB:
        return Result("outbox", WARN, f"{free / MIB:.0f} MiB free on {existing}, less than outbox.max_mb "
                      f"({cfg.outbox.max_mb:g} MiB): a long outage fills the disk before the cap",
                      "free space, or lower outbox.max_mb")
    held = outbox_holder(path)
    if held:
        return Result("outbox", WARN, f"{path} is open in a running agent (pid {held})",
                      "expected on a running unit; its ports are then held too (stop it to check them)")
    made = "" if existing == d else f" (the agent creates {d})"
    return Result("outbox", OK, f"{existing} writable{made}, {free / MIB:.0f} MiB free (cap {cfg.outbox.max_mb:g} MiB)")


def record_rate(path: Path) -> tuple[float, float] | str:
    """(records per second, average bytes a record takes) from the records in the outbox file, read-only;
    or why they cannot be known. Sizes as the outbox counts them against its cap: payload + 64 bytes."""
    try:
        read_stats(path)  # refuses a missing file, another schema or not an outbox, creating nothing
    except OutboxError as exc:
        return str(exc)
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        n, first, last, t0, t1, size = db.execute(
            "SELECT count(*), min(seq), max(seq), min(ts), max(ts), avg(length(payload)) + 64 FROM records").fetchone()
    except sqlite3.DatabaseError as exc:
        return f"{path}: cannot read its records ({exc})"
    finally:
        db.close()
    if n < 2 or t1 <= t0:
        return f"{path} holds {n} record{'s' * (n != 1)}: no history to learn the rate from"
    return (last - first) / (t1 - t0), float(size)


def check_headroom(cfg: UnitConfig, hours: float) -> Result:
    """Room for `hours` of outage at the unit's record rate: within outbox.max_mb (else the cap drops the
    oldest low-priority records) and on the disk."""
    name = f"outage headroom ({hours:g} h)"
    got = record_rate(cfg.outbox.path)
    if isinstance(got, str):
        return Result(name, WARN, f"the record rate is unknown: {got}", "run the unit for an hour and check again "
                      "(its outbox then shows the rate), or size outbox.max_mb by hand: records/s x "
                      f"{hours * 3600:.0f} s x bytes a record (payload + 64)")
    rate, size = got
    need = rate * hours * 3600 * size
    existing = next(p for p in (cfg.outbox.path, *cfg.outbox.path.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    what = f"{rate:.3g} records/s of {size:.0f} B need {need / MIB:.1f} MiB for {hours:g} h"
    if need > cfg.outbox.max_mb * MIB:
        return Result(name, WARN, f"{what}, more than outbox.max_mb ({cfg.outbox.max_mb:g} MiB): the cap drops the "
                      "oldest low-priority records first", f"raise outbox.max_mb to {math.ceil(need / MIB)} or more")
    if need > free:
        return Result(name, WARN, f"{what}, more than the {free / MIB:.0f} MiB free on {existing}",
                      "free space, or put outbox.path on a larger disk")
    return Result(name, OK, f"{what}, within outbox.max_mb ({cfg.outbox.max_mb:g} MiB) and the "
                  f"{free / MIB:.0f} MiB free")


def mount_type(path: Path) -> str:
    """File system type of the mount holding `path` (from /proc/mounts; '' when unknown)."""
    best, kind = "", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(path.resolve()).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind


def outbox_holder(path: Path) -> str | None:
    """The pid written in `<outbox>.lock` when an agent holds the lock; None when nobody does."""
    try:
        fd = os.open(f"{path}.lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 20, 0).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)  # closing releases a lock we may have taken
    return None


def check_broker(cfg: UnitConfig) -> Result:
    s = cfg.sync
    where = f"{s.host}:{s.port}"
    link = MqttLink(f"customs-edge-check-{os.getpid()}", s.host, s.port, **s.credentials(),
                    connect_timeout_s=s.connect_timeout_s)
    deadline = time.monotonic() + s.connect_timeout_s + 1.0
    try:
        while time.monotonic() < deadline:
            for ev in link.step(0.2):
                if isinstance(ev, Connected):
                    link.disconnect()
                    return Result("broker", OK, f"{where} accepted the connection"
                                  + (f" as {s.username!r}" if s.username else ""))
                if isinstance(ev, Lost) and ev.reason.startswith("CONNACK refused"):
                    what, fix = ev.reason.rsplit(": ", 1)  # each refusal reads "what: the fix"
                    return Result("broker", FAIL, f"{where}: {what}", fix)
                if isinstance(ev, Lost):
                    return Result("broker", FAIL, f"{where}: {ev.reason}", "is the broker running and reachable "
                                  "from here? check sync.host and sync.port, and any firewall between")
    finally:
        link.close()
    return Result("broker", FAIL, f"{where}: no answer in {s.connect_timeout_s:g} s",
                  "check sync.host and sync.port, and any firewall between")


PING_TIMEOUT_S = 5.0
OFFSET_WARN_S, OFFSET_FAIL_S = 1.0, 60.0


def check_hub(cfg: UnitConfig, timeout_s: float = PING_TIMEOUT_S) -> tuple[Result, tuple[float, float] | None]:
    """A ping answered by the hub, with the unit's credentials; also (clock offset to the hub, its error bound)
    from that round trip: offset = hub's clock - (ours at sending + round trip / 2)."""
    s = cfg.sync
    if s.ack_mode == "broker":
        return Result("hub", OK, "not checked: ack_mode broker (a consumer of the site's own acks the records)"), None
    prefix = s.topic_prefix
    ping_t, pong_t = topic(prefix, cfg.device_id, HUB_PING), topic(prefix, cfg.device_id, HUB_PONG)
    link = MqttLink(f"customs-edge-check-{os.getpid()}-hub", s.host, s.port, **s.credentials(),
                    connect_timeout_s=s.connect_timeout_s)
    ping = HubPing(id=uuid.uuid4().hex, ts=time.time())
    sent_mono: float | None = None
    deadline = time.monotonic() + s.connect_timeout_s + timeout_s
    try:
        while time.monotonic() < deadline:
            for ev in link.step(0.05):
                if isinstance(ev, Connected):
                    link.subscribe(pong_t, 1)  # before the ping: the broker handles one client's packets in order
                    ping.ts, sent_mono = time.time(), time.monotonic()
                    link.publish(ping_t, ping.model_dump_json().encode(), qos=1)
                    deadline = sent_mono + timeout_s
                elif isinstance(ev, Message) and ev.topic == pong_t and sent_mono is not None:
                    rtt = time.monotonic() - sent_mono
                    try:
                        pong = HubPong.model_validate_json(ev.payload)
                    except ValueError:
                        continue
                    if pong.id != ping.id:
                        continue  # an answer to an earlier check
                    offset = pong.ts - (ping.ts + rtt / 2)
                    link.disconnect()
                    return Result("hub", OK, f"answered a ping in {rtt * 1000:.0f} ms"), (offset, rtt / 2)
                elif isinstance(ev, Lost):
                    return Result("hub", FAIL, f"the broker closed the connection: {ev.reason}",
                                  "run `customs-edge check` again; see the broker line"), None
    finally:
        link.close()
    return Result("hub", FAIL, f"no hub answered a ping on {ping_t} within {timeout_s:g} s",
                  "is the hub running (`systemctl status customs-edge-hub`, `journalctl -u customs-edge-hub`) "
                  f"and connected to {s.host}:{s.port} with topic_prefix {prefix!r}? With TLS, the broker's ACL "
                  "must let this unit write .../hub/ping and the hub answer (configs/broker/acl)"), None


def build_time() -> float:
    """When this software was built: the modification time of its own files, as installed."""
    return Path(__file__).resolve().stat().st_mtime


def check_clock(now: float | None = None, offset: tuple[float, float] | None = None) -> Result:
    """Not before the build date; and, given (offset to the hub's clock, its error bound), close to the hub's."""
    now = time.time() if now is None else now
    built = build_time()
    ntp = "enable NTP (`timedatectl set-ntp true`; `timedatectl` shows the state), or fit an RTC"

    def day(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")

    if now < built:
        return Result("clock", FAIL, f"reads {day(now)}, before this software was built ({day(built)}): "
                      "records would carry wrong times", f"set the time and {ntp}")
    detail = f"{day(now)} (after the build, {day(built)})"
    if offset is None:
        return Result("clock", OK, detail)
    off, err = offset
    ahead = f"{abs(off):.3f} s {'behind' if off > 0 else 'ahead of'} the hub's (±{err:.3f} s)"
    if abs(off) - err > OFFSET_FAIL_S:
        return Result("clock", FAIL, f"{detail}, {ahead}: records carry times that far off",
                      f"{ntp}; check the hub's clock too")
    if abs(off) - err > OFFSET_WARN_S:
        return Result("clock", WARN, f"{detail}, {ahead}", f"{ntp}; check the hub's clock too")
    return Result("clock", OK, f"{detail}, {ahead}")

