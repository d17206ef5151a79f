"""Unit config: one YAML file per unit, validated in two passes.

Pass 1 checks the frame (device_id, type, outbox, sync, the names of drivers). Pass 2 validates each
driver section with that driver's own Config model and the `app` section with the unit type's app
model, so a third-party driver's keys are checked as strictly as ours; then what each driver produces
is matched, by reading type, against what the app consumes in that role. Every problem is reported with
the file, the dotted path to the bad key, what was expected, and a did-you-mean for misspelt keys.
"""

from __future__ import annotations

import json
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import models_json_schema

from customs_edge.agent import registry
from customs_edge.core.errors import ConfigError
from customs_edge.core.logs import redact
from customs_edge.core.mqtt import BrokerSettings
from customs_edge.core.readings import Reading
from customs_edge.drivers.base import DriverConfig, SerialPortConfig

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


class SyncConfig(BrokerSettings):  # username, password (secret), tls_ca, tls_cert, tls_key, tls_server_name
    model_config = Strict
    host: str = "127.0.0.1"
    port: int = Field(1883, gt=0, lt=65536, description="1883 plaintext (loopback only), 8883 TLS")
    topic_prefix: str = Field("customs-edge/v1", pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$",
                              description="topic levels of letters, digits, _ . - (no wildcards)")
    ack_mode: Literal["hub", "broker"] = Field(
        "hub", description="hub: delete when the hub confirms it stored the records; broker: on PUBACK")
    batch_max_records: int = Field(500, ge=1, le=10000)
    window_batches: int = Field(8, ge=1, le=64, description="batches in flight awaiting an ack")
    alert_lane: bool = Field(True, description="ALERT records in batches of their own on {prefix}/{device}/alerts, read"
                             " by the hub ahead of a backlog; false: everything on /records (ack_mode broker: always)")
    ack_timeout_s: float = Field(10.0, gt=0, description="no PUBACK for this long: link presumed half-open;"
                                 " PUBACK but no hub ack: the batch is published again")
    max_resend_interval_s: float = Field(300.0, gt=0, description="cap on the doubling wait between resends")
    hub_liveness: bool = Field(True, description="subscribe to the hubs' liveness ({prefix}/fleet/hub-alive): a batch"
                               " the hub has not acked waits (up to max_resend_interval_s) while a hub worker says it"
                               " keeps storing; false: none received (the bytes of a worker's message every few s)")
    keepalive_s: int = Field(10, ge=2, le=600)
    connect_timeout_s: float = Field(5.0, gt=0)
    backoff_min_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    commands_per_s: float = Field(1.0, gt=0, description="commands a unit runs per second, on average; more are"
                                  " refused (and answered so), counted")
    commands_burst: int = Field(10, ge=1, description="commands a unit runs in a burst before commands_per_s applies")


class ModelUpdatesConfig(BaseModel):
    model_config = Strict
    dir: Path | None = Field(None, description="where pushed model versions are kept (agent/model_update.py); "
                             "default: beside the outbox, {outbox.path}.models")
    signing_key: Path | None = Field(None, description="the operators' model-signing public key (ed25519:BASE64, "
                                     "as `customs-edge fleet model keygen` prints it): set, a pushed model must "
                                     "carry a valid signature")
    max_mb: float = Field(64, gt=0, le=4096, description="a pushed model's files at most (MB)")


class UnitConfig(BaseModel):
    model_config = Strict
    device_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    type: str = Field(description="application: " + ", ".join(registry.BUILTIN_APPS))
    site: str | None = None
    drivers: dict[str, DriverConfig] = Field(default_factory=dict)
    app: BaseModel | dict[str, Any] = Field(default_factory=dict)
    outbox: OutboxConfig = OutboxConfig()
    sync: SyncConfig = SyncConfig()
    models: ModelUpdatesConfig = ModelUpdatesConfig()
    health_interval_s: float = Field(60.0, gt=0, description="a health message to the hub this often, and when a"
                                     " driver goes up or down: CPU, memory, disk, backlog, drivers, versions")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class _Frame(UnitConfig):
    """Pass 1: driver sections are only required to name a driver; the app section is free-form."""

    drivers: dict[str, _DriverName] = Field(default_factory=dict)  # type: ignore[assignment]
    app: dict[str, Any] = Field(default_factory=dict)


class _DriverName(BaseModel):
    model_config = ConfigDict(extra="allow")
    driver: str


_Frame.model_rebuild()


