"""The prefix states of a split program, computed once per example and kept on disk.

A bundle exported with `--adapter-blocks top:K` has a `prefix` method (the embeddings and the
frozen blocks) and a `top` method (the adapted blocks, head and loss; fwdfed.model.split). What
the prefix computes cannot change while the adapter trains, so a device runs it once over its
shard, before its first training step, and every forward-only pass after that runs the top alone.
The states are kept float16 in one memory-mapped file ([batches, B, L, H]): the memory plan counts
the file whole (`fwdfed.memory_plan.prefix_state_bytes`), and the pages the steps do not touch stay
on disk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fwdfed.batch import Batch


@dataclass(frozen=True)
class PrefixCache:
    path: Path
    bytes: int
    seconds: float
    passes: int  # prefix calls, one batch each


def cache_prefix_states(engine, batches: list[Batch], folder: Path) -> PrefixCache:
    """Run the prefix over `batches`, write the states to `folder`/prefix_states.npy and give each batch
    its row of the memory-mapped file as `prefix_states`."""
    started = time.perf_counter()
    first = engine.prefix_states(batches[0])
    path = Path(folder) / "prefix_states.npy"
    states = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(len(batches), *first.shape))
    for i, batch in enumerate(batches):
        states[i] = first if i == 0 else engine.prefix_states(batch)
    states.flush()
    for i, batch in enumerate(batches):
        batch.prefix_states = states[i]
    return PrefixCache(path, int(states.nbytes), time.perf_counter() - started, len(batches))
