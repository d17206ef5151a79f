"""GY-MCU90640 serial module (an STM32 reading an MLX90640), as it talks on its UART.

Written from the module's documentation, not from drivers/mlx90640.py: "GYMCU90640 Module User
Manual V1.0" (kept as `GY_MCU9064 user manual v1.pdf` in vvkuryshev/GY-MCU90640-RPI-Python), as
summarised in ../shared/PROTOCOLS.md and docs/gate.md.

Frame, every 16-bit field little-endian: 5A 5A | 02 06 (1538 bytes follow up to the checksum) |
768 pixel temperatures, int16 °C x 100, 24 rows of 32 | ambient (sensor die) int16 °C x 100 |
checksum: the 16-bit sum of the 771 words before it, header and size included.

Commands, 4 bytes: A5 <command> <argument> <low byte of the sum of the three>.
  A5 35 02 DC  automatic output          A5 35 01 DB  send one frame
  A5 25 0x ..  refresh rate, manual section IV.4: 00 = 0.5 Hz, 01 = 1 Hz, 02 = 2 Hz, 03 = 4 Hz,
               04 = 8 Hz (A5 25 04 CE); the npm package gy-mcu90640-node lists the same order
               (updateFrequencies = [0.5, 1, 2, 4, 8]).
  A5 15 0x ..  baud rate: 01 = 9600, 02 = 115200, 03 = 460800.
A command whose sum byte is wrong is ignored.
"""

from __future__ import annotations

import struct

import numpy as np

HEADER = b"\x5a\x5a"
ROWS, COLS = 24, 32
FRAME_BYTES = 2 + 2 + ROWS * COLS * 2 + 2 + 2  # 1544
START = 0xA5
OUTPUT, RATE, BAUD = 0x35, 0x25, 0x15
QUERY, AUTOMATIC = 0x01, 0x02
RATE_HZ = {0x00: 0.5, 0x01: 1.0, 0x02: 2.0, 0x03: 4.0, 0x04: 8.0}  # manual IV.4
BAUD_RATES = {0x01: 9600, 0x02: 115200, 0x03: 460800}


def frame(pixels_c: np.ndarray, ambient_c: float, *, good_checksum: bool = True) -> bytes:
    """One frame from a 24 x 32 image in °C (values clipped to int16 after x 100)."""
    centi = np.clip(np.rint(np.asarray(pixels_c, dtype=np.float64) * 100), -32768, 32767).astype(np.int64)
    if centi.shape != (ROWS, COLS):
        raise ValueError(f"the module sends {ROWS} x {COLS} pixels, not {centi.shape}")
    words = [*struct.unpack("<2H", HEADER + (FRAME_BYTES - 6).to_bytes(2, "little")),
             *(int(v) & 0xFFFF for v in centi.ravel()), round(ambient_c * 100) & 0xFFFF]
    check = sum(words) & 0xFFFF
    if not good_checksum:
        check ^= 0x00FF
    return struct.pack(f"<{len(words) + 1}H", *words, check)


def command(code: int, argument: int) -> bytes:
    return bytes([START, code, argument, (START + code + argument) & 0xFF])


def commands(buf: bytearray) -> list[tuple[int, int]]:
    """Take every complete command out of `buf` (leaving a partial one), skipping noise and commands
    with a wrong sum: (command, argument) pairs in the order received."""
    out: list[tuple[int, int]] = []
    while True:
        start = buf.find(START)
        if start < 0:
            buf.clear()
            return out
        del buf[:start]
        if len(buf) < 4:
            return out
        if (buf[0] + buf[1] + buf[2]) & 0xFF == buf[3]:
            out.append((buf[1], buf[2]))
            del buf[:4]
        else:
            del buf[:1]