# Bounds on what a unit file may cost to load: a unit file is a few kB and a handful of levels deep.
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_EXPANDED = 4 * MAX_FILE_BYTES  # nodes + scalar characters, every alias counted as what it stands for
ECHO_CHARS = 80  # a value or key quoted in a message is cut to this
LINE_CHARS = 400  # and so is each problem line, whatever it quotes


class _Refused(yaml.YAMLError):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses, while it composes, nesting deeper than MAX_DEPTH, a document whose aliases
    expand it past MAX_EXPANDED, and an alias inside the node it names. An alias costs what it stands for,
    so a 500-byte alias bomb is refused after a few dozen nodes instead of expanding in whatever walks it."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._cost: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, expanded depth)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        mark = self.peek_event().start_mark
        where = f"(line {mark.line + 1}, column {mark.column + 1})"
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._cost:
                raise _Refused(f"an alias refers to itself, from inside the node it names {where}")
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels {where}")
        node = super().compose_node(parent, index)
        self._depth -= 1
        if isinstance(node, yaml.SequenceNode | yaml.MappingNode):
            kids = [self._cost[id(k)] for k in
                    (node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv])]
            cost = (1 + sum(c[0] for c in kids), 1 + max((c[1] for c in kids), default=0))
        else:
            cost = (1 + len(getattr(node, "value", "")), 1)
        if cost[0] > MAX_EXPANDED:
            raise _Refused(f"anchors and aliases (&x, *x) expand it past {MAX_EXPANDED:,} nodes and characters "
                           f"{where}: write the values out")
        if cost[1] > MAX_DEPTH:
            raise _Refused(f"aliases nest it deeper than {MAX_DEPTH} levels {where}")
        self._cost[id(node)] = cost
        return node


Positions = dict[str, tuple[yaml.Node, yaml.Node]]  # "a.b.0.c" -> (key node, value node) as written


def load_unit_config(path: str | Path, warnings: list[str] | None = None) -> UnitConfig:
    """The unit file at `path`, validated; problems name the line they are on. Warnings (a role the app
    does not use, a setting the port ignores) are appended to `warnings` when it is given."""
    raw, positions = read_yaml_marked(Path(path))
    return parse_unit_config(raw, str(path), warnings=warnings, positions=positions)


def read_yaml(path: Path) -> Any:
    return read_yaml_marked(path)[0]


def read_yaml_marked(path: Path) -> tuple[Any, Positions]:
    """The one YAML document in `path`, and where each key of it was written. Any failure to load is a
    ConfigError naming the file: never a traceback (a reload must not stop the running unit), never
    unbounded time or memory."""
    source = str(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror or exc}"]) from exc
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(source, [f"larger than {MAX_FILE_BYTES // 1024} KiB: a unit file is a few kB; "
                                   "is this the right file?"])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [f"not UTF-8 text (byte {exc.start})"]) from exc
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text)
        node = loader.get_single_node()
        raw = None if node is None else loader.construct_document(node)
    except _Refused as exc:
        raise ConfigError(source, [f"refused: {exc}"]) from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        what = ", ".join(filter(None, (exc.context, exc.problem)))
        raise ConfigError(source, [_clip(f"not valid YAML: {what}{where}")]) from exc
    except Exception as exc:  # a ReaderError, a constructor's ValueError (2024-13-45, an int of 5,000 digits)
        what = "not valid YAML" if isinstance(exc, yaml.YAMLError) else f"cannot be loaded: {type(exc).__name__}"
        raise ConfigError(source, [_clip(f"{what}: {exc}")]) from exc
    finally:
        if loader is not None:
            loader.dispose()
    if raw is None or node is None:
        raise ConfigError(source, ["empty: a unit file needs at least device_id, type and drivers"])
    return raw, _positions(node)


def _positions(root: yaml.Node) -> Positions:
    """Dotted key path -> the key and value nodes, for every key of the document (an aliased node is
    walked once: its first place is its position)."""
    out: Positions = {}
    seen: set[int] = set()
    todo: list[tuple[str, yaml.Node]] = [("", root)]
    while todo:
        path, node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        pairs: list[tuple[str, yaml.Node, yaml.Node]] = []
        if isinstance(node, yaml.MappingNode):
            pairs = [(str(k.value), k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)]
        elif isinstance(node, yaml.SequenceNode):
            pairs = [(str(i), v, v) for i, v in enumerate(node.value)]
        for key, knode, vnode in pairs:
            sub = f"{path}.{key}" if path else key
            out.setdefault(sub, (knode, vnode))
            todo.append((sub, vnode))
    return out


