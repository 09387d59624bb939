"""Forward engines: run the exported program's methods on a batch and P adapter vectors.

`ProgramEngine` runs the `.pte` through the ExecuTorch runtime, as a phone does. The eager
reference lives with the exporter (`export.program`); the two are compared at export time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from device_sdk.data import Batch
from fwdfed.cli import first_line


class EngineError(Exception):
    """The program cannot be loaded or run; the message is meant for the user."""


class ProgramEngine:
    def __init__(self, program: bytes | Path | str, max_perturbations: int):
        from executorch.runtime import Runtime

        # The runtime wraps `bytes` without copying and loads methods lazily: keep the bytes
        # and the Program referenced for as long as the methods are used.
        self._source = program if isinstance(program, bytes) else str(program)
        try:
            self._program = Runtime.get().load_program(self._source)
            self._forward = self._program.load_method("forward")
            self._predict = self._program.load_method("predict")
        except Exception as e:
            raise EngineError(f"cannot load the ExecuTorch program: {first_line(e)}") from None
        self.max_perturbations = max_perturbations

    def losses(self, batch: Batch, adapters: np.ndarray) -> np.ndarray:
        """Per-example loss [P, B] of `batch` under each of the P adapter vectors."""
        adapters = np.ascontiguousarray(np.atleast_2d(adapters), dtype=np.float32)
        out = []
        for start in range(0, adapters.shape[0], self.max_perturbations):
            chunk = torch.from_numpy(adapters[start : start + self.max_perturbations])
            (loss,) = self._forward.execute([batch.input_ids, batch.attention_mask, batch.labels, chunk])
            out.append(loss.numpy())
        return np.concatenate(out, axis=0)

    def logits(self, batch: Batch, adapter: np.ndarray) -> np.ndarray:
        vector = torch.from_numpy(np.ascontiguousarray(adapter, dtype=np.float32).reshape(1, -1))
        (logits,) = self._predict.execute([batch.input_ids, batch.attention_mask, vector])
        return logits.numpy()
