"""Checks that a trained adapter really learned and really loads: shared by the integration tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.job import gain_against_chance
from coordinator.store import open_store
from coordinator.strategies import AcceptedUpdate
from fwdfed.bundle.manifest import load_bundle
from tests.conftest import SST2, TINYSTORIES


def assert_beats_chance(bundle_dir: Path, db: Path, data: Path, eval_examples: int, controls: int = 8) -> dict:
    """The trained adapter's held-out loss must beat the start by more than a random step of the
    same length does: chance alone moves the loss by the spread of those controls."""
    r = gain_against_chance(bundle_dir, db, data, eval_examples, controls)
    store = open_store(db)
    job = store.latest_job()
    assert len(store.versions(job.id)) == job.rounds + 1
    start_loss, final_loss, chance = r["heldout_loss_start"], r["heldout_loss_final"], r["random_step_gains"]
    print(f"held-out loss {start_loss:.4f} -> {final_loss:.4f} (gain {r['gain']:.4f}); "
          f"random steps of the same length: gains {np.round(chance, 4).tolist()}")
    assert r["gain"] > r["chance_bar"], f"gain {r['gain']:.4f} is within chance (bar {r['chance_bar']:.4f})"
    # The coordinator's own per-round figures agree with a fresh evaluation.
    logged = [m.value for m in store.metrics(job.id) if m.name == "heldout_loss"]
    assert logged[0] == pytest.approx(start_loss, rel=1e-5) and logged[-1] == pytest.approx(final_loss, rel=1e-5)
    return {"start": start_loss, "final": final_loss, "chance": chance}


def assert_versions_are_aggregates(store, job, strategy) -> list:
    """Every version is exactly the aggregation of the previous one with its round's stored updates, by `strategy`
    (the job's own rule): what an uninterrupted run given the same updates would have published, so that no
    update was counted twice or left out. Returns the closed rounds, in order, each with its updates as the rule
    read them: [(round, version before, updates)]."""
    closed = store.closed_round_list(job.id)
    versions = store.versions(job.id)
    assert [v.version for v in versions] == list(range(len(closed) + 1))
    assert [v.round_id for v in versions[1:]] == [r.id for r in closed]
    checked = []
    for r, before, after in zip(closed, versions, versions[1:]):
        base = np.frombuffer(before.vector, "<f4")
        updates = [AcceptedUpdate.from_row(u) for u in store.updates(r.id)]
        np.testing.assert_array_equal(strategy.aggregate(base, updates), np.frombuffer(after.vector, "<f4"))
        checked.append((r, base, updates))
    return checked


def assert_peft_folder_matches_program(bundle_dir: Path, peft_folder: Path, vector: np.ndarray) -> None:
    """Load the written adapter the way a user would (peft, or BitFit's safetensors) and compare
    the eager loss with the .pte's on real text."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from fwdfed.bundle.tasks import CAUSAL_LM
    from fwdfed.model.loss import labels_for, per_example_loss
    from runtime.data import encode, read_examples
    from runtime.engine import ProgramEngine
    from runtime.evaluate import load_tokenizer

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    if m.task == CAUSAL_LM:
        base, data = AutoModelForCausalLM.from_pretrained(bundle.base_model_path), TINYSTORIES
    else:
        base = AutoModelForSequenceClassification.from_pretrained(bundle.base_model_path, num_labels=m.model.num_labels)
        data = SST2
    if m.adapter.peft_config is not None:  # LoRA, prompt learning
        model = PeftModel.from_pretrained(base, peft_folder).eval()
    else:
        missing, unexpected = base.load_state_dict(load_file(peft_folder / "bitfit.safetensors"), strict=False)
        assert not unexpected
        model = base.eval()
    batch = encode(load_tokenizer(bundle), read_examples(data)[:8], m.task, m.inputs.batch_size,
                   m.inputs.seq_len)[0]
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    eager = per_example_loss(logits, labels_for(logits, batch.labels, m.task), m.task).numpy()
    program = ProgramEngine(bundle.program_path, m.inputs.max_perturbations).losses(batch, vector)[0]
    np.testing.assert_allclose(program, eager, rtol=1e-4, atol=1e-5)
