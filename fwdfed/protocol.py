"""The wire: msgpack maps over websockets, one message per binary frame.

Every message is a map with `type` (a string) and `v` (the protocol version, an int), plus
the fields of its type below. A frame that is not a map, has an unknown type or version,
misses a field, has a field of the wrong type or out of range, or carries fields it should
not, is refused with a `ProtocolError` naming the reason. docs/protocol.md documents the same
table for client writers; `tests/fwdfed/test_protocol.py` checks the two agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import cache
from typing import Any, ClassVar

import msgpack

from fwdfed import history
from fwdfed import task_keys as keys
from fwdfed.directions import MAX_SEED_POOL, SEED_LIMIT
from fwdfed.tensor_scale import MAX_RANGES as MAX_SCALE_RANGES

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 64 * 1024 * 1024  # a task carries the global adapter: 16M float32 at most
MAX_PAIRS = 1_000_000  # (seed, coefficient) pairs in one update
MAX_TEXT = 1024
MAX_ID = 128
MAX_HISTORY = 1024  # versions in one task's seed-form history


class ProtocolError(Exception):
    """A frame that does not follow this protocol; the message says which rule it broke."""


# Field checks: each returns None when the value is valid, or a reason.
def _text(limit: int):
    def check(v):
        return None if isinstance(v, str) and len(v) <= limit else f"a string of at most {limit} characters"
    return check


def _int(lo: int, hi: int):
    def check(v):
        return None if isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi else f"an integer in [{lo}, {hi}]"
    return check


def _float(nonneg: bool = False):
    def check(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (not nonneg or v >= 0)
        return None if ok else ("a finite non-negative number" if nonneg else "a finite number")
    return check


def _optional(inner):
    def check(v):
        return None if v is None else inner(v)
    return check


def _bool(v):
    return None if isinstance(v, bool) else "a boolean"


def _bytes(limit: int):
    def check(v):
        return None if isinstance(v, bytes) and len(v) <= limit else f"bytes, at most {limit}"
    return check


def _int_list(lo: int, hi: int, limit: int):
    def check(v):
        if not isinstance(v, list) or len(v) > limit:
            return f"a list of at most {limit} integers"
        # `type(x) is int`: what msgpack gives an integer as (a bool is not one); checked per seed, thousands a second
        ok = all(type(x) is int and lo <= x <= hi for x in v)
        return None if ok else f"a list of integers in [{lo}, {hi}]"
    return check


def _float_list(limit: int):
    def check(v):
        if not isinstance(v, list) or len(v) > limit:
            return f"a list of at most {limit} numbers"
        ok = all((type(x) is float or type(x) is int) and math.isfinite(x) for x in v)
        return None if ok else "a list of finite numbers"
    return check


def _history(v):
    """A task's seed-form history (docs/protocol.md, Downlink in seed form): a list of versions, each a map of
    `version`, `shrink` and `block`, the sums as `seeds` and `coefs` or packed as `sums`, and optionally a span
    (`span_start` and `span`): fwdfed.history.FORMS."""
    if not isinstance(v, list) or len(v) > MAX_HISTORY:
        return f"a list of at most {MAX_HISTORY} versions"
    checks = dict(version=ROUND, seeds=_int_list(0, SEED_LIMIT - 1, MAX_PAIRS), coefs=_float_list(MAX_PAIRS),
                  sums=_packed(8, 8 * MAX_SEED_POOL), shrink=_float(), block=_int_list(0, 2**31 - 1, 2),
                  span_start=_int(0, 2**31 - 1), span=_packed(4, MAX_FRAME_BYTES))
    for step in v:
        if not isinstance(step, dict) or frozenset(step) not in history.FORMS:
            return ("a list of maps of exactly version, shrink, block, either seeds and coefs or sums, and optionally "
                    "span_start and span")
        for name in (name for name in checks if name in step):  # in this order, as the Java device's Codec
            if (reason := checks[name](step[name])) is not None:
                return f"a list of versions whose {name} is {reason}"
        if "seeds" in step and len(step["seeds"]) != len(step["coefs"]) or len(step["block"]) not in (0, 2):
            return "a list of versions with as many coefs as seeds and a block of 0 or 2 integers"
    return None


def _packed(width: int, limit: int):
    """Bytes of whole `width`-byte values, at least one (a history's packed sums, a span's float32 values)."""
    def check(v):
        ok = isinstance(v, bytes) and 0 < len(v) <= limit and len(v) % width == 0
        return None if ok else f"bytes of 1 to {limit // width} values of {width} bytes"
    return check


def _hparams(v):
    if not isinstance(v, dict) or len(v) > 64:
        return "a map of at most 64 entries"
    for k, x in v.items():
        if not isinstance(k, str) or len(k) > 64:
            return "a map with string keys"
        if k == keys.TENSOR_SCALES:  # the one list: its ranges' meaning is the device's check (tensor_scale)
            if not (isinstance(x, list) and len(x) <= MAX_SCALE_RANGES
                    and all(isinstance(r, list) and len(r) == 3 and all(_float()(n) is None for n in r) for r in x)):
                return f"a map whose {k} is a list of at most {MAX_SCALE_RANGES} lists of 3 finite numbers"
        elif not (isinstance(x, str) and len(x) <= 64) and _float()(x) is not None:
            return "a map of finite numbers or short strings"
    return None


ID = _text(MAX_ID)
HASH = _text(64)
COUNT = _int(0, 2**31 - 1)
ROUND = _int(0, 2**31 - 1)
BYTES_COUNT = _int(0, 2**62)


@dataclass
class Message:
    TYPE: ClassVar[str]
    CHECKS: ClassVar[dict]
    # Fields a sender may leave out (then None here): added after version 1's first devices, which neither
    # send nor expect them. Never sent as nil: a field of OPTIONAL that is None is not on the wire.
    OPTIONAL: ClassVar[frozenset] = frozenset()

    def to_wire(self) -> bytes:
        data = {"type": self.TYPE, "v": PROTOCOL_VERSION}
        for name in field_names(type(self)):  # the fields as they are: msgpack copies them into the frame
            if (value := getattr(self, name)) is not None or name not in self.OPTIONAL:
                data[name] = value
        return msgpack.packb(data, use_bin_type=True)


@cache
def field_names(cls: type[Message]) -> tuple[str, ...]:
    """A message type's fields, in order (looked up once: a coordinator encodes and decodes thousands a second)."""
    return tuple(f.name for f in fields(cls))


