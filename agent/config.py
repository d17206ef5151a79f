"""Unit config: one YAML file per unit, validated in two passes.

Pass 1 checks the frame (device_id, type, outbox, sync, the names of drivers). Pass 2 validates each
driver section with that driver's own Config model and the `app` section with the unit type's app
model, so a third-party driver's keys are checked as strictly as ours; then what each driver produces
is matched, by reading type, against what the app consumes in that role. Every problem is reported with
the file, the dotted path to the bad key, what was expected, and a did-you-mean for misspelt keys.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from customs_edge.agent import registry
from customs_edge.core.errors import ConfigError
from customs_edge.core.readings import Reading
from customs_edge.drivers.base import DriverConfig

Strict = ConfigDict(extra="forbid", allow_inf_nan=False)


class OutboxConfig(BaseModel):
    model_config = Strict
    path: Path = Field(Path("/var/lib/customs-edge/outbox.db"), description="SQLite file on persistent storage")
    synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="FULL survives power loss; see bench/outbox.py for the cost")
    max_mb: float = Field(256, gt=0, description="cap on stored records; oldest lowest-priority dropped first")
    max_age_days: float = Field(30, gt=0, description="records older than this are dropped, alerts excepted")
    commit_interval_ms: int = Field(20, ge=0, le=1000, description="group commit window")
    commit_max_records: int = Field(1000, ge=1)


class SyncConfig(BaseModel):
    model_config = Strict
    host: str = "127.0.0.1"
    port: int = Field(1883, gt=0, lt=65536)
    username: str | None = None
    password: str | None = None
    topic_prefix: str = Field("customs-edge/v1", pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$",
                              description="topic levels of letters, digits, _ . - (no wildcards)")
    ack_mode: Literal["hub", "broker"] = Field(
        "hub", description="hub: delete when the hub confirms it stored the records; broker: on PUBACK")
    batch_max_records: int = Field(500, ge=1, le=10000)
    window_batches: int = Field(8, ge=1, le=64, description="batches in flight awaiting an ack")
    ack_timeout_s: float = Field(10.0, gt=0, description="no PUBACK for this long: link presumed half-open;"
                                 " PUBACK but no hub ack: the batch is published again")
    max_resend_interval_s: float = Field(300.0, gt=0, description="cap on the doubling wait between resends")
    keepalive_s: int = Field(10, ge=2, le=600)
    connect_timeout_s: float = Field(5.0, gt=0)
    backoff_min_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)


class UnitConfig(BaseModel):
    model_config = Strict
    device_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    type: str = Field(description="application: " + ", ".join(registry.BUILTIN_APPS))
    site: str | None = None
    drivers: dict[str, DriverConfig] = Field(default_factory=dict)
    app: BaseModel | dict[str, Any] = Field(default_factory=dict)
    outbox: OutboxConfig = OutboxConfig()
    sync: SyncConfig = SyncConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class _Frame(UnitConfig):
    """Pass 1: driver sections are only required to name a driver; the app section is free-form."""

    drivers: dict[str, _DriverName] = Field(default_factory=dict)  # type: ignore[assignment]
    app: dict[str, Any] = Field(default_factory=dict)


class _DriverName(BaseModel):
    model_config = ConfigDict(extra="allow")
    driver: str


_Frame.model_rebuild()


def load_unit_config(path: str | Path) -> UnitConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [f"not UTF-8 text (byte {exc.start})"]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from exc
    return parse_unit_config(raw, str(path))


def parse_unit_config(raw: Any, source: str = "<config>") -> UnitConfig:
    """Validate everything and report every problem at once, not just the first one found."""
    if not isinstance(raw, dict):
        raise ConfigError(source, ["top level must be a mapping of keys to values"])
    problems: list[str] = []
    frame: _Frame | None = None
    try:
        frame = _Frame.model_validate(raw)
    except ValidationError as exc:
        problems += format_errors(exc, _Frame)

    drivers: dict[str, DriverConfig] = {}
    produces: dict[str, tuple[type[Reading], ...]] = {}
    raw_drivers: dict[str, Any] = raw["drivers"] if isinstance(raw.get("drivers"), dict) else {}
    for role, spec in raw_drivers.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("driver"), str):
            continue  # already reported by pass 1
        try:
            cls = registry.lookup("driver", spec["driver"])
        except registry.UnknownName as exc:
            problems.append(f"drivers.{role}.driver: {exc}")
            continue
        try:
            drivers[role] = cls.Config.model_validate(spec)
            produces[role] = cls.produces(drivers[role]) if hasattr(cls, "produces") else ()
        except ValidationError as exc:
            problems += format_errors(exc, cls.Config, prefix=("drivers", role))

    app_cfg: BaseModel | dict[str, Any] = raw.get("app") or {}
    unit_type = raw.get("type")
    if isinstance(unit_type, str):
        try:
            app_cls = registry.lookup("app", unit_type)
        except registry.UnknownName as exc:
            problems.append(f"type: {exc}")
        else:
            try:
                app_cfg = app_cls.Config.model_validate(app_cfg)
            except ValidationError as exc:
                problems += format_errors(exc, app_cls.Config, prefix=("app",))
            if len(drivers) == len(raw_drivers):
                problems += app_cls.check_drivers(drivers, produces)
    if problems or frame is None:
        raise ConfigError(source, problems)
    return UnitConfig.model_construct(**{**frame.__dict__, "drivers": drivers, "app": app_cfg})


def format_errors(exc: ValidationError, model: type[BaseModel], prefix: tuple[Any, ...] = ()) -> list[str]:
    """One line per error: 'a.b.c: message', with a did-you-mean for unknown keys."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in prefix + loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            known = _fields_at(model, loc[:-1])
            hint = registry.suggest(str(loc[-1]), known) if known else None
            msg = "unknown key" + (f" (did you mean {hint!r}?)" if hint else "")
            if known and not hint:
                msg += f"; expected one of: {', '.join(known)}"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = f"{err['msg']} (got {err.get('input')!r})"
        lines.append(f"{path}: {msg}")
    return lines


def _fields_at(model: Any, loc: tuple[Any, ...]) -> list[str]:
    """Names of the fields accepted at `loc` inside `model`, following dicts, lists and optionals."""
    tp: Any = model
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            if field is None:
                return []
            tp = field.annotation
        elif typing.get_origin(tp) in (dict, list):
            tp = typing.get_args(tp)[-1]
        else:
            return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return []


def _unwrap(tp: Any) -> Any:
    """Optional[X] / X | None -> X, so the walk can continue into X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if models else (args[0] if args else tp)
    return tp


def unit_schema() -> dict[str, Any]:
    """JSON Schema of a unit file, with every registered driver's and app's own section."""
    defs: dict[str, Any] = {}
    schema = UnitConfig.model_json_schema()
    schema.setdefault("$defs", {})
    for name in registry.driver_names():
        try:
            cls = registry.lookup("driver", name)
        except (ImportError, AttributeError):
            continue
        defs[name] = cls.Config.model_json_schema()
    apps: dict[str, Any] = {}
    for name in registry.app_names():
        try:
            apps[name] = registry.lookup("app", name).Config.model_json_schema()
        except (ImportError, AttributeError):
            continue
    schema["properties"]["drivers"] = {
        "type": "object",
        "description": "role name -> driver section; `driver` picks the schema",
        "additionalProperties": {"oneOf": list(defs.values())},
    }
    schema["properties"]["app"] = {"description": "section of the unit's type", "oneOf": list(apps.values())}
    return schema
