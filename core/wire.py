"""Topics and message formats between agents and hubs (MQTT 3.1.1, JSON payloads).

  {prefix}/{device_id}/records     agent -> hub, QoS 1: a Batch of records
  {prefix}/{device_id}/alerts      agent -> hub, QoS 1: a Batch of ALERT records only (the hub's alert lane)
  {prefix}/{device_id}/ack         hub -> agent, QoS 0: an Ack, published after the hub's commit (a lost one
                                   costs a resend, acked again as a duplicate)
  {prefix}/{device_id}/status      agent, retained: a Status; the will publishes state "offline"
  {prefix}/{device_id}/cmd         operator -> agent, QoS 1: a Command
  {prefix}/{device_id}/cmd/reply   agent -> operator, QoS 1: a CommandReply
  {prefix}/{device_id}/alert       hub -> operator, QoS 1, retained: an Alert (the device's seqs conflict)
  {prefix}/{device_id}/health      agent -> hub, QoS 1, retained: a Health (every health_interval_s
                                   and when a driver goes up or down)
  {prefix}/fleet/hub-alive         hub -> agents, QoS 0, retained: a HubAlive (each hub worker, every
                                   alive_interval_s while it stores: hub/liveness.py)
The hub subscribes to `$share/{group}/{prefix}/+/records`, so several hubs share one fleet.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from customs_edge.core.jsonfast import dumps
from customs_edge.core.records import Pending
from customs_edge.core.signing import DeviceKey, batch_message, record_hash

WIRE_VERSION = 1


ALERT_LANE = "alerts"  # topic kind of batches holding only ALERT records: a hub session of its own (hub/service.py)


def topic(prefix: str, device_id: str, kind: str) -> str:
    return f"{prefix}/{device_id}/{kind}"


SEQ_MAX = 2**63 - 1  # SQLite INTEGER

Seq = Annotated[int, Field(ge=1, le=SEQ_MAX)]

MAX_PAYLOAD_BYTES = 65536  # a record's payload as JSON; the largest we make (a 64-px thumbnail) is ~12 kB

# Message sizes. The broker refuses (disconnects) any MQTT packet over MAX_MESSAGE_BYTES: mosquitto's
# `max_packet_size` in configs/broker/customs-edge.conf, the embedded broker's `max_packet_bytes`. It is set by
# the largest legitimate message, an evidence photo sent whole (hub/photos.py MAX_PHOTO_BYTES, 16 MiB, plus its
# header line of at most 1 KiB and the topic; a handheld's photos are 100 kB-2 MB). The others, well below:
# - a records batch: the agent splits any batch whose encoding exceeds MAX_BATCH_BYTES (a default batch of
#   500 records of ~400 B is ~200 kB; 1 MiB also holds 15 records at the 64 KiB payload cap), which also
#   bounds what the hub holds per message;
# - a config push: the YAML of a unit file, at most 1 MiB (agent/config.py MAX_FILE_BYTES), JSON-escaped;
# - a risk list (gzip JSON Lines, retained): must fit too; a larger one is split (agent/risklist.py);
# - health (MAX_HEALTH_BYTES), status, acks, replies, pings: a few kB.
MAX_BATCH_BYTES = 1 << 20
MAX_MESSAGE_BYTES = (16 << 20) + (64 << 10)
# Checked on the raw bytes before parsing by whoever receives them (core/inbound.py); a records message is
# refused by the hub only over MAX_MESSAGE_BYTES (older agents did not split at MAX_BATCH_BYTES).
MAX_ACK_BYTES = 1024 * 1024  # an ack names ranges of one batch: at most one per record
# a command: the largest is a model_offer (agent/model_update.py: a manifest of up to 1 MiB and up to 65,536
# chunk hashes, ~5.4 MB); a model_chunk is ~350 kB, a config_push at most ~1 MiB
MAX_COMMAND_BYTES = 6 * 1024 * 1024
MAX_STATUS_BYTES = 64 * 1024  # a retained status (~2 kB)
MAX_REPLY_BYTES = 1024 * 1024  # a command's reply (config_get carries a unit config; status ~2 kB)


def _no_nul(text: str) -> str:
    """PostgreSQL's text holds no NUL character (SQLite's does): a stored text field never has one."""
    if "\x00" in text:
        raise ValueError("holds a NUL character (U+0000), which no stored text field may (PostgreSQL's text cannot)")
    return text


Text = Annotated[str, AfterValidator(_no_nul)]


class WireRecord(BaseModel):
    seq: Seq
    ts: float = Field(allow_inf_nan=False)
    boot: Text
    mono: float = Field(allow_inf_nan=False)
    type: Text
    prio: int = Field(ge=0, le=3)
    payload: dict[str, Any]  # its text is JSON: a NUL in a string is written as the escape \u0000
    prev: Text | None = None  # the chain hash of the device's previous record (core/signing.py); older agents: none


class Batch(BaseModel):
    v: Literal[1] = 1
    device_id: str
    batch: Text  # kept with rejected and quarantined records
    records: list[WireRecord]
    # Ed25519 over signing.batch_message(device_id, batch, each record's chain hash), and the signing key's id;
    # both absent from an unsigned batch (older agents)
    key: str | None = None
    sig: str | None = None


class Ack(BaseModel):
    v: Literal[1] = 1
    batch: str
    ranges: list[tuple[Seq, Seq]]  # inclusive seq ranges now durably stored at the hub
    stored: int = 0  # new records stored
    duplicates: int = 0  # records the hub already had (redeliveries dropped)
    # inclusive seq ranges the hub refused and will never store (a record that fails validation): the agent
    # deletes them too, counts them and keeps a trace (dead letters); they never block their neighbours
    rejected: list[tuple[Seq, Seq]] = Field(default_factory=list)
    # the hub's clock when it sent the ack: the agent estimates its offset to the hub from it (optional:
    # older hubs leave it out, older agents ignore it)
    ts: float | None = Field(None, allow_inf_nan=False)


class Alert(BaseModel):
    """The hub found a seq of this device already stored with other content (both are kept: `hub stats`)."""

    v: Literal[1] = 1
    alert: Literal["seq_conflict"] = "seq_conflict"
    device_id: str
    seqs: list[tuple[int, int]]  # the conflicting seqs of the batch that raised it, as inclusive ranges
    conflicts: int  # the device's conflicts so far
    hub: str  # the hub's client id
    ts: float


class Status(BaseModel):
    model_config = ConfigDict(extra="allow")
    state: Literal["online", "offline"]
    device_id: str
    ts: float | None  # None in the will, which is written at connect time


MODEL_CHUNK_BYTES = 256 * 1024  # a model_chunk command's data at most (base64 in the JSON: ~350 kB a message)
COMMAND_TTL_S = 300.0  # a command's default life: one still queued for an offline unit after this is refused


class Command(BaseModel):
    """An operator's command. `id` is unique per command (a unit refuses an id it has seen: a replay); `ts`
    is the sender's clock when it was sent and `expires` the time after which the unit refuses it (default
    ts + COMMAND_TTL_S). A unit whose clock is behind the sender's accepts a command as not yet expired."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=64)
    # confirm, capture: the app's (App.command); inspect: snapshots for a while (agent/inspect.py); model_*:
    # agent/model_update.py
    cmd: Literal["ping", "status", "resend", "config_get", "config_push", "confirm", "capture", "inspect",
                 "model_offer", "model_chunk", "model_install", "model_rollback"]
    ts: float = Field(allow_inf_nan=False)
    expires: float | None = Field(None, allow_inf_nan=False)
    args: dict[str, Any] = Field(default_factory=dict)

    def deadline(self) -> float:
        return self.expires if self.expires is not None else self.ts + COMMAND_TTL_S


