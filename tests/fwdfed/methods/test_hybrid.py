"""Hybrid: FZOO on the adapter without its head, the head's exact gradient from the features."""

import numpy as np
import pytest
import torch

from fwdfed import methods
from fwdfed.batch import Batch
from fwdfed.bundle.layout import AdapterLayout
from fwdfed.bundle.tasks import IGNORE_INDEX
from fwdfed.methods.fzoo import normalised_coefficients
from fwdfed.methods.hybrid import Hybrid, HybridConfig, head_gradient, head_span, layout_hparams

BODY, C, H = 12, 3, 5
HEAD = C * (H + 1)


def config(**overrides) -> HybridConfig:
    return HybridConfig(**{"lr": 0.02, "eps": 1e-3, "directions": 4, "head_lr": 0.5, "head_start": BODY,
                           "num_classes": C, "feature_dim": H, "block": (0, BODY), **overrides})


def test_hybrid_is_registered_with_the_features_pass_counted():
    method = methods.get("hybrid")
    # n directions, the shared L(w) and the features: n + 2 passes a step; the update's n pairs a step say n of them
    assert method.forward_passes(16, {"local_steps": 2, "directions": 8}) == 16 + 2 * 2
    assert method.adapter_copies(8) == methods.get("fzoo").adapter_copies(8)  # the features read the master
    assert method.dense_span({"head_start": 100, "num_classes": 4, "feature_dim": 384}) == (100, 100 + 1540)


