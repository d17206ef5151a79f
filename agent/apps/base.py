"""The App interface. An app turns Readings into RecordIns; it never touches MQTT, SQLite or ports.

The runtime calls, from one thread only:
  feed(reading)      for every Reading any driver yields;
  tick(now)          about every 100 ms (now = time.monotonic()), for interval aggregates and timeouts;
  on_fault(role, e)  when a driver raises DriverFault (the default emits one 'driver_fault' record);
  close()            once at shutdown, to flush partial aggregates;
  command(name, args) for an operator's command on the unit's cmd topic (e.g. the gate's `confirm`).
After each, the runtime takes `take_outputs()`: commands for output roles (a stack light), which it
hands to those roles' drivers.
Each returns the records to commit. `CONSUMES` declares, per driver role, the reading types the app
takes; `check_drivers` refuses a config whose drivers do not produce them (by type, not by driver name),
with a message naming the role, the driver, what it produces and what the app needs.

State that survives a restart, a reload and a power cut: after producing records the runtime calls
`snapshot()` and commits the blob in the same transaction as those records; a new process calls
`restore(blob)` before the first input. The blob is versioned JSON (`pack_state`/`unpack_state`): a
blob of another app or another STATE_VERSION raises StateMismatch, which the runtime logs and counts
while the app starts fresh. Apps without state keep the defaults (None / nothing to restore).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from customs_edge.agent.registry import drivers_producing
from customs_edge.core.errors import DriverFault
from customs_edge.core.logs import redact
from customs_edge.core.outputs import SetOutputs
from customs_edge.core.readings import Reading, fits, type_names
from customs_edge.core.records import Priority, RecordIn
from customs_edge.drivers.base import DriverConfig


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Role:
    """What an app takes from the driver in one role: readings of any of `types` (or a subclass);
    a driver that produces none of them does not fit. An optional role may be left out of the config."""

    __slots__ = ("optional", "types")

    def __init__(self, *types: type[Reading], optional: bool = False) -> None:
        if not types:
            raise ValueError("a role consumes at least one reading type")
        self.types, self.optional = types, optional


class StateMismatch(ValueError):
    """A state blob this app cannot resume from (another app, another version, not a state blob)."""


class App:
    Config: ClassVar[type[BaseModel]] = AppConfig
    # role name -> the reading types the app takes from that role's driver; checked by the config loader
    CONSUMES: ClassVar[dict[str, Role]] = {}
    STATE_VERSION: ClassVar[int] = 1  # bump when snapshot()'s content changes meaning: older blobs are ignored

    def __init__(self, device_id: str, config: Any) -> None:
        self.device_id = device_id
        self.config = config

    @classmethod
    def check_drivers(cls, drivers: Mapping[str, DriverConfig],
                      produces: Mapping[str, tuple[type[Reading], ...]]) -> list[str]:
        """Problems, one line each ('drivers.<role>: ...'), of the configured drivers (role -> config;
        `produces`: role -> the reading types that driver yields with that config) against CONSUMES."""
        problems = []
        for role, want in cls.CONSUMES.items():
            if role not in drivers:
                if not want.optional:
                    problems.append(f"drivers.{role}: this unit type needs a driver named {role!r} producing "
                                    f"{type_names(want.types, ' or ')}{_fitting(drivers_producing(want.types))}")
                continue
            got = produces.get(role, ())
            if not fits(got, want.types):
                problems.append(f"drivers.{role}: driver {drivers[role].driver!r} as configured produces "
                                f"{type_names(got)}; this unit type needs {type_names(want.types, ' or ')} here"
                                f"{_fitting(drivers_producing(want.types))}")
        return problems

    def feed(self, reading: Reading) -> list[RecordIn]:
        return []

    def tick(self, now: float) -> list[RecordIn]:
        return []

    def on_fault(self, role: str, fault: DriverFault) -> list[RecordIn]:
        return [RecordIn(type="driver_fault", priority=Priority.REPORT,
                         payload={"driver": role, "error": redact(str(fault)), "kind": type(fault).__name__})]

    def on_recovered(self, role: str, down_s: float) -> list[RecordIn]:
        return [RecordIn(type="driver_recovered", priority=Priority.REPORT,
                         payload={"driver": role, "down_s": round(down_s, 1)})]

    def close(self) -> list[RecordIn]:
        return []

    def take_outputs(self) -> list[tuple[str, SetOutputs]]:
        """(role, command) for output drivers, produced since the last call: the runtime hands each to
        that role's driver (core/outputs.py), whose result comes back through feed() or on_fault()."""
        return []

    def command(self, name: str, args: dict[str, Any]) -> tuple[dict[str, Any], list[RecordIn]]:
        """An operator's command from the unit's cmd topic: (the reply's result, records to commit).
        ValueError (the reply's error) for a command or arguments this app does not take."""
        raise ValueError(f"unsupported command {name!r} for a {type(self).__name__}")

    def sidelines(self, outbox_path: str, topic_prefix: str) -> list[Any]:
        """Traffic this app needs beside its records (agent/sync.py Sideline): the handheld's evidence photos
        and risk lists. Called once per unit with the outbox's path (files of the app live beside it); an
        app kept across a reload returns the same objects."""
        return []

    # --- state that survives restarts -----------------------------------------------------------
    def snapshot(self) -> bytes | None:
        """The state to resume from after a restart, or None (nothing worth keeping)."""
        return None

    def restore(self, blob: bytes) -> None:
        """Resume from a snapshot() blob; raise StateMismatch (changing nothing) if it does not fit."""

    def pack_state(self, state: dict[str, Any]) -> bytes:
        """A snapshot blob: `state` (finite numbers only) tagged with the app's class and STATE_VERSION."""
        return json.dumps({"app": type(self).__name__, "version": self.STATE_VERSION, "state": state},
                          separators=(",", ":"), allow_nan=False).encode()

    def unpack_state(self, blob: bytes) -> dict[str, Any]:
        """The state dict of a pack_state() blob of this app and version; StateMismatch otherwise."""
        want = f"{type(self).__name__} version {self.STATE_VERSION}"
        try:
            doc = json.loads(blob)
        except ValueError as exc:
            raise StateMismatch(f"not a state blob ({exc}); expected {want}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("state"), dict):
            raise StateMismatch(f"not a state blob; expected {want}")
        got = f"{doc.get('app')} version {doc.get('version')}"
        if got != want:
            raise StateMismatch(f"state of {got}; this app is {want}")
        state: dict[str, Any] = doc["state"]
        return state

def _fitting(names: list[str]) -> str:
    return f" (drivers that do: {', '.join(names)})" if names else ""
