"""Which commands a unit accepts: never one it has seen (a replay), never an expired one.

The ids of accepted commands are kept in `{outbox}.commands.json` next to the outbox, so a restart does
not reopen the door to a replay: each id with the time until which it is kept (its command's deadline, and
at least KEEP_S after it was seen, so a unit whose clock runs behind still recognises it). At most MAX_IDS
ids are kept, the oldest dropped first. An id is recorded before its command runs: a command the broker
delivers again after a crash (QoS 1 redelivery) is refused as a replay, never run twice.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from customs_edge.core.wire import COMMAND_TTL_S, Command

log = logging.getLogger(__name__)


class SeenCommands:
    MAX_IDS = 1000
    KEEP_S = COMMAND_TTL_S

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ids: dict[str, float] = self._load()  # id -> keep until (unix time), oldest first

    def check(self, cmd: Command, now: float | None = None, *, record: bool = True) -> str | None:
        """None and the id recorded when `cmd` may run; else why it is refused. `record` False: only the
        expiry is checked and the id is not kept (a model_chunk: it is idempotent, checked against the offer's
        sha256 and written at its offset, so a replay changes nothing; an fsync per chunk would cost more than
        the chunk, and chunk ids would push the ids that matter out of the bound)."""
        now = time.time() if now is None else now
        if cmd.id in self.ids:
            return f"replayed: command id {cmd.id!r} was already received; send a new id"
        if now > cmd.deadline():
            return (f"expired: its deadline {cmd.deadline():.0f} is {now - cmd.deadline():.0f} s past on this "
                    "unit's clock; send it again (or check the unit's clock)")
        if not record:
            return None
        self.ids = {i: t for i, t in self.ids.items() if t >= now}
        self.ids[cmd.id] = max(cmd.deadline(), now + self.KEEP_S)
        while len(self.ids) > self.MAX_IDS:
            del self.ids[next(iter(self.ids))]
        self._save()
        return None

    def _load(self) -> dict[str, float]:
        try:
            raw = json.loads(self.path.read_text())
            return {str(i): float(t) for i, t in raw.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("seen command ids unreadable; replays of earlier commands are not recognised",
                        extra={"path": str(self.path), "error": repr(exc)})
            return {}

    def _save(self) -> None:
        try:
            write_synced(self.path, json.dumps(self.ids))
        except OSError as exc:  # a full disk: kept in memory, written with the next command
            log.warning("cannot write the seen command ids", extra={"path": str(self.path), "error": str(exc)})


def write_synced(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically and durably: a temporary file written and fsynced, renamed over
    `path`, the directory fsynced. A power cut at any moment leaves the old content or the new, whole."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
