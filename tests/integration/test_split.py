"""Federated jobs on split programs: devices keep the prefix states and train the top with FZOO."""

from __future__ import annotations

import numpy as np

from benchmarks.compare import sample_rows
from coordinator.store import UpdateRow, open_store
from tests.conftest import SST2, TINYSTORIES
from tests.support.checks import assert_beats_chance
from tests.support.fleet import run_job


def test_a_head_round_then_fzoo_rounds_run_through_the_top(tmp_path, split_bundle):
    """The head from class statistics (round 1, through the top's features), then FZOO rounds on the top, over
    real processes: every version finite, the FZOO rounds moving only the adapter the top reads.

    Not asserted: that the loss falls. On this preset's random weights the class-statistics head is so steep
    that FZOO's steps raise it (after the head, held-out 0.6712 -> 1.0374 at lr 1e-4, and the devices' probe
    losses rise too); the real encoder's figures are in docs/BENCHMARKS.md (SST-2: GLUE dev 73.3% -> 77.4%)."""
    db, out = run_job(tmp_path, split_bundle, SST2, rounds=2, devices=2, eval_examples=128, hparams=[
        "--head-init", "lda", "--method", "fzoo", "--lr", "1e-4", "--eps", "1e-3", "--local-steps", "40",
        "--directions", "4"])
    assert "round 3/3: 2 updates" in out
    with open_store(db).session() as s:
        fzoo = [u for u in s.query(UpdateRow) if u.num_pairs]
    # 40 steps x 4 directions: one pair a direction (the shared point costs a pass but no pair)
    assert len(fzoo) == 4 and {u.num_pairs for u in fzoo} == {160}
    assert all(np.isfinite([u.loss_before, u.loss_after]).all() for u in fzoo)
    store = open_store(db)
    versions = [np.frombuffer(v.vector, "<f4") for v in store.versions(store.latest_job().id)]
    assert len(versions) == 4 and all(np.isfinite(v).all() for v in versions)
    assert not np.array_equal(versions[1], versions[3])  # the FZOO rounds moved the adapter


def test_fzoo_through_the_top_of_the_pretrained_encoder_beats_random_steps(tmp_path, minilm_split_bundle):
    """all-MiniLM-L6-v2's real weights, split at its top block: two FZOO rounds through the top, from the initial
    adapter, lower the held-out loss by more than random steps of the same length do.

    From the class-statistics head instead (round 1 of the headline jobs), this suite's budget does not clear
    the chance bar: 2 devices x 300 steps on 3,600 rows moved the held-out loss 0.4753 -> 0.4652 against
    random-step gains from -0.0999 to 0.0068 (bar 0.0746). The headline's budget does (docs/BENCHMARKS.md)."""
    data = sample_rows(SST2, tmp_path / "sst2_2000.tsv", 2000)
    db, out = run_job(tmp_path, minilm_split_bundle, data, rounds=2, devices=2, eval_examples=200, hparams=[
        "--method", "fzoo", "--lr", "3e-3", "--eps", "1e-3", "--local-steps", "150", "--directions", "4"])
    assert "round 2/2: 2 updates" in out
    assert_beats_chance(minilm_split_bundle, db, data, 200)


def test_fzoo_through_a_causal_lms_top_beats_random_steps(tmp_path, stories_split_bundle):
    """stories260K with LoRA on its top 2 blocks: each device runs the prefix over its shard once, and every
    FZOO pass after it the top alone; the global adapter, scored on held-out text through the whole program,
    beats random steps of the same length."""
    db, out = run_job(tmp_path, stories_split_bundle, TINYSTORIES, rounds=2, devices=2, eval_examples=32, hparams=[
        "--method", "fzoo", "--lr", "1e-2", "--eps", "1e-2", "--local-steps", "30", "--directions", "4"])
    assert "round 2/2: 2 updates" in out
    assert_beats_chance(stories_split_bundle, db, TINYSTORIES, 32)