# A round trip to the hub (`customs-edge check`): the unit's identity publishes a HubPing on its own
# `{device_id}/hub/ping` topic; a hub answers on `{device_id}/hub/pong` with its clock. The clock offset is
# pong.ts - (the sender's time at sending + round trip / 2), at most half the round trip off.
HUB_PING, HUB_PONG = "hub/ping", "hub/pong"
MAX_PING_BYTES = 512


class HubPing(BaseModel):
    model_config = ConfigDict(extra="forbid")
    v: Literal[1] = 1
    id: str = Field(min_length=1, max_length=64)
    ts: float = Field(allow_inf_nan=False)  # the sender's clock


class HubPong(BaseModel):
    v: Literal[1] = 1
    id: str
    ping_ts: float = Field(allow_inf_nan=False)  # the ping's ts, echoed
    ts: float = Field(allow_inf_nan=False)  # the hub's clock when it answered


# A hub worker's liveness (hub/liveness.py): while it stores, each worker publishes a HubAlive at most every
# `alive_interval_s`, retained, QoS 0, on one topic for the fleet. A unit whose batch waits for the hub's ack takes a
# rise of one worker's `stored` between two live messages (not the retained copy) as the hub draining a backlog,
# not down (agent/sync.py).
HUB_ALIVE = "fleet/hub-alive"
MAX_ALIVE_BYTES = 1024


