"""The streamed engine: a bundle's stages (embedding, decoder blocks, head) run one program at a time.

`StreamedEngine.losses(batch, adapters[P, d])` embeds the batch once, then for every block in
turn loads its program (memory-mapped from its file), runs the hidden states of all P adapter
vectors through it (in calls of at most the program's P), and releases it before the next block
is loaded: each block's weights are read once per call, not once per adapter vector, and only
one block's weights are resident. The head gives the per-example losses. The engine has
`ProgramEngine`'s interface, so MeZO, the forward gradient, the evaluator and the device client
use it unchanged (`ProgramEngine.for_bundle` returns one for a streamed bundle).

`trace` records, per stage, the resident memory while its program was loaded and after it was
released (VmRSS, and RssFile: the mapped file pages), so a measurement can show the release.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from fwdfed.batch import Batch
from fwdfed.bundle.manifest import Bundle
from fwdfed.errors import first_line
from fwdfed.memory import status_field
from runtime.executorch import EngineError, runtime


@dataclass
class StageRecord:
    name: str
    rss_loaded: int  # VmRSS with the stage's program loaded, after its calls
    rss_released: int  # VmRSS after it was released
    file_rss_loaded: int  # RssFile (mapped file pages) with it loaded
    file_rss_released: int


class StreamedEngine:
    def __init__(self, bundle: Bundle):
        m = bundle.manifest
        if not m.program.streamed:
            raise EngineError("not a streamed bundle: use ProgramEngine")
        self.folder = bundle.program_path
        self.stages = m.program.stages
        self.max_perturbations = m.inputs.max_perturbations
        self.trace: list[StageRecord] = []
        self.max_live_programs = 0  # the most stage programs alive at once (1 when each is released in time)
        self._live: list[weakref.ref] = []

    @classmethod
    def for_bundle(cls, bundle: Bundle) -> "StreamedEngine":
        engine = cls(bundle)
        for stage in engine.stages:
            if not (engine.folder / stage.file).is_file():
                raise EngineError(f"the streamed bundle lacks its stage program {stage.file}")
        return engine

    # ---- one stage at a time ----
    def _run_stage(self, stage: dict, calls: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Load `stage`'s program, run each input list through its forward, release it."""
        self._live = [r for r in self._live if r() is not None]
        try:
            program = runtime().load_program(str(self.folder / stage.file))
            method = program.load_method("forward")
        except Exception as e:
            raise EngineError(f"cannot load the stage program {stage.file}: {first_line(e)}") from None
        self._live.append(weakref.ref(program))
        self.max_live_programs = max(self.max_live_programs, len(self._live))
        try:
            outputs = [method.execute(inputs)[0] for inputs in calls]
        except (RuntimeError, ValueError) as e:
            raise EngineError(f"the stage program {stage.name}'s forward failed: {first_line(e)}") from None
        loaded, file_loaded = status_field("VmRSS"), status_field("RssFile")
        # The runtime unmaps the program's file when the Program (and its Method) are gone.
        del method, program
        gc.collect()
        self._live = [r for r in self._live if r() is not None]
        self.trace.append(StageRecord(stage.name, loaded, status_field("VmRSS"), file_loaded,
                                      status_field("RssFile")))
        return outputs

    def losses(self, batch: Batch, adapters: np.ndarray) -> np.ndarray:
        """Per-example loss [P, B] of `batch` under each of the P adapter vectors."""
        adapters = np.ascontiguousarray(np.atleast_2d(adapters), dtype=np.float32)
        groups = [slice(s, s + self.max_perturbations) for s in range(0, adapters.shape[0], self.max_perturbations)]
        embed, *blocks, head = self.stages
        (hidden,) = self._run_stage(embed, [[batch.input_ids]])
        # Every adapter copy starts from the same embedding: the embedding takes no adapter.
        hiddens = [hidden.unsqueeze(0).expand(len(adapters[g]), *hidden.shape).contiguous() for g in groups]
        for stage in blocks:
            start, stop = stage.adapter
            # A copy of the block's slice (small): torch warns on read-only arrays, and the caller's may be one.
            hiddens = self._run_stage(stage, [[h, batch.attention_mask, torch.from_numpy(
                np.array(adapters[g, start:stop]))] for h, g in zip(hiddens, groups)])
        losses = self._run_stage(head, [[h, batch.labels] for h in hiddens])
        return np.concatenate([loss.numpy() for loss in losses], axis=0)

    def logits(self, batch: Batch, adapter: np.ndarray) -> np.ndarray:
        raise EngineError("a streamed bundle computes losses only (causal LM): it has no predict method")

    def features(self, batch: Batch, adapter: np.ndarray) -> np.ndarray:
        raise EngineError("a streamed bundle computes losses only (causal LM): it has no features method")