def test_the_head_gradient_is_autograds_of_the_weighted_mean_cross_entropy():
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((6, H)), 3 * rng.standard_normal((C, H)), rng.standard_normal(C)
    labels = np.array([0, 2, 1, 1, IGNORE_INDEX, 0])
    weights = np.array([1, 1, 1, 1, 0, 0], np.float32)  # the last two rows are filler
    gw, gb = head_gradient(x.astype(np.float32), w, b, labels, weights)
    tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    logits = torch.tensor(x.astype(np.float32), dtype=torch.float64) @ tw.T + tb
    # the program's per-example loss (fwdfed.model.loss.token_nll: an ignored label read as class 0), weighted mean
    nll = -torch.log_softmax(logits, -1).gather(1, torch.tensor(labels).clamp(min=0)[:, None])[:, 0]
    (nll * torch.tensor(weights, dtype=torch.float64)).sum().div(weights.sum()).backward()
    np.testing.assert_allclose(gw, tw.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gb, tb.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_directions_that_could_touch_the_head_are_refused():
    with pytest.raises(ValueError, match="keep off the head"):
        config(block=(0, BODY + 1))
    with pytest.raises(ValueError, match="keep off the head"):
        config(block=None)
    with pytest.raises(ValueError, match="head_lr must be a finite number > 0"):
        config(head_lr=0.0)


class HeadOnFeatures:
    """An engine whose loss is the cross-entropy of a linear head (the adapter's last C (H + 1) values) on fixed
    features, plus 0.5 ||body - target||^2: both parts' ground truth."""

    def __init__(self, rng):
        self.x = rng.standard_normal((8, H)).astype(np.float32)
        self.labels = torch.tensor(rng.integers(0, C, 8))
        self.target = np.ones(BODY)

    def features(self, batch, adapter):
        return self.x

    def losses(self, batch, adapters):
        out = []
        for a in np.atleast_2d(adapters).astype(np.float64):
            w, b = a[BODY : BODY + C * H].reshape(C, H), a[BODY + C * H :]
            logits = torch.tensor(self.x, dtype=torch.float64) @ torch.tensor(w).T + torch.tensor(b)
            ce = torch.nn.functional.cross_entropy(logits, self.labels, reduction="none").numpy()
            out.append(ce + 0.5 * ((a[:BODY] - self.target) ** 2).sum())
        return np.stack(out)


def test_a_run_lowers_both_parts_and_its_pairs_and_head_span_replay_its_adapter():
    engine = HeadOnFeatures(np.random.default_rng(1))
    batch = Batch(None, None, engine.labels, np.ones(8, np.float32))
    start = np.zeros(BODY + HEAD, np.float32)
    optimizer = Hybrid(engine, start, config(), np.random.default_rng(0))
    run = optimizer.train([batch], steps=200)
    body_before, body_after = (0.5 * ((a[:BODY] - 1) ** 2).sum() for a in (start, optimizer.adapter))
    assert body_after < 0.3 * body_before
    head_loss = lambda a: engine.losses(batch, a)[0].mean() - 0.5 * ((a[:BODY] - 1) ** 2).sum()  # noqa: E731
    assert head_loss(optimizer.adapter) < 0.5 * head_loss(start)
    assert len(run.pairs) == 200 * 4
    assert not run.dense[:BODY].any()  # the head's change alone, which is all that goes up
    np.testing.assert_allclose(run.update.apply(start, "rademacher", (0, BODY)), optimizer.adapter, atol=1e-4)


def test_with_per_tensor_scales_the_body_moves_along_the_scaled_directions():
    """A job's --tensor-scale reaches the hybrid's directions as every method's: the pairs replayed with the
    scales, and only with them, give the optimizer's body."""
    from fwdfed.tensor_scale import check_ranges

    engine = HeadOnFeatures(np.random.default_rng(1))
    batch = Batch(None, None, engine.labels, np.ones(8, np.float32))
    start = np.zeros(BODY + HEAD, np.float32)
    scales = check_ranges([[0, 6, 3.0], [6, BODY, 0.25]])
    optimizer = Hybrid(engine, start, config(scales=scales), np.random.default_rng(0))
    run = optimizer.train([batch], steps=20)
    replayed = run.update.apply(start, "rademacher", (0, BODY), scales)
    np.testing.assert_allclose(replayed, optimizer.adapter, atol=1e-5)
    assert not np.allclose(run.update.apply(start, "rademacher", (0, BODY))[:BODY], optimizer.adapter[:BODY], atol=1e-5)


def test_one_step_is_fzoos_on_the_body_and_sgd_on_the_head_from_the_same_point():
    engine = HeadOnFeatures(np.random.default_rng(2))
    batch = Batch(None, None, engine.labels, np.ones(8, np.float32))
    start = np.random.default_rng(3).standard_normal(BODY + HEAD).astype(np.float32)
    c = config()
    optimizer = Hybrid(engine, start, c, np.random.default_rng(5))
    run = optimizer.train([batch], steps=1)
    from fwdfed.directions import block_direction

    z = np.stack([block_direction(s, BODY + HEAD, c.kind, c.block) for s, _ in run.pairs])
    losses = engine.losses(batch, np.concatenate([start[None], start + c.eps * z])).mean(axis=1)
    np.testing.assert_allclose([k for _, k in run.pairs], normalised_coefficients(losses, c.lr), rtol=1e-6)
    gw, gb = head_gradient(engine.x, start[BODY : BODY + C * H].reshape(C, H), start[BODY + C * H :],
                           engine.labels.numpy(), batch.weights)
    np.testing.assert_allclose(optimizer.adapter[BODY:], start[BODY:] - c.head_lr * np.concatenate([gw.ravel(), gb]),
                               rtol=1e-5, atol=1e-6)


def test_the_coordinator_finds_the_head_at_the_end_of_the_layout_or_refuses():
    layout = AdapterLayout.from_shapes([("lora_A.weight", (2, 6)), ("classifier.modules_to_save.default.weight", (C, H)),
                                        ("classifier.modules_to_save.default.bias", (C,))])
    hparams = layout_hparams(layout)
    assert hparams == {"num_classes": C, "feature_dim": H, "head_start": 12, "block_start": 0, "block_end": 12}
    assert head_span(hparams) == (12, 12 + HEAD) and head_span(hparams)[1] == layout.dim
    HybridConfig.from_hparams(hparams | {"lr": 1e-3, "eps": 1e-3})
    head_first = AdapterLayout.from_shapes([("classifier.modules_to_save.default.weight", (C, H)),
                                            ("classifier.modules_to_save.default.bias", (C,)), ("lora_A.weight", (2, 6))])
    with pytest.raises(ValueError, match="adapter's last tensors"):
        layout_hparams(head_first)
