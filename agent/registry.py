"""Name -> class lookups for drivers and apps.

Built-ins are listed here as 'module:attr' strings, imported only when used, so a unit pays the import
cost (pymodbus, cv2, onnxruntime) only of what its config names. Third parties add drivers with an
entry point in the group `customs_edge.drivers` (see pyproject.toml); a `pip install` is enough.
"""

from __future__ import annotations

import difflib
import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from customs_edge.core.readings import Reading

DRIVER_GROUP = "customs_edge.drivers"
APP_GROUP = "customs_edge.apps"

BUILTIN_DRIVERS: dict[str, str] = {
    "toledo-continuous": "customs_edge.drivers.toledo:ToledoContinuous",
    "mt-sics": "customs_edge.drivers.mtsics:MtSics",
    "modbus-rtu": "customs_edge.drivers.modbus:ModbusRtu",
    "modbus-tcp": "customs_edge.drivers.modbus:ModbusTcp",
    "elemental-analyser": "customs_edge.drivers.analyser:ElementalAnalyser",
    "n42-portal": "customs_edge.drivers.n42:N42Portal",
    "mlx90640-serial": "customs_edge.drivers.mlx90640:Mlx90640Serial",
    "passage": "customs_edge.drivers.passage:PassageSensor",
    "camera-opencv": "customs_edge.drivers.camera:OpenCvCamera",
    "nmea-gps": "customs_edge.drivers.gps:NmeaGps",
    "barcode-serial": "customs_edge.drivers.scanner:BarcodeSerial",
    "modbus-relay": "customs_edge.drivers.relay:ModbusRelay",
    "thermal-raw": "customs_edge.drivers.thermal_raw:ThermalRaw",
    "modbus-th": "customs_edge.drivers.environment:EnvironmentSensor",
}

BUILTIN_APPS: dict[str, str] = {
    "scale": "customs_edge.agent.apps.scale:ScaleApp",
    "ore-station": "customs_edge.agent.apps.ore:OreStationApp",
    "gate": "customs_edge.agent.apps.gate:GateApp",
    "handheld": "customs_edge.agent.apps.handheld:HandheldApp",
}


class UnknownName(LookupError):
    def __init__(self, what: str, name: str, known: list[str]) -> None:
        self.what, self.name, self.known = what, name, known
        hint = suggest(name, known)
        super().__init__(
            f"unknown {what} {name!r}" + (f" (did you mean {hint!r}?)" if hint else "")
            + f"; known: {', '.join(sorted(known))}"
        )


def suggest(name: str, known: list[str]) -> str | None:
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return match[0] if match else None


def load_object(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _table(builtin: dict[str, str], group: str | None) -> dict[str, str]:
    table = dict(builtin)
    if group:
        for ep in entry_points(group=group):
            table.setdefault(ep.name, ep.value)
    return table


def driver_names() -> list[str]:
    return sorted(_table(BUILTIN_DRIVERS, DRIVER_GROUP))


def app_names() -> list[str]:
    return sorted(_table(BUILTIN_APPS, APP_GROUP))


def drivers_producing(types: tuple[type[Reading], ...]) -> list[str]:
    """Registered drivers that yield one of `types`: the hint in a config error. Importing every driver
    costs a moment, paid only when a config is refused; one that fails to import is left out."""
    from customs_edge.core.readings import fits

    out = []
    for name in driver_names():
        try:
            cls = lookup("driver", name)
        except (ImportError, AttributeError):
            continue
        if fits(getattr(cls, "PRODUCES", ()), types):
            out.append(name)
    return out


def lookup(kind: str, name: str) -> Any:
    tables = {
        "driver": _table(BUILTIN_DRIVERS, DRIVER_GROUP),
        "app": _table(BUILTIN_APPS, APP_GROUP),
    }
    table = tables[kind]
    if name not in table:
        raise UnknownName(kind, name, list(table))
    return load_object(table[name])
