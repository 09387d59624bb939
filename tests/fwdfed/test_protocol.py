import math
import struct

import msgpack
import pytest

from fwdfed import protocol
from fwdfed.protocol import ProtocolError, decode

UPDATE = protocol.Update(task_id="t", job_id="j", round=1, global_version=0, seeds=[1, 2**63 - 1], coefs=[0.5, -1e-3], scale=1.0, dense=b"",
                         num_examples=10, loss_before=2.0, loss_after=1.9, peak_rss_bytes=400 * 2**20)
TASK = protocol.Task(task_id="t", job_id="j", round=1, global_version=0, base_model_hash="a" * 64,
                     adapter=b"\x00" * 16, adapter_sha256="b" * 64, method="mezo", hparams={"lr": 1e-3, "kind": "x"},
                     deadline_s=10.0, reference=b"")


@pytest.mark.parametrize("message", [
    UPDATE, TASK,
    protocol.Hello(device_id="d", base_model_hash="h", adapter_dim=3, num_examples=0, mem_budget_bytes=None),
    protocol.Welcome(job_id="j", device_id="d"), protocol.Ack(task_id="t", accepted=False, reason="late"),
    protocol.Decline(task_id="t", code="cannot_run", reason="no teacher"),
    protocol.Done(job_id="j", reason="done"), protocol.Error(code="bad_message", message="x"),
])
def test_every_message_round_trips(message):
    assert decode(message.to_wire()) == message


def wire(**changes):
    data = {"type": "update", "v": protocol.PROTOCOL_VERSION, **UPDATE.__dict__, **changes}
    return msgpack.packb({k: v for k, v in data.items() if v is not ...}, use_bin_type=True)


