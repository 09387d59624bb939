"""A program that really crashes the ExecuTorch runtime: corruption 258 of benchmarks.signed_fuzz's generator,
seed 0, on the `tiny_llama_bundle` fixture's program (a segfault on load; benchmarks.isolated_fuzz found it).
For the Java device, which reads only the stories260K bundle's tokenizer and runs only `forward`: corruption
184 of the `stories_bundle` fixture's program (a segfault in `forward` in every one of 11 tries of the Java
device's probe here; benchmarks.isolated_fuzz on that bundle found it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.signed_fuzz import corrupt

CRASHING_INDEX, CRASHING_SEED = 258, 0
STORIES_CRASHING_INDEX = 184


def crashing_program(bundle: Path, index: int = CRASHING_INDEX) -> bytes:
    program, rng = (bundle / "model.pte").read_bytes(), np.random.default_rng(CRASHING_SEED)
    for _ in range(index):
        corrupt(program, rng)
    return corrupt(program, rng)


def segfault_the_child(monkeypatch) -> None:
    """Make the forked child that checks a program die by a real SIGSEGV, whatever the program. The corrupted
    program above crashes the runtime only where its out-of-range read lands outside the process's memory,
    which varies from run to run; the checks of what follows a crash need one every time."""
    import os
    import signal

    monkeypatch.setattr("runtime.isolation.exercise", lambda bundle: os.kill(os.getpid(), signal.SIGSEGV))
