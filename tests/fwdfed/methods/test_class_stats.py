"""Class statistics and the LDA head: the device's sums, and the coordinator's closed form."""

import numpy as np
import pytest
import torch

from fwdfed.batch import Batch
from fwdfed.bundle.layout import AdapterLayout
from fwdfed.methods import get
from fwdfed.methods.class_stats import ClassStats, ClassStatsConfig, aggregate, lda_head, round_hparams, stats_length


class FixedFeatures:
    """An engine whose features are given: the statistics' ground truth."""

    def __init__(self, features):
        self.rows = iter(features)

    def features(self, batch, adapter):
        return next(self.rows)


def test_a_device_sums_features_counts_and_outer_products_of_its_real_examples():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    batch = Batch(None, None, torch.tensor([0, 1, 1, 0]), np.array([1, 1, 1, 0], np.float32))  # the last is filler
    run = ClassStats(FixedFeatures([x]), np.zeros(5), ClassStatsConfig(num_classes=2, feature_dim=3)).train([batch], 1)
    sums, counts, outer = run.dense[:6].reshape(2, 3), run.dense[6:8], run.dense[8:].reshape(3, 3)
    np.testing.assert_array_equal(sums, [x[0], x[1] + x[2]])
    np.testing.assert_array_equal(counts, [1, 2])
    np.testing.assert_array_equal(outer, x[:3].T @ x[:3])
    assert len(run.dense) == stats_length({"num_classes": 2, "feature_dim": 3})


def test_with_a_teacher_examples_count_by_their_distillation_targets_and_unlabelled_ones_too():
    from fwdfed.bundle.tasks import IGNORE_INDEX
    from fwdfed.methods.fedkd import soft_targets

    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    labels = torch.tensor([0, IGNORE_INDEX, 1, IGNORE_INDEX])
    plain = ClassStats(FixedFeatures([x]), np.zeros(5), ClassStatsConfig(num_classes=2, feature_dim=3)).train(
        [Batch(None, None, labels, np.ones(4, np.float32))], 1)
    np.testing.assert_array_equal(plain.dense[6:8], [1, 1])  # without a teacher the unlabelled rows count nowhere
    np.testing.assert_array_equal(plain.dense[8:].reshape(3, 3), x[[0, 2]].T @ x[[0, 2]])
    teacher = np.array([[0.0, 2.0], [1.0, -1.0], [0.5, 0.5], [3.0, 0.0]], np.float32)
    batch = Batch(None, None, labels, np.array([1, 1, 1, 0], np.float32), teacher_logits=teacher)  # the last: filler
    hparams = {"num_classes": 2, "feature_dim": 3, "teacher_sha256": "ab" * 32, "kd_weight": 0.25,
               "kd_temperature": 2.0}
    run = ClassStats(FixedFeatures([x]), np.zeros(5), ClassStatsConfig.from_hparams(hparams)).train([batch], 1)
    q = soft_targets(labels.numpy()[:3], teacher[:3], 0.25, 2.0)
    softmax = np.exp(teacher / 2) / np.exp(teacher / 2).sum(1, keepdims=True)
    np.testing.assert_allclose(q[0], 0.75 * np.array([1, 0]) + 0.25 * softmax[0])
    np.testing.assert_allclose(q[1], softmax[1])  # the teacher's alone
    np.testing.assert_allclose(run.dense[:6].reshape(2, 3), q.T @ x[:3], rtol=1e-6)
    np.testing.assert_allclose(run.dense[6:8], q.sum(0), rtol=1e-6)
    np.testing.assert_allclose(run.dense[8:].reshape(3, 3), x[:3].T @ x[:3], rtol=1e-6)
    with pytest.raises(ValueError, match="has not been given a teacher bundle"):
        ClassStats(FixedFeatures([x]), np.zeros(5), ClassStatsConfig.from_hparams(hparams)).train(
            [Batch(None, None, labels, np.ones(4, np.float32))], 1)
    with pytest.raises(ValueError, match="kd_weight must be in"):
        ClassStatsConfig.from_hparams(hparams | {"kd_weight": 2.0})


def stats_of(x, y, c):
    return np.concatenate([np.stack([x[y == k].sum(0) for k in range(c)]).ravel(),
                           np.bincount(y, minlength=c).astype(float), (x.T @ x).ravel()])


def test_the_lda_head_of_pooled_device_statistics_separates_gaussian_classes():
    rng = np.random.default_rng(0)
    c, h, n = 3, 5, 3000
    means = rng.normal(0, 1.0, (c, h))
    mix = rng.normal(0, 1, (h, h)) / np.sqrt(h)  # a shared, non-diagonal covariance
    y = rng.integers(0, c, n)
    x = means[y] + rng.normal(0, 1, (n, h)) @ mix
    halves = [stats_of(x[:1000], y[:1000], c), stats_of(x[1000:], y[1000:], c)]  # two devices
    w, b, seen = lda_head(halves, c, h, shrinkage=0.0)
    assert seen.all()
    accuracy = ((x @ w.T + b).argmax(1) == y).mean()
    exact = np.linalg.solve(mix.T @ mix, means.T).T  # the Bayes direction for a shared covariance
    cosine = (w * exact).sum(1) / np.linalg.norm(w, axis=1) / np.linalg.norm(exact, axis=1)
    assert accuracy > 0.8 and cosine.min() > 0.97


def test_the_head_is_written_into_the_classifier_only():
    layout = AdapterLayout.from_shapes([("encoder.lora_A.weight", (2, 4)), ("classifier.weight", (2, 3)),
                                        ("classifier.bias", (2,))])
    hparams = round_hparams(layout, shrinkage=0.1)
    assert (hparams["num_classes"], hparams["feature_dim"]) == (2, 3)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(50, 3)), rng.integers(0, 2, 50)
    start = np.full(layout.dim, 7.0, np.float32)
    new = aggregate(start, [stats_of(x, y, 2).astype(np.float32)], hparams, layout)
    assert (new[:8] == 7.0).all() and not np.allclose(new[8:], 7.0)
    assert get("class-stats").dense_length(hparams) == 2 * 3 + 2 + 9


def test_a_layout_without_a_classifier_is_refused():
    with pytest.raises(ValueError, match="no trained classifier"):
        round_hparams(AdapterLayout.from_shapes([("encoder.lora_A.weight", (2, 4))]), 0.1)


def test_its_forward_passes_are_one_per_batch_of_the_devices_data():
    from fwdfed import methods

    stats, mezo = methods.get("class-stats"), methods.get("mezo")
    assert stats.forward_passes(0, {"local_steps": 1}, num_examples=100, batch_size=16) == 7
    assert mezo.forward_passes(40, {"local_steps": 20}, num_examples=100, batch_size=16) == 80  # pairs only