@dataclass
class Hello(Message):
    """device -> coordinator, first message: who I am and what model I hold."""
    TYPE: ClassVar[str] = "hello"
    device_id: str
    base_model_hash: str
    adapter_dim: int
    num_examples: int
    mem_budget_bytes: int | None
    # A device that keeps its adapter: the global version it holds and that adapter's sha256 ("": none), so that
    # its tasks may carry the seed-form history from it instead of the dense adapter. Both or neither.
    held_version: int | None = None
    held_sha256: str | None = None
    CHECKS: ClassVar[dict] = dict(device_id=ID, base_model_hash=HASH, adapter_dim=COUNT, num_examples=COUNT,
                                  mem_budget_bytes=_optional(BYTES_COUNT), held_version=ROUND, held_sha256=HASH)
    OPTIONAL: ClassVar[frozenset] = frozenset({"held_version", "held_sha256"})


@dataclass
class Welcome(Message):
    """coordinator -> device: enrolled in this job; tasks will follow."""
    TYPE: ClassVar[str] = "welcome"
    job_id: str
    device_id: str
    CHECKS: ClassVar[dict] = dict(job_id=ID, device_id=ID)


@dataclass
class Task(Message):
    """coordinator -> device: train from this global adapter and answer with an Update."""
    TYPE: ClassVar[str] = "task"
    task_id: str
    job_id: str
    round: int
    global_version: int
    base_model_hash: str
    adapter: bytes  # float32 little-endian, adapter_dim values
    adapter_sha256: str
    method: str
    hparams: dict
    deadline_s: float
    reference: bytes  # the previous round's global update (float32), or empty: guides FwdLLM's selection
    # Only to a device whose hello named the version it holds: the versions from it to `global_version` in seed
    # form (fwdfed.update.SeedSums as maps), `adapter` then empty. Absent: `adapter` is the dense adapter.
    history: list | None = None
    CHECKS: ClassVar[dict] = dict(task_id=ID, job_id=ID, round=ROUND, global_version=ROUND, base_model_hash=HASH,
                                  adapter=_bytes(MAX_FRAME_BYTES), adapter_sha256=HASH, method=_text(32),
                                  hparams=_hparams, deadline_s=_float(nonneg=True), reference=_bytes(MAX_FRAME_BYTES),
                                  history=_history)
    OPTIONAL: ClassVar[frozenset] = frozenset({"history"})


