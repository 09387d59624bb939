"""Test helper: the ExecuTorch runtime behind a pipe, the `LossProgram` of the Java core's tests.

`python loss_helper.py PROGRAM.pte` loads the program and answers requests on stdin with the
per-example losses of its `forward` method on stdout, in the binary framing that
android_demo/core/src/test/java/org/fwdfed/core/PipeLossProgram.java documents. The Java side
builds the tensors exactly as an Android app hands them to `Module.forward`; this process only
runs them, through the same runtime the Python device uses: the bindings' extension itself
(runtime.executorch.raw_log), without `executorch.runtime`, whose import costs a fresh process seconds more.

`python loss_helper.py --probe PROGRAM.pte` is the Java device's probe on the JVM (HelperProbe.java): it
reads one request, then loads the program and runs `forward` once on it, writes one line on stdout,
`ok PEAK_RSS` or `error PEAK_RSS LINE` (the runtime's refusal in one line, in the Python device's words),
and exits 0. A program that crashes the runtime kills this process instead: no line, killed by a signal.
"""

from __future__ import annotations

import struct
import sys

import numpy as np


def read_exactly(stream, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def read_request(stdin):
    """The next request's tensors, or None when the Java side closed the pipe."""
    import torch

    head = read_exactly(stdin, 24)
    if head is None:
        return None
    magic, p, b, l, label_columns, d = struct.unpack("<4s5I", head)
    if magic != b"FWDL":
        raise SystemExit("loss_helper: bad request header")
    ids = np.frombuffer(read_exactly(stdin, 8 * b * l), "<i8").reshape(b, l)
    mask = np.frombuffer(read_exactly(stdin, 8 * b * l), "<i8").reshape(b, l)
    labels = np.frombuffer(read_exactly(stdin, 8 * b * max(1, label_columns)), "<i8")
    labels = labels.reshape(b, label_columns) if label_columns else labels
    adapters = np.frombuffer(read_exactly(stdin, 4 * p * d), "<f4").reshape(p, d)
    return [torch.from_numpy(a.copy()) for a in (ids, mask, labels, adapters)]


def load_forward(path: str):
    """The program's `forward`, loaded as `executorch.runtime.Runtime.load_program` loads a path."""
    from runtime.executorch import raw_log

    _C = raw_log()
    program = _C._load_program(path, enable_etdump=False, debug_buffer_size=0,
                               program_verification=_C.Verification.InternalConsistency, data_path=None)
    return program.load_method("forward")


def probe(path: str) -> int:
    import resource

    from fwdfed.errors import first_line

    inputs = read_request(sys.stdin.buffer)
    try:
        forward = load_forward(path)
    except Exception as e:  # noqa: BLE001 - the refusal is the verdict, in runtime/engine.py's words
        verdict = f"cannot load the ExecuTorch program: {first_line(e)}"
    else:
        try:
            forward(inputs)
            verdict = None
        except Exception as e:  # noqa: BLE001 - as PipeLossProgram words a failed call
            verdict = f"the ExecuTorch program's forward failed: {first_line(e)}"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kilobytes
    sys.stdout.write("ok %d\n" % peak if verdict is None else "error %d %s\n" % (peak, verdict))
    return 0


def main(path: str) -> int:
    forward = load_forward(path)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        inputs = read_request(stdin)
        if inputs is None:
            return 0  # the Java side closed the pipe: done
        try:
            (loss,) = forward(inputs)
            body = struct.pack("<I", 0) + np.ascontiguousarray(loss.numpy(), dtype="<f4").tobytes()
        except Exception as e:  # noqa: BLE001 - the runtime's error goes back to the Java side, which raises it
            message = f"{type(e).__name__}: {e}".encode()[:4096]
            body = struct.pack("<II", 1, len(message)) + message
        stdout.write(body)
        stdout.flush()


if __name__ == "__main__":
    sys.exit(probe(sys.argv[2]) if sys.argv[1] == "--probe" else main(sys.argv[1]))
