"""A directory another program drops result files into (port `dir:///path`): the shared part of the
drivers that read one (N42 portal documents, analyser result files).

New files (matching `patterns`, unchanged for `settle_s`) are read once, in name order; each is
remembered by name, size and mtime in the seen file (one line each, fsync'd), so a restart never reads
one again, and a file rewritten in place (new size or mtime) is read again. The driver remembers a file
once the readings made of it were handed over (`hand` then `release`), or at once when it yielded
nothing (`done`). A file larger than `max_bytes` is counted corrupt and remembered unread.
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlparse

from customs_edge.core.errors import DriverFault
from customs_edge.drivers.base import DriverStats


def drop_path(port: str) -> Path | None:
    """The directory of a `dir:///path` port, None for any other URL."""
    return Path(urlparse(port).path) if port.startswith("dir://") else None


class DropDir:
    def __init__(self, role: str, path: Path, stats: DriverStats, *, patterns: Sequence[str], settle_s: float,
                 max_bytes: int, seen_file: Path | None, seen_name: str) -> None:
        self.role, self.path, self.stats = role, path, stats
        self.patterns, self.settle_s, self.max_bytes = list(patterns), settle_s, max_bytes
        self.seen_file = seen_file or path / seen_name
        self.seen: set[str] = set()
        self._handed: str | None = None  # a file whose readings are out, remembered at release()

    def open(self) -> None:
        if not self.path.is_dir():
            self.stats.faults += 1
            raise DriverFault(f"{self.role}: {self.path} is not a directory (port dir://{self.path})")
        try:
            self.seen = set(self.seen_file.read_text().splitlines())
        except FileNotFoundError:
            self.seen = set()
        except OSError as exc:
            self.stats.faults += 1
            raise DriverFault(f"{self.role}: cannot read {self.seen_file}: {exc}") from exc
        self._handed = None

    def done(self, key: str) -> None:
        """Remember a file now: read, refused or empty, it is never read again."""
        self.seen.add(key)
        try:
            with self.seen_file.open("a") as f:
                f.write(key + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            self.stats.faults += 1
            raise DriverFault(f"{self.role}: cannot record a read file in {self.seen_file}: {exc}") from exc

    def hand(self, key: str) -> None:
        """Readings made of this file are pending: remember it at release(), once they were taken."""
        self._handed = key

    def release(self) -> None:
        if self._handed is not None:
            key, self._handed = self._handed, None
            self.done(key)

    def new_files(self) -> Iterator[tuple[str, bytes]]:
        """(key, content) of each settled file not read before, in name order (bytes_in counted)."""
        now = time.time()
        try:
            entries = sorted(os.scandir(self.path), key=lambda e: e.name)
        except OSError as exc:
            self.stats.faults += 1
            raise DriverFault(f"{self.role}: cannot list {self.path}: {exc}") from exc
        for e in entries:
            if e.name == self.seen_file.name or not any(fnmatch.fnmatch(e.name, p) for p in self.patterns):
                continue
            try:
                st = e.stat()
            except OSError:
                continue  # removed meanwhile
            key = f"{e.name}\t{st.st_size}\t{st.st_mtime_ns}"
            if key in self.seen or not e.is_file() or now - st.st_mtime < self.settle_s:
                continue
            if st.st_size > self.max_bytes:
                self.stats.corrupt += 1
                self.done(key)
                continue
            try:
                data = Path(e.path).read_bytes()
            except OSError:
                continue  # removed or unreadable meanwhile: tried again at the next poll
            self.stats.bytes_in += len(data)
            yield key, data
