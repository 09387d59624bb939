import random

import numpy as np
import pytest

from coordinator.lr_strategies import STRATEGIES, client_lrs

DEVICES = ["a", "b", "c", "new"]
LOSSES = {"a": [3.0, 2.0], "b": [3.0, 1.0], "c": [3.0, 3.0, 2.5, 2.5, 2.5, 2.5]}
DELTAS = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 0.0]), "c": np.array([0.0, 0.2])}


def lrs(strategy):
    return client_lrs(strategy, 1e-3, 5e-4, DEVICES, LOSSES, DELTAS, random.Random(0))


def test_frozen_and_devices_without_history_get_eta0():
    assert set(lrs("frozen").values()) == {1e-3}
    for strategy in STRATEGIES:
        assert lrs(strategy)["new"] == pytest.approx(1e-3) or strategy == "random"


def test_random_stays_within_the_spread():
    assert all(5e-4 <= v <= 1.5e-3 for v in lrs("random").values())


def test_round_wise_gives_the_highest_loss_the_largest_step():
    out = lrs("round-wise")  # last losses a 2.0, b 1.0, c 2.5: centred 1/6, -5/6, 2/3; max |d| = 5/6
    assert out["b"] == pytest.approx(1e-3 - 5e-4) and out["c"] == pytest.approx(1e-3 + 5e-4 * 0.8)
    assert out["b"] < out["a"] < out["c"]


def test_five_round_needs_five_rounds_of_history():
    out = lrs("five-round")
    assert out["a"] == out["b"] == out["new"] == pytest.approx(1e-3)  # only c has 5 rounds: it is its own mean
    assert out["c"] == pytest.approx(1e-3)


def test_model_diff_gives_the_outlying_update_the_largest_step():
    out = lrs("model-diff")
    assert out["a"] == pytest.approx(1.5e-3) and out["a"] > out["c"] and out["a"] > out["b"]


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown lr strategy"):
        lrs("adaptive")