def hub_alive_topic(prefix: str) -> str:
    return f"{prefix}/{HUB_ALIVE}"


class HubAlive(BaseModel):
    v: Literal[1] = 1
    hub: str = Field(min_length=1, max_length=256)  # the worker's client id: each worker counts on its own
    ts: float = Field(allow_inf_nan=False)  # the hub's clock (informational: units time it by their own)
    stored: int = Field(ge=0)  # batches the worker stored (and acked) since it started
    pending: int = Field(0, ge=0)  # bytes it has read and not stored yet


class CommandReply(BaseModel):
    id: str | None
    ok: bool
    result: dict[str, Any] | None = None
    error: str | None = None
    # config_push: "applied", "refused" (did not validate; `error` is what `config validate` prints) or
    # "rolled_back" (validated, failed to start: the previous config runs again); None for other commands
    outcome: Literal["applied", "refused", "rolled_back"] | None = None


def _number(x: float) -> str:
    """A float as JSON. repr() of inf or NaN (`inf`, `nan`) is not JSON: it made the whole batch unreadable,
    refused forever. null keeps the batch readable; the hub rejects that one record and says so in its ack."""
    return repr(x) if math.isfinite(x) else "null"


def encode_batch(device_id: str, batch_id: str, records: list[Pending], key: DeviceKey | None = None) -> bytes:
    """Batch JSON built by string joining: the stored payload JSON is sent as-is, never re-parsed. With a
    device key, each record carries its chain link and the batch is signed."""
    types: dict[str, str] = {}  # a batch holds a few types: each encoded once
    parts = []
    # a float formatted once for the records that share it (the same object): the records of one reading share
    # its stamp, those of one commit their mono
    ts_last: float | None = None
    mono_last: float | None = None
    ts_ = mono_ = ""
    for seq, ts, boot, mono, type_, prio, payload, prev in records:
        t = types.get(type_)
        if t is None:
            t = types[type_] = dumps(type_)
        if ts is not ts_last:  # x - x: 0.0 for every finite float, NaN for NaN and the infinities
            ts_last, ts_ = ts, _number(ts) if ts - ts else repr(ts)
        if mono is not mono_last:
            mono_last, mono_ = mono, _number(mono) if mono - mono else repr(mono)
        parts.append(f'{{"seq":{seq},"ts":{ts_},"boot":"{boot}","mono":{mono_},"type":{t},"prio":{prio},'
                     f'"payload":{payload}' + ("}" if prev is None else f',"prev":"{prev}"}}'))
    head = f'{{"v":{WIRE_VERSION},"device_id":{dumps(device_id)},"batch":{dumps(batch_id)},'
    if key is not None:
        head += f'"key":"{key.key_id}","sig":"{key.sign(batch_message(device_id, batch_id, chain_hashes(records)))}",'
    return (head + '"records":[' + ",".join(parts) + "]}").encode()


