"""`customs-edge probe --config FILE ROLE`: open one instrument as configured and show what it sends.

  readings      one line each on stdout (`KIND {json}`); a thermal frame also with its min/max and a small
                text heat map to aim the array by
  --hexdump     the wire on stderr, both directions, one block per frame: what the driver writes (`>`:
                commands, Modbus requests), what it reads (`<`), its control calls (`!`: reset_input_buffer,
                flush, ...) and each frame decoded (`#`: Modbus RTU and TCP, the GY-MCU90640's commands
                and frames; cli/probe_decode.py), with seconds since the start
  --scan        a serial role only: try the common baud rates x parities, report which give valid frames

The dump is pyserial's spy:// hex dump (its FormatHexdump: 16 bytes a row, offset, ASCII column) led by the
direction. spy:// itself is not used: it wraps device paths only (not socket://) and prints each read()
call (one byte at a time on a quiet line) where a technician needs whole frames; the Spy below wraps any
pyserial port (and Modbus TCP's socket) as the driver opens it, through the driver's `spy` hook, and cuts
what was read at the driver's frame boundaries.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, cast

import numpy as np
from serial.urlhandler.protocol_spy import FormatHexdump

from customs_edge.agent import registry
from customs_edge.core.errors import ConfigError, DriverFault
from customs_edge.core.readings import Reading, ThermalFrame
from customs_edge.drivers.base import Driver, DriverConfig, SerialPortConfig

BAUDRATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800)
PARITIES = ("N", "E", "O")
RAMP = ".:-=+*#%@"  # coldest to hottest
HEX_COLUMNS = 16 * 3 + 1  # a hexdump row's hex part (then the ASCII column)


class Hexdump(FormatHexdump):
    """spy://'s hex dump, each line led by its direction: `<` read, `>` written, `!` a control call, `#` a
    decoded frame. Hex in lower case, as in the drivers' error messages (`CRC mismatch in 01 04 ...`)."""

    SIGNS = {"RX": "<", "TX": ">", "FRM": "#"}

    def write_line(self, timestamp: float, label: str, value: str, value2: str = "") -> None:
        sign = self.SIGNS.get(label, "!")
        if label in ("RX", "TX"):
            value, value2 = value.lower(), value2[:HEX_COLUMNS].lower() + value2[HEX_COLUMNS:]
        self.output.write(f"{sign} {timestamp:010.3f} {label:4} {value}{value2}".rstrip() + "\n")
        self.output.flush()

    def note(self, text: str) -> None:
        self.write_line(time.time() - self.start_time, "FRM", text)


Decoder = Callable[[str, bytes], "str | None"]  # ("TX" | "RX", one frame) -> a line about it, or None


class Spy:
    """A pyserial port seen through: writes, control calls, and what was read, cut into frames by `frame()`
    (the probe calls it at each frame boundary the driver reached). Everything else goes to the port."""

    __slots__ = ("decode", "fmt", "port", "rx")
    CONTROLS = ("reset_input_buffer", "reset_output_buffer", "flush", "send_break")

    def __init__(self, port: Any, fmt: Hexdump, decode: Decoder | None = None) -> None:
        """`port`: a pyserial port, or a socket (its recv and sendall are seen as read and write)."""
        self.port, self.fmt, self.decode, self.rx = port, fmt, decode, bytearray()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.port, name)
        if name in self.CONTROLS:
            def control(*args: Any) -> Any:
                self.frame()
                self.fmt.control("Q-RX" if "input" in name else "BRK" if "break" in name else "Q-TX",
                                 " ".join([name, *map(str, args)]))
                return attr(*args)
            return control
        return attr

    def __setattr__(self, name: str, value: Any) -> None:
        if name in Spy.__slots__:
            object.__setattr__(self, name, value)
            return
        if name in ("rts", "dtr", "break_condition"):
            self.fmt.control(name.upper()[:4], "active" if value else "inactive")
        setattr(self.port, name, value)

    def read(self, size: int = 1) -> bytes:
        data = bytes(self.port.read(size))
        self.rx += data
        return data

    def write(self, data: bytes) -> int | None:
        self.frame()
        self._show("TX", bytes(data))
        return cast(int | None, self.port.write(data))

    def recv(self, size: int) -> bytes:
        data = bytes(self.port.recv(size))
        self.rx += data
        return data

    def sendall(self, data: bytes) -> None:
        self.frame()
        self._show("TX", bytes(data))
        self.port.sendall(data)

    def close(self) -> None:
        self.frame()
        self.port.close()

    def frame(self, keep: int = 0) -> None:
        """Show what was read as one block, but its last `keep` bytes (the start of the next frame)."""
        cut = len(self.rx) - min(keep, len(self.rx))
        if cut:
            block, self.rx = bytes(self.rx[:cut]), self.rx[cut:]
            self._show("RX", block)

    def _show(self, direction: str, block: bytes) -> None:
        (self.fmt.rx if direction == "RX" else self.fmt.tx)(block)
        note = self.decode(direction, block) if self.decode else None
        if note:
            self.fmt.note(note)


