"""The App interface. An app turns Readings into RecordIns; it never touches MQTT, SQLite or ports.

The runtime calls, from one thread only:
  feed(reading)      for every Reading any driver yields;
  tick(now)          about every 100 ms (now = time.monotonic()), for interval aggregates and timeouts;
  on_fault(role, e)  when a driver raises DriverFault (the default emits one 'driver_fault' record);
  close()            once at shutdown, to flush partial aggregates.
Each returns the records to commit. `check_drivers` lets an app refuse a config that lacks a driver
it needs, with a message naming the missing role.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from customs_edge.core.errors import DriverFault
from customs_edge.core.records import Priority, Reading, RecordIn
from customs_edge.drivers.base import DriverConfig


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class App:
    Config: ClassVar[type[BaseModel]] = AppConfig
    # role name -> accepted driver names; checked by the config loader
    REQUIRED_DRIVERS: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, device_id: str, config: Any) -> None:
        self.device_id = device_id
        self.config = config

    @classmethod
    def check_drivers(cls, drivers: dict[str, DriverConfig]) -> list[str]:
        problems = []
        for role, accepted in cls.REQUIRED_DRIVERS.items():
            if role not in drivers:
                problems.append(f"this unit type needs a driver named {role!r} ({' or '.join(accepted)})")
            elif accepted and drivers[role].driver not in accepted:
                problems.append(f"{role}: driver {drivers[role].driver!r} does not fit; use {' or '.join(accepted)}")
        return problems

    def feed(self, reading: Reading) -> list[RecordIn]:
        return []

    def tick(self, now: float) -> list[RecordIn]:
        return []

    def on_fault(self, role: str, fault: DriverFault) -> list[RecordIn]:
        return [RecordIn(type="driver_fault", priority=Priority.REPORT,
                         payload={"driver": role, "error": str(fault), "kind": type(fault).__name__})]

    def on_recovered(self, role: str, down_s: float) -> list[RecordIn]:
        return [RecordIn(type="driver_recovered", priority=Priority.REPORT,
                         payload={"driver": role, "down_s": round(down_s, 1)})]

    def close(self) -> list[RecordIn]:
        return []
