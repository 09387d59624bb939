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


def segfault_the_child(monkeypatch) -> None:
    """Make the forked child that checks a program die by a real SIGSEGV, whatever the program. The corrupted
    program above crashes the runtime only where its out-of-range read lands outside the process's memory,
    which varies from run to run; the checks of what follows a crash need one every time."""
    import os
    import signal

    monkeypatch.setattr("runtime.isolation.exercise", lambda bundle: os.kill(os.getpid(), signal.SIGSEGV))