def _at_line(problem: str, positions: Positions | None) -> str:
    """`problem` ('a.b.c: why') with the line of the deepest key of its path that the file has."""
    if not positions:
        return problem
    parts = problem.split(": ", 1)[0].split(".")
    for n in range(len(parts), 0, -1):
        if (hit := positions.get(".".join(parts[:n]))) is not None:
            return f"{problem} (line {hit[0].start_mark.line + 1})"
    return problem


# The patterns of our string fields in words, for the messages (a regular expression is no help on site)
PATTERN_WORDS = {
    r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$": "1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit",
    r"^[a-z][a-z0-9_]*$": "lower-case letters, digits and '_', starting with a letter",
    r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$": "topic levels of letters, digits, '_', '.' or '-' joined by '/' "
                                            "(no wildcards, no empty level)",
}

# What YAML 1.1 makes of an unquoted scalar, for a schema that wanted a string
_YAML11 = {bool: "the boolean", int: "the number", float: "the number"}


def _yaml11(path: str, value: Any, positions: Positions | None) -> str | None:
    """'YAML read 0755 as the number 493: write it quoted' when a plain scalar became a bool or number."""
    hit = positions.get(path) if positions else None
    if hit is None or not isinstance(hit[1], yaml.ScalarNode) or hit[1].style is not None:
        return None
    kind = _YAML11.get(type(value))
    if kind is None:
        return None
    text, key = hit[1].value, path.rsplit(".", 1)[-1]
    shown = str(value).lower() if isinstance(value, bool) else echo(value)
    return (f"YAML 1.1 reads {text} as {kind} {shown}, not text: write it quoted, "
            f"{key}: {json.dumps(text)}")


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = ECHO_CHARS + 10


def echo(value: Any) -> str:
    """A value as a message may quote it: its repr, cut to ECHO_CHARS (a 1 MiB value, or a deep one, costs
    no more to quote than a short one)."""
    try:
        text = repr(value[: ECHO_CHARS + 1]) if isinstance(value, str) else _REPR.repr(_masked(value))
    except ValueError:  # an int too long for str()
        text = f"<{type(value).__name__}>"
    return _clip(text, ECHO_CHARS)


def _secret(key: Any) -> bool:
    return any(word in str(key).lower() for word in ("password", "secret", "token"))


def _masked(value: Any, depth: int = 0) -> Any:
    """`value` with the value of every secret-named key (password, ...) replaced, as deep as echo shows."""
    if isinstance(value, dict) and depth < _REPR.maxlevel:
        return {k: "***" if _secret(k) else _masked(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list) and depth < _REPR.maxlevel:
        return [_masked(v, depth + 1) for v in value]
    return value


def _clip(text: str, limit: int = LINE_CHARS) -> str:
    """`text` cut to `limit`, with any URL's user:password@ redacted (every problem line passes here)."""
    text = redact(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _unknown(exc: registry.UnknownName) -> str:
    return str(exc).replace(repr(exc.name), echo(exc.name), 1)


def parse_unit_config(raw: Any, source: str = "<config>", *, warnings: list[str] | None = None,
                      positions: Positions | None = None) -> UnitConfig:
    """Validate everything and report every problem at once, not just the first one found."""
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"top level must be a mapping of keys to values (got {echo(raw)})"])
    problems: list[str] = []
    notes: list[str] = []
    frame: _Frame | None = None
    try:
        frame = _Frame.model_validate(raw)
    except ValidationError as exc:
        problems += format_errors(exc, _Frame, positions=positions)

    drivers: dict[str, DriverConfig] = {}
    produces: dict[str, tuple[type[Reading], ...]] = {}
    raw_drivers: dict[str, Any] = raw["drivers"] if isinstance(raw.get("drivers"), dict) else {}
    for role, spec in raw_drivers.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("driver"), str):
            continue  # already reported by pass 1
        try:
            cls = registry.lookup("driver", spec["driver"])
        except registry.UnknownName as exc:
            problems.append(f"drivers.{role}.driver: {_unknown(exc)}")
            continue
        try:
            drivers[role] = cls.Config.model_validate(spec)
            produces[role] = cls.produces(drivers[role]) if hasattr(cls, "produces") else ()
        except ValidationError as exc:
            problems += format_errors(exc, cls.Config, prefix=("drivers", role), positions=positions)
        else:
            _check_port(role, drivers[role], spec, problems, notes)

    app_cfg: BaseModel | dict[str, Any] = raw.get("app") or {}
    unit_type = raw.get("type")
    if isinstance(unit_type, str):
        try:
            app_cls = registry.lookup("app", unit_type)
        except registry.UnknownName as exc:
            problems.append(f"type: {_unknown(exc)}")
        else:
            try:
                app_cfg = app_cls.Config.model_validate(app_cfg)
            except ValidationError as exc:
                problems += format_errors(exc, app_cls.Config, prefix=("app",), positions=positions)
            if len(drivers) == len(raw_drivers):
                problems += app_cls.check_drivers(drivers, produces)
                if isinstance(app_cfg, BaseModel):
                    problems += _check_points(app_cfg, drivers)
            if isinstance(app_cfg, BaseModel):
                problems += _check_manifests(app_cfg)
                notes += [f"drivers.{role}: a {unit_type} unit reads no driver named {role!r} (it reads "
                          f"{', '.join(app_cls.CONSUMES)}): a misspelt role, or an instrument left over?"
                          for role in drivers if app_cls.CONSUMES and role not in app_cls.CONSUMES]
    if warnings is not None:
        warnings += [_at_line(_clip(n), positions) for n in notes]
    if problems or frame is None:
        raise ConfigError(source, [_at_line(_clip(p), positions) for p in problems])
    return UnitConfig.model_construct(**{**frame.__dict__, "drivers": drivers, "app": app_cfg})


