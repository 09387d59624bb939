"""A program that really crashes the ExecuTorch runtime: corruption 258 of benchmarks.signed_fuzz's generator,
seed 0, on the `tiny_llama_bundle` fixture's program (a segfault on load; benchmarks.isolated_fuzz found it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.signed_fuzz import corrupt

CRASHING_INDEX, CRASHING_SEED = 258, 0


def crashing_program(bundle: Path) -> bytes:
    program, rng = (bundle / "model.pte").read_bytes(), np.random.default_rng(CRASHING_SEED)
    for _ in range(CRASHING_INDEX):
        corrupt(program, rng)
    return corrupt(program, rng)