@pytest.mark.parametrize("frame, reason", [
    (b"", "not valid msgpack"),
    (b"\x93\x01", "not valid msgpack"),
    ("text", "binary"),
    (msgpack.packb(5), "map"),
    (msgpack.packb({1: 2}), "not valid msgpack"),
    (wire(v=2), "protocol version"),
    (wire(v=1.0), "protocol version"),  # integers are never floats,
    (wire(v=True), "protocol version"),  # and booleans are not 0/1
    (wire(type="launch"), "unknown message type"),
    (wire(round=...), "missing field 'round'"),
    (wire(extra=1), "unexpected fields"),
    (wire(round=-1), "update.round must be"),
    (wire(round=True), "update.round must be"),
    (wire(num_examples=2**40), "update.num_examples"),
    (wire(seeds=[2**63]), "update.seeds"),
    (wire(seeds=[1.0, 2.0]), "update.seeds"),
    (wire(coefs=[math.nan, 1.0]), "update.coefs"),
    (wire(coefs=[math.inf, 1.0]), "update.coefs"),
    (wire(coefs=["1", 1.0]), "update.coefs"),
    (wire(coefs=[1.0]), "same length"),
    (wire(loss_after=math.nan), "update.loss_after"),
    (wire(scale=-0.5), "update.scale"),
    (wire(task_id="x" * 1000), "update.task_id"),
    (wire(task_id=b"bytes"), "update.task_id"),
])
def test_malformed_frames_are_refused_with_a_reason(frame, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode(frame)


def test_the_version_must_be_an_integer_in_a_hello_too():
    hello = protocol.Hello(device_id="d", base_model_hash="h", adapter_dim=3, num_examples=0, mem_budget_bytes=None)
    for version in (1.0, True):
        frame = msgpack.packb({"type": "hello", "v": version, **hello.__dict__}, use_bin_type=True)
        with pytest.raises(ProtocolError, match="protocol version"):
            decode(frame)


def test_oversized_frames_are_refused_before_parsing():
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(b"\x00" * (protocol.MAX_FRAME_BYTES + 1))


def test_the_protocol_document_names_every_message_and_field():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    for name, cls in protocol.MESSAGES.items():
        section = doc.split(f"### `{name}`")[1].split("###")[0]
        for field in cls.CHECKS:
            assert f"| `{field}` |" in section, f"docs/protocol.md: {name}.{field} is not documented"


HELD = protocol.Hello(device_id="d", base_model_hash="h", adapter_dim=3, num_examples=0, mem_budget_bytes=None,
                      held_version=4, held_sha256="c" * 64)
STEP = {"version": 1, "seeds": [7, 2**63 - 1], "coefs": [1e-3 / 3, -2.5e-4], "shrink": 0.0, "block": []}
PACKED = {"version": 2, "sums": struct.pack("<3d", 0.0, 1e-3, -2e-3), "shrink": 0.0, "block": [0, 2],
          "span_start": 1, "span": struct.pack("<2f", 0.5, -0.0)}


def test_the_downlink_fields_are_optional_and_never_sent_as_nil():
    plain = protocol.Hello(device_id="d", base_model_hash="h", adapter_dim=3, num_examples=0, mem_budget_bytes=None)
    assert b"held_" not in plain.to_wire() and b"history" not in TASK.to_wire()  # older devices see no change
    assert decode(HELD.to_wire()) == HELD
    task = protocol.Task(**{**TASK.__dict__, "adapter": b"", "global_version": 1, "history": [STEP]})
    assert decode(task.to_wire()) == task
    both = protocol.Task(**{**TASK.__dict__, "adapter": b"", "global_version": 2,
                            "history": [{**STEP, "span_start": 0, "span": b"\0" * 8}, PACKED]})
    assert decode(both.to_wire()) == both  # the packed sums and the spans: msgpack bin, both ways


def pack(data: dict) -> bytes:
    return msgpack.packb({"v": protocol.PROTOCOL_VERSION, **data}, use_bin_type=True)


@pytest.mark.parametrize("frame, reason", [
    (pack({"type": "hello", **{k: v for k, v in HELD.__dict__.items() if k != "held_sha256"}}), "come together"),
    (pack({"type": "hello", **HELD.__dict__, "held_version": None}), "hello.held_version"),
    (pack({"type": "task", **TASK.__dict__, "history": [STEP]}), "carries no adapter"),
    (pack({"type": "task", **TASK.__dict__, "adapter": b"", "history": [{**STEP, "extra": 1}]}), "exactly"),
    (pack({"type": "task", **TASK.__dict__, "adapter": b"", "history": [{**STEP, "coefs": [1.0]}]}), "as many"),
    (pack({"type": "task", **TASK.__dict__, "adapter": b"", "history": [{**STEP, "block": [1]}]}), "as many"),
    (pack({"type": "task", **TASK.__dict__, "adapter": b"", "history": [{**STEP, "coefs": [math.nan, 1]}]}),
     "coefs"),
    (pack({"type": "task", **TASK.__dict__, "adapter": b"", "history": None}), "task.history"),
    (pack({"type": "task", **TASK.__dict__, "adapter": b"", "history": [{**PACKED, "seeds": [1]}]}), "exactly"),
    (pack({"type": "task", **TASK.__dict__, "adapter": b"", "history": [{**STEP, "span": b"\0" * 4}]}), "exactly"),
    (pack({"type": "task", **TASK.__dict__, "adapter": b"", "history": [{**PACKED, "sums": b"\0" * 12}]}), "sums"),
    (pack({"type": "task", **TASK.__dict__, "adapter": b"", "history": [{**PACKED, "sums": b""}]}), "sums"),
    (pack({"type": "task", **TASK.__dict__, "adapter": b"", "history": [{**PACKED, "span": b"\0" * 6}]}), "span"),
    (pack({"type": "task", **TASK.__dict__, "adapter": b"", "history": [{**PACKED, "span_start": -1}]}),
     "span_start"),
    (pack({"type": "task", **TASK.__dict__, "adapter": b"", "history": [{**PACKED, "sums": [1.0]}]}), "sums"),
])
def test_a_bad_held_version_or_history_is_refused(frame, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode(frame)
