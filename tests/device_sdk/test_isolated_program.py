"""A device whose program crashed the child that tried it declines each task in one line, and loads the
bundle once the operator has replaced it (unless the replacement takes other shapes)."""

from __future__ import annotations

import shutil

import pytest

from device_sdk.program import DeviceProgram, ProgramUnavailable
from fwdfed.bundle.manifest import load_bundle
from tests.device_sdk.test_hostile_input import device_config, edit_manifest, install_program
from tests.support.crashing import crashing_program, segfault_the_child


@pytest.fixture
def crashed(tmp_path, tiny_llama_bundle, monkeypatch):
    folder = shutil.copytree(tiny_llama_bundle, tmp_path / "bundle")
    install_program(folder, crashing_program(folder))
    program = DeviceProgram(device_config(folder), load_bundle(folder), None)
    segfault_the_child(monkeypatch)  # its crash is not certain on every run (tests/support/crashing.py)
    assert program.load() is None and "(killed by SIGSEGV): not loaded" in program.crashed
    return folder, program


def test_each_task_is_declined_until_the_bundle_is_replaced(crashed, tiny_llama_bundle, monkeypatch):
    folder, program = crashed
    with pytest.raises(ProgramUnavailable) as declined:
        program.for_task("t-1")
    assert str(declined.value) == f"task t-1: {program.crashed}" and "\n" not in str(declined.value)
    monkeypatch.undo()  # the child checks the real program from here
    for name in ("model.pte", "manifest.json"):  # the operator puts the good bundle back
        shutil.copy(tiny_llama_bundle / name, folder / name)
    engine = program.for_task("t-2")
    assert engine is not None and program.crashed is None and program.for_task("t-3") is engine


def test_a_replacement_of_other_shapes_is_declined_with_restart(crashed, tiny_llama_bundle):
    folder, program = crashed
    for name in ("model.pte", "manifest.json"):
        shutil.copy(tiny_llama_bundle / name, folder / name)
    edit_manifest(folder, lambda m: m["inputs"].update(batch_size=m["inputs"]["batch_size"] + 1))
    with pytest.raises(ProgramUnavailable, match="^task t-1: the bundle .* was replaced by one of other shapes "
                                                 r"\(model, adapter, inputs or classes\) than this device set up "
                                                 "for: restart the device$"):
        program.for_task("t-1")
    assert program.engine is None