def chain_hashes(records: list[Pending]) -> list[str]:
    """Each record's chain hash, as the batch signature covers them. The outbox committed a record's hash as
    the `prev` of the record after it, so where that record follows in the batch (the next seq, both chained)
    its `prev` is the hash: only the others (a batch's last record, one before a gap, unchained ones) are
    hashed here. The hub recomputes every hash from what it received, so this changes nothing it checks."""
    out: list[str] = []
    for r, nxt in zip(records, [*records[1:], None], strict=True):
        if nxt is not None and nxt.seq == r.seq + 1 and nxt.prev is not None and r.prev is not None:
            out.append(nxt.prev)
        else:
            out.append(record_hash(r.prev or "", r.seq, r.ts, r.type, r.priority, r.payload))
    return out


def ranges_of(seqs: list[int]) -> list[tuple[int, int]]:
    """Sorted seqs -> inclusive ranges: [1,2,3,7] -> [(1,3),(7,7)]."""
    if seqs:  # the common case, one run (a batch of one priority), found without a pass in Python
        lo, hi = min(seqs), max(seqs)
        if hi - lo == len(seqs) - 1 and len(set(seqs)) == len(seqs):
            return [(lo, hi)]
    out: list[tuple[int, int]] = []
    for s in sorted(seqs):
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


def intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Seq ranges present in both lists of inclusive ranges."""
    out = []
    for lo1, hi1 in a:
        for lo2, hi2 in b:
            lo, hi = max(lo1, lo2), min(hi1, hi2)
            if lo <= hi:
                out.append((lo, hi))
    return out


MAX_HEALTH_BYTES = 16384  # a health message is ~1 kB; the hub refuses larger ones


class DriverHealth(BaseModel):
    up: bool  # reading frames now (no fault since the last frame)
    frames: int = 0
    corrupt: int = 0
    faults: int = 0


class Health(BaseModel):
    """What a unit reports about itself (agent/health.py). Sizes in bytes, times in seconds; None where
    the platform cannot tell (no thermal zone, no /proc) or nothing was measured yet (no hub ack)."""

    v: Literal[1] = 1
    device_id: str
    device_type: str | None = None  # the unit's `type` (older agents: none); `fleet model push --type` uses it
    ts: float = Field(allow_inf_nan=False)  # the unit's clock
    agent_version: str
    uptime_s: float = Field(ge=0, allow_inf_nan=False)  # of the agent process
    cpu_pct: float | None = Field(ge=0, allow_inf_nan=False)  # of one core, by the process, since the last message
    rss_bytes: int | None = Field(ge=0)
    disk_free_bytes: int | None = Field(ge=0)  # on the outbox's filesystem, for an unprivileged writer
    soc_temp_c: float | None = Field(allow_inf_nan=False)
    outbox_pending: int = Field(ge=0)
    oldest_unsent_age_s: float | None = Field(allow_inf_nan=False)
    dropped: dict[str, int] = Field(default_factory=dict)  # by the outbox's cap, per priority name
    dead_letters: dict[str, int] = Field(default_factory=dict)  # per reason
    drivers: dict[str, DriverHealth] = Field(default_factory=dict)  # per role
    models: dict[str, str] = Field(default_factory=dict)  # manifest name -> version, of the models the app loaded
    config_hash: str  # sha256 of the canonical unit config (agent/health.py config_hash)
    clock_offset_s: float | None = Field(None, allow_inf_nan=False)  # hub clock - unit clock, from ack round trips
    clock_rtt_s: float | None = Field(None, allow_inf_nan=False)  # the round trip of that estimate: its error <= rtt/2
