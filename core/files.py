"""Files that survive a power cut: written whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path


def write_durable(final: Path, data: bytes, tmp: Path) -> None:
    """Write `data` to `tmp`, fsync it, rename it to `final` and fsync the directory: after a power cut
    `final` holds all of `data` or does not exist. `tmp` must be on the same filesystem."""
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
