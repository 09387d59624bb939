"""The Java codec and fwdfed/protocol.py judge the same frames the same way.

A corpus of frames, every message of docs/protocol.md and each of them broken one rule at a
time (a field removed, an extra one, every field given values of each wrong type or out of
range, truncated frames, bytes that are not msgpack), goes through both decoders: each frame
must be accepted by both or refused by both, and what Java re-encodes from an accepted frame
must decode in Python to the same message.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import fields

import msgpack

from fwdfed import protocol
from tests.android_demo.support import decode

ADAPTER = struct.pack("<3f", 1.0, -2.5, 0.0)
# A task whose history has the other forms (fwdfed/history.py): sums packed by a seed pool, spans.
POOLED = protocol.Task(task_id="t-3", job_id="job-1", round=5, global_version=4, base_model_hash="ab" * 32,
                       adapter=b"", adapter_sha256=hashlib.sha256(ADAPTER).hexdigest(), method="mezo",
                       hparams={"kind": "rademacher", "seed_pool": 3, "seed_pool_key": "0123456789abcdef"},
                       deadline_s=1.5, reference=b"",
                       history=[{"version": 3, "sums": struct.pack("<3d", 0.0, 1e-3 / 3, -0.0), "shrink": 0.0,
                                 "block": [0, 2], "span_start": 2, "span": struct.pack("<f", -0.0)},
                                {"version": 4, "seeds": [], "coefs": [], "shrink": 0.0, "block": [], "span_start": 0,
                                 "span": ADAPTER}])
VALID = [
    protocol.Hello(device_id="emu-0", base_model_hash="ab" * 32, adapter_dim=8960, num_examples=553,
                   mem_budget_bytes=1_500_000_000),
    protocol.Hello(device_id="d" * 128, base_model_hash="", adapter_dim=0, num_examples=2**31 - 1, mem_budget_bytes=None),
    protocol.Hello(device_id="emu-1", base_model_hash="ab" * 32, adapter_dim=8960, num_examples=553,
                   mem_budget_bytes=None, held_version=2, held_sha256="cd" * 32),  # the downlink in seed form
    protocol.Welcome(job_id="job-1", device_id="emu-0"),
    protocol.Task(task_id="t-1", job_id="job-1", round=3, global_version=2, base_model_hash="ab" * 32, adapter=ADAPTER,
                  adapter_sha256=hashlib.sha256(ADAPTER).hexdigest(), method="mezo",
                  hparams={"lr": 1e-3, "eps": 1e-2, "local_steps": 100, "directions": 1, "kind": "rademacher",
                           "wave": 0, "block_start": 0, "block_end": 3, "big": 2**64 - 1},
                  deadline_s=299.5, reference=b""),
    protocol.Task(task_id="t-2", job_id="job-1", round=3, global_version=2, base_model_hash="ab" * 32, adapter=b"",
                  adapter_sha256=hashlib.sha256(ADAPTER).hexdigest(), method="mezo", hparams={"kind": "rademacher"},
                  deadline_s=1.5, reference=b"",
                  history=[{"version": 1, "seeds": [0, 2**63 - 1], "coefs": [1e-3 / 3, -2.5e-4], "shrink": 0.0,
                            "block": []},
                           {"version": 2, "seeds": [42], "coefs": [7e-5], "shrink": -1e-4 / 3, "block": [1, 3]}]),
    POOLED,
    protocol.Update(task_id="t-1", job_id="job-1", round=3, global_version=2, seeds=[0, 2**63 - 1, 42],
                    coefs=[-1e-3, 0.5, 7.0], scale=0.99, dense=b"", num_examples=553, loss_before=2.5,
                    loss_after=2.25, peak_rss_bytes=123456789),
    protocol.Decline(task_id="t-1", code="cannot_run", reason="task t-1 asks for teacher 0123456789ab"),
    protocol.Ack(task_id="t-1", accepted=False, reason="duplicate: this task already has an accepted update"),
    protocol.Done(job_id="job-1", reason="finished"),
    protocol.Error(code="revoked", message="é" * 1024),
]
# Values of every wrong kind and at every edge: each replaces each field of each message in turn.
PROBES = [None, True, 0, 1, -1, 2**31 - 1, 2**31, 2**62, 2**62 + 1, 2**63 - 1, 2**64 - 1, -(2**63), 0.0, 1.0, 1.5, -0.5,
          float("nan"), float("inf"), "", "x", "x" * 32, "x" * 33, "x" * 64, "x" * 65, "x" * 128, "x" * 129,
          "😀" * 128, "x" * 1024, "x" * 1025, b"", b"\x00" * 5, [], [1, 2], [0.5], [-1], [2**63], [True],
          {}, {"lr": 0.1}, {"lr": "x" * 65}, {1: 2}, {"k": [1]}, {f"k{i}": i for i in range(65)},
          {"x" * 65: 1}, {"lr": float("inf")}, {"lr": None}]


def pack(data) -> bytes:
    return msgpack.packb(data, use_bin_type=True)


def corpus() -> list[bytes]:
    frames = []
    for message in VALID:
        good = message.to_wire()
        frames.append(good)
        base = msgpack.unpackb(good, raw=False)
        for name in base:
            frames.append(pack({k: v for k, v in base.items() if k != name}))  # missing
            for probe in PROBES:
                frames.append(pack({**base, name: probe}))
        frames.append(pack({**base, "extra": 1}))
        frames.append(pack({**base, b"type": "x"}))  # a bytes key is an extra field
        for cut in sorted({1, 2, len(good) // 3, len(good) // 2, len(good) - 1}):
            frames.append(good[:cut])
        frames.append(good + b"\x00")
    packed = POOLED.history[0]
    for broken in ({**packed, "seeds": [1]}, {**packed, "sums": b"\0" * 12}, {**packed, "sums": b""},
                   {**packed, "sums": [1.0]}, {**packed, "span": b"\0" * 6}, {**packed, "span": b""},
                   {**packed, "span_start": -1}, {**packed, "span_start": 2**31}, {**packed, "span_start": None},
                   {k: v for k, v in packed.items() if k != "span"}, {k: v for k, v in packed.items() if k != "sums"}):
        frames.append(pack({**msgpack.unpackb(POOLED.to_wire(), raw=False), "history": [broken]}))
    frames += [b"", b"\xc1", b"\x90", b"\x80", b"\xa3abc", pack([1, 2]), pack({"type": "hello"}),
               b"\x81\xa1x\xd4\x01\x00",  # an ext type
               b"\x81\xa1x\xc6\x7f\xff\xff\xff\x01",  # bytes claiming 2 GiB
               b"\x81\xa1x\xa2\xff\xfe",  # a string that is not UTF-8
               b"\x81\xa1x\xa3\xed\xa0\x80",  # an encoded surrogate
               b"\x91" * 100 + b"\x01"]  # deep nesting
    update = msgpack.unpackb(next(m for m in VALID if isinstance(m, protocol.Update)).to_wire(), raw=False)
    frames += [pack({**update, "seeds": [1, 2], "coefs": [0.5]}),  # lengths differ
               pack({**update, "seeds": [1] * 3, "coefs": [0.5, 0.5, float("nan")]})]
    return frames


def as_numbers(value):
    """Numbers as floats: a float field may arrive as an int (Java keeps it as a double)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, list, dict)):
        return value
    if isinstance(value, list):
        return [as_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: as_numbers(v) for k, v in value.items()}
    return float(value)


