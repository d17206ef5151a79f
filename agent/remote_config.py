"""Configs pushed over MQTT (`customs-edge fleet config push`): checked, written atomically, applied as a
reload, proven, or rolled back. run_forever (agent/runtime.py) applies them, one at a time.

A config_push command carries args {"text": the YAML, "sha256": of its UTF-8 bytes, "probation_s":
optional}. The steps, FILE being the unit's config file (every write below is write_synced: a temporary
file written and fsynced, renamed, the directory fsynced):
  1. FILE.incoming <- the text, then load_unit_config(FILE.incoming): the code `config validate` runs. A
     refusal deletes it and answers "refused" with the text `config validate FILE` would print. A pushed
     config must also keep the unit's device_id and outbox file (its unsent records and sequence live there).
  2. FILE.last-good <- the text of the running config (as it was loaded, not as the file may have been
     edited since).
  3. FILE.pending <- the command id: a probation is under way.
  4. FILE.incoming renamed over FILE (atomic).
  5. The unit is replaced as a SIGHUP reload does (replace_unit: the outbox, its records and its sequence are
     handed over), and every driver of the new config must deliver a reading within the probation
     (default PROBATION_S).
  6. It did: FILE.pending deleted, answer "applied". It did not (a port that does not open, a model that
     does not load): FILE restored from FILE.last-good, the previous config started again, FILE.pending
     deleted, answer "rolled_back" with the reason.
A power cut before 4 leaves FILE as it was. Between 4 and the end of 6, FILE.pending exists: the next start
(recover()) restores FILE from FILE.last-good before loading it, so a config that has not passed its
probation is never booted (that push got no answer: the operator sends it again, with a new id). After 6
FILE is the config that runs.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Literal

from customs_edge.agent.commands import fsync_dir, write_synced
from customs_edge.agent.config import UnitConfig, load_unit_config
from customs_edge.agent.health import config_hash
from customs_edge.agent.runtime import Unit, replace_unit
from customs_edge.core.errors import ConfigError
from customs_edge.core.wire import Command, CommandReply

log = logging.getLogger(__name__)

PROBATION_S = 20.0
Outcome = Literal["applied", "refused", "rolled_back"]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class RemoteConfig:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.text = self._read() if path else ""  # the running config's text
        self.pushes: queue.Queue[Command] = queue.Queue()
        self.probation_s = PROBATION_S  # of the push being applied

    def _sibling(self, suffix: str) -> Path:
        assert self.path is not None
        return self.path.with_name(self.path.name + suffix)

    def _read(self) -> str:
        assert self.path is not None
        return self.path.read_text(encoding="utf-8-sig")

    # -- the sync thread's hook -----------------------------------------------------------------
    def command(self, cmd: Command) -> dict[str, Any] | None:
        if cmd.cmd == "config_get":
            if self.path is None:
                raise ValueError("this unit runs without a config file")
            return {"file": str(self.path), "text": self.text, "sha256": sha256_text(self.text)}
        if cmd.cmd == "config_push":
            self.pushes.put(cmd)  # applied by run_forever; answered by the unit running then
            return None
        raise ValueError(f"unsupported command {cmd.cmd!r}")

    def next_push(self, timeout: float) -> Command | None:
        try:
            return self.pushes.get(timeout=timeout)
        except queue.Empty:
            return None

    def reloaded(self) -> None:
        """A SIGHUP reload started the file's config: it is the running text now."""
        if self.path is not None:
            try:
                self.text = self._read()
            except OSError as exc:
                log.warning("cannot re-read the reloaded config file", extra={"error": str(exc)})

    def recover(self) -> bool:
        """At start: a push that was in its probation when the unit stopped (a power cut) is undone."""
        if self.path is None or not self._sibling(".pending").exists():
            return False
        good = self._sibling(".last-good")
        log.error("a pushed config had not passed its probation when the unit stopped: starting the "
                  "last-known-good config", extra={"file": str(self.path), "last_good": str(good)})
        if good.exists():  # written before FILE.pending: missing only if removed by hand
            write_synced(self.path, good.read_text(encoding="utf-8"))
        self._sibling(".pending").unlink()
        fsync_dir(self.path.parent)
        self.text = self._read()
        return True

    # -- run_forever's side -----------------------------------------------------------------------
    def apply(self, unit: Unit, cmd: Command, stop: threading.Event) -> Unit:
        """Apply one config_push to the running `unit`; returns the unit running afterwards, which answers."""
        outcome: Outcome = "refused"
        result, error = None, None
        try:
            cfg, text = self._check(unit.cfg, cmd)
            self._stage(cmd)
        except ConfigError as exc:
            error = str(exc)
        except OSError as exc:  # a full disk, a read-only file system: nothing was changed
            error = f"{self.path}: cannot write the pushed config ({exc}); the running config stays, its file intact"
            for suffix in (".incoming", ".pending"):
                self._sibling(suffix).unlink(missing_ok=True)
        else:
            unit, outcome, error = self._switch(unit, cfg, text, stop)
            result = {"sha256": sha256_text(self.text), "config_hash": config_hash(unit.cfg)}
        log.log(logging.INFO if outcome == "applied" else logging.ERROR, "pushed config %s", outcome,
                extra={"id": cmd.id, **({"error": error} if error else {})})
        unit.sync.reply(CommandReply(id=cmd.id, ok=outcome == "applied", outcome=outcome,
                                     result=result, error=error))
        return unit

    def _check(self, running: UnitConfig, cmd: Command) -> tuple[UnitConfig, str]:
        """The pushed config, validated; ConfigError (the text `config validate FILE` prints) if refused."""
        source = str(self.path or "<config>")
        text, digest = cmd.args.get("text"), cmd.args.get("sha256")
        if self.path is None:
            raise ConfigError(source, ["this unit runs without a config file: nothing to replace"])
        if not isinstance(text, str) or not isinstance(digest, str):
            raise ConfigError(source, ["config_push needs args.text (the YAML) and args.sha256 (of its UTF-8 "
                                       "bytes): push with `customs-edge fleet config push`"])
        probation = cmd.args.get("probation_s", PROBATION_S)
        if not isinstance(probation, int | float) or not 0 < probation <= 3600:
            raise ConfigError(source, [f"args.probation_s: {probation!r} is not a number of seconds in (0, 3600]"])
        if sha256_text(text) != digest.lower():
            raise ConfigError(source, [f"sha256 mismatch (got {sha256_text(text)}, expected {digest}): the text "
                                       "was damaged or cut in transit; push it again"])
        incoming = self._sibling(".incoming")
        write_synced(incoming, text)
        try:
            cfg = load_unit_config(incoming)
        except ConfigError as exc:
            incoming.unlink()
            raise ConfigError(source, exc.problems) from exc
        problems = [f"{key}: a pushed config must keep this unit's {what} ({now!r}, not {new!r}); {fix}"
                    for key, what, now, new, fix in (
                        ("device_id", "device id", running.device_id, cfg.device_id, "change it on site"),
                        ("outbox.path", "outbox file", running.outbox.path, cfg.outbox.path,
                         "its unsent records and sequence live there; move it on site"))
                    if now != new]
        if problems:
            incoming.unlink()
            raise ConfigError(source, problems)
        return cfg, text

    def _stage(self, cmd: Command) -> None:
        """Steps 2 to 4: the running text kept as last-known-good, the probation marked, the new file in place."""
        assert self.path is not None
        write_synced(self._sibling(".last-good"), self.text)
        write_synced(self._sibling(".pending"), cmd.id)
        self._sibling(".incoming").replace(self.path)
        fsync_dir(self.path.parent)
        self.probation_s = float(cmd.args.get("probation_s", PROBATION_S))

    def _switch(self, unit: Unit, cfg: UnitConfig, text: str,
                stop: threading.Event) -> tuple[Unit, Outcome, str | None]:
        """Steps 5 and 6: start the new config and prove it, or go back to the old one."""
        assert self.path is not None
        old_cfg, old_text = unit.cfg, self.text
        pending = self._sibling(".pending")
        errors: list[str] = []
        new = replace_unit(unit, cfg, errors=errors)
        if new.cfg is cfg:
            self.text = text
            reason = _probation(new, self.probation_s, stop)
            if reason is None:
                pending.unlink()
                fsync_dir(self.path.parent)
                return new, "applied", None
            errors.append(reason)
            new = replace_unit(new, old_cfg, errors=errors)
        write_synced(self.path, old_text)  # FILE.last-good's content
        self.text = old_text
        pending.unlink()
        fsync_dir(self.path.parent)
        return new, "rolled_back", "the new config failed to start; the previous one runs again: " + "; ".join(errors)


def _probation(unit: Unit, seconds: float, stop: threading.Event) -> str | None:
    """None once every driver delivered a reading; else which did not, and their last fault."""
    deadline = time.monotonic() + seconds
    while True:
        down = unit.drivers_not_up()
        if not down:
            return None
        if time.monotonic() >= deadline or stop.is_set():
            return "; ".join(f"driver {role} not up within {seconds:g} s" + (f" ({err})" if err else "")
                             for role, err in down.items())
        stop.wait(0.1)