_LINE_KEYS = ("baudrate", "bytesize", "parity", "stopbits")  # what a socket:// port cannot set
_TCP_ADDRESS = re.compile(r"^(?:tcp://)?((?:[A-Za-z0-9-]+\.)*[A-Za-z0-9-]+|\[[0-9A-Fa-f:]+\]):(\d{1,5})$")


def _check_port(role: str, cfg: DriverConfig, spec: dict[str, Any], problems: list[str], notes: list[str]) -> None:
    """A serial driver's `port` against the settings it was given: a TCP address needs socket://, and
    line settings on a socket:// port are ignored (the device server at the far end sets the line)."""
    if not isinstance(cfg, SerialPortConfig):
        return
    if m := _TCP_ADDRESS.match(cfg.port):
        problems.append(f"drivers.{role}.port: {echo(cfg.port)} is neither a device path nor a URL: "
                        f"a TCP address is written 'socket://{m[1]}:{m[2]}'")
    elif cfg.port.startswith("socket://"):
        notes += [f"drivers.{role}.{k}: has no effect on a socket:// port (set the line on the device "
                  "server); remove it" for k in _LINE_KEYS if k in spec]


def _check_points(app_cfg: BaseModel, drivers: dict[str, DriverConfig]) -> list[str]:
    """An app's `points` (names of the points it reads, e.g. the ore station's totaliser) against the
    points its drivers define: a point nobody defines is a value the app never sees, silently."""
    points = getattr(app_cfg, "points", None)
    if not isinstance(points, BaseModel):
        return []
    roles: dict[str, str] = getattr(points, "ROLES", {})
    defined = {role: _point_names(cfg) for role, cfg in drivers.items()}
    everywhere = sorted({n for names in defined.values() for n in names})
    problems = []
    for field, name in points.model_dump().items():
        role = roles.get(field)
        if not isinstance(name, str) or name in everywhere or (role is not None and role not in drivers):
            continue  # defined, or read from an optional role this unit does not have
        hint = registry.suggest(name, everywhere)
        where = f"drivers.{role}" if role in drivers else "the drivers"
        problems.append(f"app.points.{field}: no driver defines a point named {echo(name)}"
                        + (f" (did you mean {hint!r}?)" if hint else "")
                        + f": rename the point in {where} or set app.points.{field}; {where} define: "
                        + (", ".join(sorted(defined[role])) if role in drivers else ", ".join(everywhere) or "none"))
    return problems


def _check_manifests(app_cfg: BaseModel) -> list[str]:
    """Every app key naming a model manifest (a path whose description says so) names a readable file:
    otherwise the unit validates, then fails to start when the app loads its model."""
    problems = []
    for field, info in type(app_cfg).model_fields.items():
        path = getattr(app_cfg, field)
        if not isinstance(path, Path) or "manifest" not in (info.description or ""):
            continue
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            problems.append(f"app.{field}: model manifest {echo(str(path))} cannot be read "
                            f"({exc.strerror}): write the path of an installed manifest.json, or remove "
                            "the key to use the shipped model")
    return problems


def _point_names(cfg: BaseModel) -> set[str]:
    """Names of the points a driver config defines: every `points: [{name: ...}]` list inside it."""
    out: set[str] = set()
    todo: list[Any] = [cfg]
    while todo:
        model = todo.pop()
        for field in type(model).model_fields:
            value = getattr(model, field)
            for item in value if isinstance(value, list | tuple) else [value]:
                if not isinstance(item, BaseModel):
                    continue
                name = getattr(item, "name", None)
                if field == "points" and isinstance(name, str):
                    out.add(name)
                else:
                    todo.append(item)
    return out


