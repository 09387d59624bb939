"""Held-out evaluation: a classifier's loss and accuracy from one predict call a batch."""

import numpy as np

from fwdfed.bundle.manifest import load_bundle
from fwdfed.methods.estimate import mean_loss
from runtime.evaluate import Evaluator
from tests.conftest import SST2, away_from_init


def test_a_classifiers_loss_from_its_logits_is_the_programs_loss(split_bundle):
    bundle = load_bundle(split_bundle)
    evaluate = Evaluator(bundle, SST2, 30)
    adapter = away_from_init(bundle)
    figures = evaluate(adapter)
    assert abs(figures["heldout_loss"] - mean_loss(evaluate.engine, evaluate.batches, adapter)) < 1e-5
    correct = sum(float(((evaluate.engine.logits(b, adapter).argmax(-1) == b.labels.numpy()) * b.weights).sum())
                  for b in evaluate.batches)
    assert figures["heldout_accuracy"] == correct / 30 and evaluate.num_examples == 30
    assert np.isfinite(figures["heldout_loss"])