@dataclass
class Update(Message):
    """device -> coordinator: the answer to one task, in seed form."""
    TYPE: ClassVar[str] = "update"
    task_id: str
    job_id: str
    round: int
    global_version: int
    seeds: list
    coefs: list
    scale: float  # the device's adapter is scale * global + sum coef * direction(seed) + dense
    dense: bytes  # a dense change (float32, d values; the backprop baseline), or empty
    num_examples: int
    loss_before: float
    loss_after: float
    peak_rss_bytes: int
    CHECKS: ClassVar[dict] = dict(task_id=ID, job_id=ID, round=ROUND, global_version=ROUND,
                                  seeds=_int_list(0, SEED_LIMIT - 1, MAX_PAIRS), coefs=_float_list(MAX_PAIRS),
                                  scale=_float(nonneg=True), dense=_bytes(MAX_FRAME_BYTES), num_examples=COUNT, loss_before=_float(), loss_after=_float(),
                                  peak_rss_bytes=BYTES_COUNT)


@dataclass
class Ack(Message):
    """coordinator -> device: whether an update was accepted, and why not."""
    TYPE: ClassVar[str] = "ack"
    task_id: str
    accepted: bool
    reason: str
    CHECKS: ClassVar[dict] = dict(task_id=ID, accepted=_bool, reason=_text(MAX_TEXT))


@dataclass
class Done(Message):
    """coordinator -> device: the job has finished; disconnect."""
    TYPE: ClassVar[str] = "done"
    job_id: str
    reason: str
    CHECKS: ClassVar[dict] = dict(job_id=ID, reason=_text(MAX_TEXT))


@dataclass
class Error(Message):
    """coordinator -> device: the last frame was refused; the coordinator closes the connection after it.
    (A device that sends one breaks the protocol: it declines a task with Decline.)"""
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    CHECKS: ClassVar[dict] = dict(code=_text(64), message=_text(MAX_TEXT))


@dataclass
class Decline(Message):
    """device -> coordinator: the device cannot run this task; it goes to another device, not back to this one."""
    TYPE: ClassVar[str] = "decline"
    task_id: str
    code: str  # the device's own word for why (e.g. cannot_run), stored with the refusal
    reason: str
    CHECKS: ClassVar[dict] = dict(task_id=ID, code=_text(64), reason=_text(MAX_TEXT))


MESSAGES: dict[str, type[Message]] = {m.TYPE: m for m in (Hello, Welcome, Task, Update, Decline, Ack, Done, Error)}


def decode(frame: Any) -> Message:
    """Parse and validate one frame into its typed message, or raise ProtocolError."""
    if not isinstance(frame, (bytes, bytearray)):
        raise ProtocolError("frames must be binary msgpack, not text")
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    try:
        data = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=MAX_FRAME_BYTES)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"not valid msgpack: {type(e).__name__}") from None
    if not isinstance(data, dict):
        raise ProtocolError("a message must be a msgpack map")
    kind, version = data.pop("type", None), data.pop("v", None)
    # `type(...) is int`: under `!=`, msgpack's 1.0 and true would pass for 1 (a version is an int).
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})")
    if not isinstance(kind, str) or kind not in MESSAGES:
        raise ProtocolError(f"unknown message type {kind!r}")
    cls = MESSAGES[kind]
    names = field_names(cls)
    extra = set(data).difference(names)
    if extra:
        raise ProtocolError(f"{kind}: unexpected fields {sorted(map(str, extra))[:5]}")
    for name in names:
        if name not in data:
            if name in cls.OPTIONAL:
                continue
            raise ProtocolError(f"{kind}: missing field {name!r}")
        reason = cls.CHECKS[name](data[name])
        if reason:
            raise ProtocolError(f"{kind}.{name} must be {reason}")
    message = cls(**data)
    if isinstance(message, Update) and len(message.seeds) != len(message.coefs):
        raise ProtocolError("update: seeds and coefs must have the same length")
    if isinstance(message, Hello) and (message.held_version is None) != (message.held_sha256 is None):
        raise ProtocolError("hello: held_version and held_sha256 come together or not at all")
    if isinstance(message, Task) and message.history is not None and message.adapter:
        raise ProtocolError("task: a task with a history carries no adapter")
    return message