def duplicate_units(units: dict[str, UnitConfig]) -> list[str]:
    """Across several unit files (source -> config): a device_id or an outbox file used twice. Two units
    with one device_id take each other's MQTT session and interleave one (device_id, seq) series; two
    agents on one outbox would share it."""
    problems = []
    seen: dict[tuple[str, str], str] = {}
    for source, cfg in units.items():
        for key, value in (("device_id", cfg.device_id), ("outbox.path", str(cfg.outbox.path.resolve()))):
            other = seen.setdefault((key, value), source)
            if other != source:
                problems.append(f"{source}: {key}: {echo(value)} is also the {key} of {other}: "
                                "every unit needs its own")
    return problems


def format_errors(exc: ValidationError, model: type[BaseModel], prefix: tuple[Any, ...] = (),
                  positions: Positions | None = None) -> list[str]:
    """One line per error: 'a.b.c: message', with a did-you-mean for unknown keys."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path = ".".join(_clip(str(p), ECHO_CHARS) for p in prefix + loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            known = _fields_at(model, loc[:-1])
            hint = registry.suggest(str(loc[-1]), known) if known else None
            msg = "unknown key" + (f" (did you mean {hint!r}?)" if hint else "")
            if known and not hint:
                msg += f"; expected one of: {', '.join(known)}"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif any(_secret(p) for p in loc):  # never echo a password, even a mistyped one
            msg = f"{err['msg']} (value not shown: secret)"
        elif err["type"] in ("string_type", "literal_error", "enum") and (
                quoted := _yaml11(path, err.get("input"), positions)):  # `checksum: on` is True, not 'on'
            msg = quoted if err["type"] == "string_type" else f"{err['msg']}; {quoted}"
        elif err["type"] == "string_pattern_mismatch" and (words := PATTERN_WORDS.get(err["ctx"]["pattern"])):
            msg = f"must be {words} (got {echo(err.get('input'))})"
        else:
            msg = f"{err['msg']} (got {echo(err.get('input'))})"
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
    """JSON Schema (2020-12) of a unit file, self-contained: every sub-schema is in the root's $defs, a
    driver section is checked against the schema its `driver` names, and `app` against the unit's `type`."""
    drivers, apps = _configs("driver", registry.driver_names()), _configs("app", registry.app_names())
    models: list[type[BaseModel]] = [UnitConfig, *drivers.values(), *apps.values()]
    refs, top = models_json_schema([(m, "validation") for m in models], ref_template="#/$defs/{model}")
    defs = top["$defs"]

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        return refs[(model, "validation")]

    def pick(key: str, name: str, then: dict[str, Any]) -> dict[str, Any]:
        return {"if": {"properties": {key: {"const": name}}, "required": [key]}, "then": then}

    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              **defs.pop(ref(UnitConfig)["$ref"].rsplit("/", 1)[1])}
    props = schema["properties"]
    props["type"]["enum"] = list(apps)
    props["drivers"] = {
        "type": "object", "description": "role name -> driver section; `driver` picks the schema",
        "additionalProperties": {"type": "object", "required": ["driver"],
                                 "properties": {"driver": {"enum": list(drivers)}},
                                 "allOf": [pick("driver", n, ref(m)) for n, m in drivers.items()]}}
    props["app"] = {"type": "object", "description": "the section of the unit's `type`"}
    schema["allOf"] = [pick("type", n, {"properties": {"app": ref(m)}}) for n, m in apps.items()]
    schema["$defs"] = _reachable(schema, defs)
    return schema


def _configs(kind: str, names: list[str]) -> dict[str, type[BaseModel]]:
    """name -> Config model of every registered driver or app that can be imported."""
    out = {}
    for name in names:
        try:
            out[name] = registry.lookup(kind, name).Config
        except (ImportError, AttributeError):
            continue
    return out


def _reachable(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """The $defs that `schema` refers to, directly or through other $defs."""
    keep: dict[str, Any] = {}
    todo: list[Any] = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            name = str(node.get("$ref", "")).removeprefix("#/$defs/")
            if name in defs and name not in keep:
                keep[name] = defs[name]
                todo.append(defs[name])
            todo += [v for k, v in node.items() if k != "$defs"]
        elif isinstance(node, list):
            todo += node
    return keep
