"""Offsite tuning's export: the emulator bundle and the full model's, one adapter layout; the
emulator's .pte is the full model without its dropped blocks; bad options are refused before
anything is written."""

import numpy as np
import pytest
import torch

from fwdfed.bundle.manifest import load_bundle
from fwdfed.model.emulator import block_list, check_pair, full_layout, layout_sha256
from tests.conftest import STORIES, away_from_init, program_and_batches, run_command


def test_emulator_and_full_bundles_share_the_adapter_layout(offsite_bundles):
    emulator, full = (load_bundle(b) for b in offsite_bundles)
    model = offsite_bundles[1].parent / "model"  # the 3-block full model the pair was exported from
    record = emulator.manifest.emulator
    assert (record.kept_layers, record.dropped_layers, record.adapter_layers) == ([0, 2], [1], [0, 2])
    assert record.full_bundle == {"path": str(offsite_bundles[1].resolve()), "source": str(model.resolve()),
                                  "base_model_hash": full.manifest.base_model_hash,
                                  "program_sha256": full.manifest.program.sha256,
                                  "layout_sha256": layout_sha256(full.manifest.layout)}
    assert check_pair(emulator.manifest, full.manifest, offsite_bundles[1]) == record
    assert full_layout(record, emulator.manifest.layout) == full.manifest.layout
    # LoRA on the full model's first and last blocks only, and the same initial vector in both.
    assert {t.name.split(".")[4] for t in full.manifest.layout.tensors} == {"0", "2"}
    np.testing.assert_array_equal(emulator.initial_adapter(), full.initial_adapter())
    assert emulator.manifest.model.source == f"{model.resolve()} emulator (blocks 0, 2 of 3)"
    assert emulator.manifest.model.base_parameters < full.manifest.model.base_parameters
    for bundle in (emulator, full):
        assert bundle.manifest.verification["loss_max_abs_diff"] < 1e-4
    assert full.manifest.emulator is None


def test_emulator_program_is_the_full_model_without_its_dropped_blocks(offsite_bundles):
    """The emulator's .pte against eager peft on the full model with block 1 taken out, on real text."""
    from fwdfed.model.loss import labels_for, per_example_loss
    from fwdfed.model.peft_adapter import peft_model_with

    emulator, engine, batches = program_and_batches(offsite_bundles[0], 2)
    full, full_engine, _ = program_and_batches(offsite_bundles[1], 0)
    vector = away_from_init(full)
    model = peft_model_with(full, vector)
    hf = model.get_base_model()
    path, blocks = block_list(hf)
    parent, name = path.rsplit(".", 1)
    setattr(hf.get_submodule(parent), name, torch.nn.ModuleList([blocks[i] for i in (0, 2)]))
    hf.config.num_hidden_layers = 2
    batch = batches[0]
    with torch.no_grad():  # no cache: the kept blocks keep their full-model indices
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    eager = per_example_loss(logits, labels_for(logits, batch.labels, emulator.manifest.task), emulator.manifest.task)
    program = engine.losses(batch, vector)[0]
    np.testing.assert_allclose(program, eager.numpy(), rtol=1e-4, atol=1e-5)
    # ... and not the full model: the two programs give the same vector different losses.
    assert np.max(np.abs(full_engine.losses(batch, vector)[0] - program)) > 1e-2


@pytest.mark.parametrize("flags, message", [
    (["--emulator", "drop-layers", "--drop-fraction", "1"], "--drop-fraction must be in [0, 1)"),
    (["--emulator", "drop-layers", "--keep-first", "3", "--keep-last", "2"], "leave none of the model's 5 blocks"),
    (["--emulator", "drop-layers", "--adapter", "bitfit"], "takes --adapter lora only"),
    (["--keep-first", "2"], "--keep-first needs --emulator drop-layers"),
])
def test_bad_emulator_options_are_refused_before_anything_is_written(tmp_path, flags, message):
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} is not here")
    result = run_command("export", "--model", str(STORIES), "--out", str(tmp_path / "emu"), *flags)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr
    assert not (tmp_path / "emu").exists() and not (tmp_path / "emu-full").exists()
