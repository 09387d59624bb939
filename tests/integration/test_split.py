"""A federated job on a split program: devices keep the prefix states and train the top with FZOO."""

from __future__ import annotations

from coordinator.store import UpdateRow, open_store
from tests.conftest import SST2
from tests.support.checks import assert_beats_chance
from tests.support.fleet import run_job


def test_fzoo_on_the_top_blocks_beats_random_steps_of_the_same_length(tmp_path, split_bundle):
    db, out = run_job(tmp_path, split_bundle, SST2, rounds=2, devices=2, eval_examples=128, hparams=[
        "--method", "fzoo", "--lr", "1e-2", "--eps", "1e-3", "--local-steps", "40", "--directions", "4"])
    assert "round 2/2: 2 updates" in out
    assert_beats_chance(split_bundle, db, SST2, 128)
    with open_store(db).session() as s:
        updates = s.query(UpdateRow).all()
    # 40 steps x 4 directions: one pair a direction, the shared point costs a pass but no pair
    assert len(updates) == 4 and {u.num_pairs for u in updates} == {160}
    assert all(u.loss_after < u.loss_before for u in updates)