# frames decoded in the dump, by driver name: the decoders import their protocol's code only when used
DECODERS = {"modbus-rtu": "ModbusRtuDecoder", "modbus-tcp": "ModbusTcpDecoder", "mlx90640-serial": "Mlx90640Decoder",
            "modbus-th": "ModbusRtuDecoder"}


def decoder(driver: Driver) -> Decoder | None:
    name = DECODERS.get(getattr(driver.config, "driver", ""))
    if name is None:
        return None
    from customs_edge.cli import probe_decode

    return cast(Decoder, getattr(probe_decode, name)())


def heat_map(pixels: np.ndarray, cols: int = 8, rows: int = 6) -> list[str]:
    """`rows` lines of `cols` characters from RAMP, each the hottest pixel of its block, scaled between
    the coldest and the hottest block: where the warm thing is in the field of view."""
    h, w = pixels.shape
    bh, bw = max(1, h // rows), max(1, w // cols)
    blocks = pixels[:bh * rows, :bw * cols].reshape(rows, bh, cols, bw).max(axis=(1, 3))
    lo, span = float(blocks.min()), float(blocks.max() - blocks.min()) or 1.0
    idx = np.rint((blocks - lo) / span * (len(RAMP) - 1)).astype(int)
    return ["".join(RAMP[i] for i in row) for row in idx]


def show_thermal(r: ThermalFrame, out: TextIO, size: tuple[int, int]) -> None:
    px = r.pixels
    y, x = np.unravel_index(int(np.argmax(px)), px.shape)
    ambient = f", ambient {r.ambient_c:.1f} °C" if r.ambient_c is not None else ""
    print(f"  min {float(px.min()):.1f} °C  max {float(px.max()):.1f} °C at row {y} col {x}{ambient}  "
          f"(heat map {size[0]}x{size[1]}, '{RAMP[0]}' coldest to '{RAMP[-1]}' hottest)", file=out)
    for line in heat_map(px, *size):
        print(f"  |{line}|", file=out)


def _pending(driver: Driver) -> int:
    """Bytes a stream driver's parser holds: read, but not yet part of a frame."""
    parser = getattr(driver, "parser", None)
    return len(parser.buf) if parser is not None else 0


def probe(driver: Driver, *, count: int, seconds: float, hexdump: bool, map_size: tuple[int, int],
          out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Read up to `count` readings within `seconds`; returns how many came."""
    spies: list[Spy] = []
    fmt = Hexdump(err, False)

    def wrap(port: Any) -> Any:
        spies.append(Spy(port, fmt, decoder(driver)))
        return spies[-1]

    if hexdump and hasattr(driver, "spy"):  # SerialDriver, ModbusTcp
        driver.spy = wrap
    elif hexdump:
        print(f"--hexdump: {type(driver).__name__} does not talk through a pyserial port; readings only",
              file=err)
    n, deadline = 0, time.monotonic() + seconds
    try:
        driver.open()
        while n < count and time.monotonic() < deadline:
            r = driver.read()
            if spies:  # a frame boundary: what the parser still holds belongs to the next frame
                spies[-1].frame(keep=_pending(driver))
            if r is not None:
                n += 1
                show(r, out, map_size)
    except DriverFault as exc:
        print(f"FAULT: {exc}", file=err)
    finally:
        driver.close()
    return n


def show(r: Reading, out: TextIO, map_size: tuple[int, int]) -> None:
    print(f"{r.KIND} {json.dumps(r.summary())}", file=out)
    if isinstance(r, ThermalFrame):
        show_thermal(r, out, map_size)
    out.flush()


def scan(role: str, dc: SerialPortConfig, seconds: float, out: TextIO = sys.stdout) -> list[tuple[int, str]]:
    """Try every baud rate x parity for `seconds` each (up to two valid frames); print one line each and
    return the settings that gave valid frames."""
    good: list[tuple[int, str]] = []
    print(f"scanning {dc.port}: {len(BAUDRATES) * len(PARITIES)} settings, up to {seconds:g} s each", file=out)
    for baud in BAUDRATES:
        for parity in PARITIES:
            driver = registry.lookup("driver", dc.driver)(role, dc.model_copy(update={"baudrate": baud,
                                                                                    "parity": parity}))
            valid, note = _try(driver, seconds)
            st = driver.stats
            if valid:
                good.append((baud, parity))
            print(f"  {baud:>6} {dc.bytesize}{parity}{dc.stopbits:g}  {valid:>2} valid  {st.corrupt:>3} corrupt  "
                  f"{st.bytes_in:>6} bytes  {note}", file=out)
    if good:
        print("valid frames with: " + ", ".join(f"baudrate {b} parity {p}" for b, p in good)
              + f"; set these under drivers.{role} in the config", file=out)
    else:
        print("no setting gave a valid frame: check the wiring (TX/RX, RS-485 A/B), that the instrument is on "
              "and sending, the byte size and stop bits, and the checksum setting", file=out)
    return good


def _try(driver: Driver, seconds: float) -> tuple[int, str]:
    valid, deadline = 0, time.monotonic() + seconds
    try:
        driver.open()
    except DriverFault as exc:
        return 0, str(exc)  # "cannot open PORT: why"
    try:
        while valid < 2 and time.monotonic() < deadline:
            try:
                if driver.read() is not None:
                    valid += 1
            except DriverFault:  # silence or a dead line within the window: keep listening
                continue
    finally:
        driver.close()
    return valid, "<- valid frames" if valid else ""


def running_unit(outbox: Path, dc: DriverConfig) -> list[str]:
    """Signs that a unit is running on this config or port: the probe would then fight it for the bytes."""
    from customs_edge.cli.check import holders_of, outbox_holder, port_locked

    out = []
    if pid := outbox_holder(outbox):
        out.append(f"a running agent (pid {pid}) holds {outbox}: its drivers hold their ports; stop it first "
                   "(systemctl stop customs-edge@NAME)")
    if isinstance(dc, SerialPortConfig) and "://" not in dc.port and port_locked(dc.port):
        out.append(f"{dc.port} is held by {', '.join(holders_of(dc.port)) or 'another process'}: a running "
                   "unit? stop it first, the port opens for one process at a time")
    return out


def main(args: argparse.Namespace) -> int:
    """Open one instrument as configured and print what it sends: the first thing to run on site."""
    from customs_edge.agent.config import load_unit_config

    cfg = load_unit_config(args.config)
    if args.role not in cfg.drivers:
        raise ConfigError(args.config, [f"drivers: no driver named {args.role!r}; have {', '.join(cfg.drivers)}"])
    dc = cfg.drivers[args.role]
    for line in running_unit(cfg.outbox.path, dc):
        print(f"warning: {line}", file=sys.stderr)
    if args.scan:
        if not isinstance(dc, SerialPortConfig) or dc.port.startswith("socket://"):
            raise ConfigError(args.config, [f"drivers.{args.role}: --scan tries serial line settings: it needs a "
                                            "serial port (a device path), not a network connection"])
        return 0 if scan(args.role, dc, args.scan_seconds) else 1
    driver = registry.lookup("driver", dc.driver)(args.role, dc)
    n = probe(driver, count=args.count, seconds=args.seconds, hexdump=args.hexdump, map_size=args.map)
    print(json.dumps({"role": args.role, "readings": n, **driver.stats.as_dict()}), file=sys.stderr)
    return 0 if n else 1
