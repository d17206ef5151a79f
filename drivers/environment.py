"""RS-485 Modbus RTU temperature / humidity transmitter (`modbus-th`): the air at the screening point.

The common SHT20-class transmitters (XY-MD02 and its clones) answer function 04 (read input registers):
input register 1 = temperature, int16 °C x 10; input register 2 = relative humidity, uint16 % x 10. They
ship at 9600 baud, address 1; parity differs by variant (8N1 on most XY-MD02, even parity on some: set
`parity`). Sources followed: the XY-MD02 register map as read in t-teja/Sensors `SHT20/XY-MD02-Modbus.py`
(minimalmodbus `read_register(1, 1, functioncode=4)` and `(2, 1, functioncode=4)`) and the notes on MD02 /
XY-MD02 variants in Nordmanngrowtechnology/Modbus-RTU_SHT-20-MD02-Test (README: both default to 9600;
baud-rate and address registers differ). Another map (some modules put the values at 0 and 1, or in
holding registers) is configured with `table`, `temperature_register`, `humidity_register`.

Polling, retries, CRC, timeouts and the dead-line DriverFault are drivers/modbus.py's (ModbusRtu). A poll
yields an `Ambient` reading; a value outside the sensor's range (-40...125 °C, 0...100 %) is flagged by
the register map, counted (`out_of_range`) and not delivered; a failed poll is counted (`slave_errors`)
and, after `fail_after` in a row, is a DriverFault the runtime reports.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from customs_edge.core.readings import Ambient, Registers, SlaveError
from customs_edge.drivers.modbus import ModbusRtu, ModbusRtuConfig, SlaveConfig

TEMPERATURE_RANGE = (-40.0, 125.0)  # the SHT20's
HUMIDITY_RANGE = (0.0, 100.0)


class EnvironmentConfig(ModbusRtuConfig):
    driver: Literal["modbus-th"] = "modbus-th"  # type: ignore[assignment]
    parity: Literal["N", "E", "O", "M", "S"] = "N"  # XY-MD02: 9600 8N1 as shipped (some variants: E)
    slave_id: int = Field(1, ge=1, le=247, description="the transmitter's address on the RS-485 line")
    poll_interval_s: float = Field(10.0, gt=0, le=3600, description="air changes slowly: one poll per interval")
    table: Literal["input", "holding"] = Field("input", description="XY-MD02: input registers (function 04)")
    temperature_register: int = Field(1, ge=0, le=65535, description="0-based address of temperature x 10")
    humidity_register: int | None = Field(2, ge=0, le=65535, description="RH x 10; null: no humidity channel")
    scale: float = Field(0.1, gt=0, description="value per count (XY-MD02: 0.1)")
    slaves: list[SlaveConfig] = Field(default_factory=list, description="built from the keys above: do not set")

    @model_validator(mode="before")
    @classmethod
    def _slave(cls, data: Any) -> Any:
        """One slave whose points are the transmitter's two registers (ModbusRtu polls them)."""
        if not isinstance(data, dict):
            return data
        if "slaves" in data:
            raise ValueError("modbus-th takes `slave_id` and the register addresses, not `slaves`")
        table = data.get("table", "input")
        scale = data.get("scale", 0.1)
        points = [{"name": "temperature", "table": table, "address": data.get("temperature_register", 1),
                   "type": "int16", "scale": scale, "range": list(TEMPERATURE_RANGE), "unit": "°C"}]
        hum = data.get("humidity_register", 2)
        if hum is not None:
            points.append({"name": "humidity", "table": table, "address": hum, "type": "uint16", "scale": scale,
                           "range": list(HUMIDITY_RANGE), "unit": "%"})
        slave = {"name": "environment", "id": data.get("slave_id", 1), "points": points,
                 "poll_interval_s": data.get("poll_interval_s", 10.0)}
        return {**data, "slaves": [slave]}


class EnvironmentSensor(ModbusRtu):
    """Yields Ambient (temperature_c, humidity_pct) per successful poll."""

    Config = EnvironmentConfig
    PRODUCES = (Ambient,)  # type: ignore[assignment]
    config: EnvironmentConfig

    def read(self) -> Ambient | None:  # type: ignore[override]
        r: Registers | SlaveError | None = super().read()
        if not isinstance(r, Registers):
            return None  # a failed poll: counted in slave_errors; fail_after in a row raise DriverFault
        t = r.number("temperature")
        if t is None:
            return None  # flagged (out of range): counted in out_of_range
        h = r.number("humidity") if self.config.humidity_register is not None else None
        return Ambient(source=self.role, temperature_c=t, humidity_pct=h, ts=r.ts, mono=r.mono)
