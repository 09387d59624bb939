"""Test helper: the ExecuTorch runtime behind a pipe, the `LossProgram` of the Java core's tests.

`python loss_helper.py PROGRAM.pte` loads the program and answers requests on stdin with the
per-example losses of its `forward` method on stdout, in the binary framing that
android_demo/core/src/test/java/org/fwdfed/core/PipeLossProgram.java documents. The Java side
builds the tensors exactly as an Android app hands them to `Module.forward`; this process only
runs them, through the same runtime the Python device uses.
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


def main(path: str) -> int:
    import torch
    from executorch.runtime import Runtime

    forward = Runtime.get().load_program(path).load_method("forward")
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = read_exactly(stdin, 24)
        if head is None:
            return 0  # the Java side closed the pipe: done
        magic, p, b, l, label_columns, d = struct.unpack("<4s5I", head)
        if magic != b"FWDL":
            sys.stderr.write("loss_helper: bad request header\n")
            return 2
        ids = np.frombuffer(read_exactly(stdin, 8 * b * l), "<i8").reshape(b, l)
        mask = np.frombuffer(read_exactly(stdin, 8 * b * l), "<i8").reshape(b, l)
        labels = np.frombuffer(read_exactly(stdin, 8 * b * max(1, label_columns)), "<i8")
        labels = labels.reshape(b, label_columns) if label_columns else labels
        adapters = np.frombuffer(read_exactly(stdin, 4 * p * d), "<f4").reshape(p, d)
        try:
            (loss,) = forward.execute([torch.from_numpy(ids.copy()), torch.from_numpy(mask.copy()),
                                       torch.from_numpy(labels.copy()), torch.from_numpy(adapters.copy())])
            body = struct.pack("<I", 0) + np.ascontiguousarray(loss.numpy(), dtype="<f4").tobytes()
        except Exception as e:  # noqa: BLE001 - the runtime's error goes back to the Java side, which raises it
            message = f"{type(e).__name__}: {e}".encode()[:4096]
            body = struct.pack("<II", 1, len(message)) + message
        stdout.write(body)
        stdout.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
