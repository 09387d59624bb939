"""A program tried in a forked child first: a real one is checked there and then loaded; one that
crashes the runtime kills the child, is refused in one line, and this process (the device) lives on."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from fwdfed.bundle.manifest import load_bundle
from runtime.executorch import EngineError
from runtime.isolation import CRASHED, ERROR, OK, ProgramCrashed, check_in_child, load_engine
from tests.conftest import program_and_batches
from tests.device_sdk.test_hostile_input import corrupt, install_program
from tests.support.crashing import crashing_program, segfault_the_child


def test_a_real_program_is_checked_in_a_child_then_loaded(tiny_llama_bundle):
    bundle = load_bundle(tiny_llama_bundle)
    verdict = check_in_child(bundle)
    assert (verdict.outcome, verdict.detail) == (OK, "") and verdict.child_peak_rss > 0
    engine = load_engine(bundle, isolate=True)
    m, (_, _, batches) = bundle.manifest, program_and_batches(tiny_llama_bundle, 2)
    adapters = np.tile(bundle.initial_adapter(), (m.inputs.max_perturbations, 1))
    assert engine.losses(batches[0], adapters).shape == (m.inputs.max_perturbations, m.inputs.batch_size)


def test_a_program_that_crashes_the_runtime_kills_the_child_not_this_process(tmp_path, tiny_llama_bundle,
                                                                            monkeypatch):
    folder = shutil.copytree(tiny_llama_bundle, tmp_path / "bundle")
    install_program(folder, crashing_program(folder))
    bundle = load_bundle(folder)  # its sha256 matches: only running it tells
    segfault_the_child(monkeypatch)  # its crash is not certain on every run (tests/support/crashing.py)
    pid = os.getpid()
    verdict = check_in_child(bundle)
    assert (verdict.outcome, verdict.detail) == (CRASHED, "killed by SIGSEGV"), verdict
    with pytest.raises(ProgramCrashed) as refused:
        load_engine(bundle, isolate=True)
    assert str(refused.value) == (f"the program {folder}/model.pte crashed the ExecuTorch runtime in the child process "
                                  "that tried it (killed by SIGSEGV): not loaded")
    assert os.getpid() == pid  # still this process, which goes on to run a real program
    monkeypatch.undo()
    assert check_in_child(load_bundle(tiny_llama_bundle)).outcome == OK


def test_a_program_the_runtime_refuses_is_the_same_line_in_a_child(tmp_path, tiny_llama_bundle):
    folder = shutil.copytree(tiny_llama_bundle, tmp_path / "bundle")
    install_program(folder, corrupt((folder / "model.pte").read_bytes(), "truncated"))
    bundle = load_bundle(folder)
    verdict = check_in_child(bundle)
    assert verdict.outcome == ERROR and verdict.detail.startswith("cannot load the ExecuTorch program: "), verdict
    with pytest.raises(EngineError) as in_child:
        load_engine(bundle, isolate=True)
    with pytest.raises(EngineError) as in_process:
        load_engine(bundle, isolate=False)
    assert type(in_child.value) is EngineError and str(in_child.value) == str(in_process.value)
