"""Offsite tuning through real processes: devices train on the emulator, the coordinator evaluates
every version on the full model and exports the adapter as a peft folder for the full model."""

import numpy as np
import pytest

from coordinator.store import open_store
from fwdfed.bundle.manifest import load_bundle
from runtime.evaluate import Evaluator
from tests.conftest import TINYSTORIES, run_command
from tests.support.checks import assert_peft_folder_matches_program
from tests.support.fleet import Coordinator, emulate


def test_job_on_the_emulator_is_evaluated_and_exported_on_the_full_model(tmp_path, offsite_bundles):
    emulator, full = offsite_bundles
    db = tmp_path / "job.db"
    coordinator = Coordinator(db, "--bundle", str(emulator), "--eval-bundle", str(full), "--eval-data",
                              str(TINYSTORIES), "--eval-examples", "16", "--rounds", "1", "--devices-per-round", "2",
                              "--local-steps", "10", "--lr", "1e-3")
    try:
        devices = emulate(coordinator.url, emulator, TINYSTORIES, 2)
        code, out, err = coordinator.wait()
    finally:
        coordinator.kill()
    assert devices.returncode == 0 and code == 0, err[-3000:]
    assert "held-out metrics on the full model" in out
    store = open_store(db)
    job = store.latest_job()
    versions = [np.frombuffer(v.vector, "<f4") for v in store.versions(job.id)]
    logged = [m.value for m in store.metrics(job.id) if m.name == "heldout_loss"]
    on_full = Evaluator(load_bundle(full), TINYSTORIES, 16)
    on_emulator = Evaluator(load_bundle(emulator), TINYSTORIES, 16)
    assert len(versions) == 2 and not np.array_equal(versions[0], versions[1])
    assert logged == pytest.approx([on_full(v)["heldout_loss"] for v in versions], rel=1e-5)
    assert abs(logged[0] - on_emulator(versions[0])["heldout_loss"]) > 1e-2  # not the emulator's figure
    # The adapter for the full model (the default), loaded with PeftModel.from_pretrained on it.
    run_command("coordinator", "export-adapter", "--db", str(db), "--out", str(tmp_path / "full"), check=True)
    assert_peft_folder_matches_program(full, tmp_path / "full", versions[-1])
    run_command("coordinator", "export-adapter", "--db", str(db), "--on", "emulator", "--out",
                str(tmp_path / "emulator"), check=True)
    assert_peft_folder_matches_program(emulator, tmp_path / "emulator", versions[-1])


def test_a_full_bundle_that_is_not_the_emulators_is_refused(tmp_path, offsite_bundles):
    emulator, full = offsite_bundles
    swapped = run_command("coordinator", "serve", "--db", str(tmp_path / "a.db"), "--auth", "none", "--bundle",
                          str(full), "--eval-bundle", str(emulator))
    assert swapped.returncode == 2 and "Traceback" not in swapped.stderr
    assert "the training bundle is not an emulator" in swapped.stderr
    itself = run_command("coordinator", "serve", "--db", str(tmp_path / "b.db"), "--auth", "none", "--bundle",
                         str(emulator), "--eval-bundle", str(emulator))
    assert itself.returncode == 2 and "is not the full model this emulator was made from" in itself.stderr