def python_verdict(frame: bytes):
    try:
        return protocol.decode(frame)
    except protocol.ProtocolError:
        return None


def test_java_and_python_accept_and_refuse_the_same_frames(java_core):
    frames = corpus()
    stdin = b"".join(struct.pack(">I", len(f)) + f for f in frames)
    lines = java_core.run("CodecCheck", stdin=stdin, timeout=120).stdout.decode().splitlines()
    assert len(lines) == len(frames)
    disagreements, accepted = [], 0
    for frame, line in zip(frames, lines):
        ours = python_verdict(frame)
        if (ours is None) != line.startswith("refused "):
            disagreements.append((frame[:80], line[:120], ours))
            continue
        if ours is not None:
            accepted += 1
            again = decode(bytes.fromhex(line[3:]))
            assert as_numbers(vars(again)) == as_numbers(vars(ours)), "Java re-encodes what it decoded"
    assert not disagreements, f"{len(disagreements)} of {len(frames)} frames judged differently: {disagreements[:5]}"
    assert 0 < accepted < len(frames) // 2
    print(f"{len(frames)} frames, {accepted} accepted by both, the rest refused by both")


def test_java_encodes_every_message_as_python_does(java_core):
    """Byte for byte, for messages whose float fields hold floats (Python packs a float-typed int as an int)."""
    frames = [m.to_wire() for m in VALID]
    stdin = b"".join(struct.pack(">I", len(f)) + f for f in frames)
    lines = java_core.run("CodecCheck", stdin=stdin, timeout=120).stdout.decode().splitlines()
    for message, frame, line in zip(VALID, frames, lines):
        assert line.startswith("ok "), (message, line)
        assert bytes.fromhex(line[3:]) == frame, message


def test_java_knows_every_message_and_field(java_core):
    """The same messages and fields as fwdfed/protocol.py's dataclasses: a frame missing any one
    field (but an optional one) is refused by Java naming that field."""
    assert sorted(protocol.MESSAGES) == sorted({m.TYPE for m in VALID})
    missing, frames = [], []
    for message in {m.TYPE: m for m in VALID}.values():
        base = msgpack.unpackb(message.to_wire(), raw=False)
        for f in fields(message):
            if f.name in message.OPTIONAL:  # may be left out (the downlink in seed form): the corpus covers them
                continue
            missing.append(f"{message.TYPE}: missing field '{f.name}'")
            frames.append(pack({k: v for k, v in base.items() if k != f.name}))
    stdin = b"".join(struct.pack(">I", len(f)) + f for f in frames)
    lines = java_core.run("CodecCheck", stdin=stdin, timeout=120).stdout.decode().splitlines()
    for expected, line in zip(missing, lines, strict=True):
        assert line == f"refused {expected}"
