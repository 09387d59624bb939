"""Hybrid: the classifier head's exact gradient from the forward features, FZOO on the rest of the adapter.

A linear head's cross-entropy gradient needs no backward pass through the network: with x the
features the head reads (the program's `features` method, one pass), logits = x W^T + b and
p = softmax(logits), the gradient of the batch's mean loss over its real examples (weights a_i) is

    g_i = a_i (p_i - onehot(y_i)) / sum_i a_i        dL/dW = g^T x        dL/db = sum_i g_i

Each local step is one FZOO step (fwdfed.methods.fzoo: n one-sided directions against the shared
L(w), the step divided by their losses' spread) on the body, the adapter without its head, plus
one SGD step on the head at its own learning rate `head_lr`, both from the same w. The directions
keep to the body (the task's block, which the coordinator sets to [0, head_start)), so the seeds
stay the body's upload; the head's change goes up dense, its C (H + 1) values alone (MiniLM on
AG News: 1,540 floats, 6 KB), which the coordinator places at [head_start, head_start + C (H + 1)).
A step costs n + 2 passes: the n + 1 losses and the features.

ZO-EXPERIMENT measured this pairing on SST-2 (MeZO/FZOO on the LoRA, the exact head): the head step
calibrated the loss without an accuracy gain there; this method measures it federated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fwdfed import task_keys as keys
from fwdfed.batch import Batch
from fwdfed.bundle.layout import AdapterLayout
from fwdfed.bundle.tasks import IGNORE_INDEX
from fwdfed.methods.base import Hparam, Method
from fwdfed.methods.class_stats import MAX_CLASSES, MAX_FEATURES, classifier_tensors
from fwdfed.methods.estimate import LocalRun, check_positive, draw_seeds, hparam, scheduled_steps, weighted_mean
from fwdfed.methods.fzoo import FzooConfig, normalised_coefficients
from fwdfed.methods.mezo import SCHEDULE

HEAD_LR = Hparam(keys.HEAD_LR, float, 1e-2, "hybrid: the learning rate of the exact step on the classifier head")


@dataclass(frozen=True, kw_only=True)
class HybridConfig(FzooConfig):
    head_lr: float = 1e-2
    head_start: int
    num_classes: int
    feature_dim: int

    def __post_init__(self):
        super().__post_init__()
        check_positive("head_lr", self.head_lr)
        if not (1 <= self.num_classes <= MAX_CLASSES and 1 <= self.feature_dim <= MAX_FEATURES and self.head_start >= 0):
            raise ValueError(f"the head must have 1 <= num_classes <= {MAX_CLASSES}, 1 <= feature_dim <= "
                             f"{MAX_FEATURES} and head_start >= 0, got {self.num_classes}, {self.feature_dim}, "
                             f"{self.head_start}")
        start, stop = self.head
        if self.block is None or not (self.block[1] <= start or self.block[0] >= stop):
            raise ValueError(f"hybrid's directions must keep off the head [{start}, {stop}): the task's block "
                             f"{self.block} overlaps it or is missing")

    @property
    def head(self) -> tuple[int, int]:
        """The head's span in the adapter: weight [C, H] then bias [C]."""
        return self.head_start, self.head_start + self.num_classes * (self.feature_dim + 1)

    @classmethod
    def from_hparams(cls, hparams: dict) -> "HybridConfig":
        return cls(**cls.step_hparams(hparams), schedule=hparam(hparams, keys.SCHEDULE, str, "constant"),
                   head_lr=hparam(hparams, keys.HEAD_LR, float, HEAD_LR.default),
                   head_start=hparam(hparams, keys.HEAD_START, int), num_classes=hparam(hparams, keys.NUM_CLASSES, int),
                   feature_dim=hparam(hparams, keys.FEATURE_DIM, int))


def head_gradient(features: np.ndarray, weight: np.ndarray, bias: np.ndarray, labels: np.ndarray,
                  weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dL/dW [C, H], dL/db [C]) of L = sum_i a_i CE(x_i W^T + b, y_i) / max(sum_i a_i, 1), float64: the mean the
    device's losses take (fwdfed.methods.estimate.weighted_mean), of the program's per-example loss, which
    reads an ignored label as class 0 (fwdfed.model.loss.token_nll; such rows are filler, of weight 0)."""
    x = features.astype(np.float64)
    logits = x @ weight.astype(np.float64).T + bias.astype(np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(labels)), np.where(labels == IGNORE_INDEX, 0, labels)] -= 1.0
    g = p * (weights.astype(np.float64) / max(float(weights.sum()), 1.0))[:, None]
    return g.T @ x, g.sum(axis=0)


class Hybrid:
    def __init__(self, engine, adapter: np.ndarray, config: HybridConfig, rng: np.random.Generator, reference=None):
        self.engine, self.config, self.rng = engine, config, rng
        self.adapter = np.array(adapter, dtype=np.float32)  # the fp32 master copy
        start, stop = config.head
        if stop > self.adapter.shape[0]:
            raise ValueError(f"the task's head [{start}, {stop}) does not fit the adapter's {self.adapter.shape[0]}")
        self.start_head = self.adapter[start:stop].copy()

    def step(self, batch: Batch, run: LocalRun, lr: float) -> None:
        c = self.config
        seeds = draw_seeds(self.rng, c.directions)
        z = np.stack([c.direction(s, self.adapter.shape[0]) for s in seeds])  # the block, scaled if asked
        adapters = np.concatenate([self.adapter[None, :], self.adapter + c.eps * z])  # [n + 1, d]
        losses = weighted_mean(self.engine.losses(batch, adapters), batch.weights)
        # The head's input at the same w (the master itself goes in: no adapter copy).
        features = self.engine.features(batch, self.adapter)
        start, stop = c.head
        h = c.num_classes * c.feature_dim
        head = self.adapter[start:stop]
        gw, gb = head_gradient(features, head[:h].reshape(c.num_classes, c.feature_dim), head[h:],
                               batch.labels.numpy(), batch.weights)
        coefs = normalised_coefficients(losses, lr)
        if coefs is not None:
            self.adapter = (self.adapter + coefs.astype(np.float32) @ z).astype(np.float32)
            run.add(seeds, coefs)
        grad = np.concatenate([gw.ravel(), gb])
        if np.all(np.isfinite(grad)):  # the head's step follows the body's schedule at its own rate
            self.adapter[start:stop] -= (c.head_lr * lr / c.lr * grad).astype(np.float32)
        run.step_losses.append(float(losses[0]))

    def train(self, batches: list[Batch], steps: int, guard=None) -> LocalRun:
        """`steps` hybrid steps cycling over `batches`; `guard()` after each (the memory budget). The run's
        dense is the head's change within the whole adapter (zero off the head); its span alone goes up."""
        run = scheduled_steps(self.step, batches, steps, self.config.lr, self.config.schedule, guard)
        start, stop = self.config.head
        run.dense = np.zeros_like(self.adapter)
        run.dense[start:stop] = (self.adapter[start:stop].astype(np.float64) - self.start_head).astype(np.float32)
        return run


def head_span(hparams: dict) -> tuple[int, int]:
    """Where a hybrid update's dense part lies in the adapter: the task's head."""
    start, classes, features = (int(hparams[k]) for k in (keys.HEAD_START, keys.NUM_CLASSES, keys.FEATURE_DIM))
    return start, start + classes * (features + 1)


def layout_hparams(layout: AdapterLayout) -> dict:
    """What the coordinator tells every task of a hybrid job: the head's shape and start, and the block the
    directions keep to (the body before it). ValueError where the head is not the adapter's last tensors,
    weight then bias (every exported classifier's is)."""
    weight, bias = classifier_tensors(layout)
    if bias is None or bias.offset != weight.end or bias.end != layout.dim or weight.offset == 0:
        raise ValueError("hybrid needs the classifier's weight then bias as the adapter's last tensors, after the "
                         "rest it perturbs")
    return {keys.NUM_CLASSES: weight.shape[0], keys.FEATURE_DIM: weight.shape[1], keys.HEAD_START: weight.offset,
            keys.BLOCK_START: 0, keys.BLOCK_END: weight.offset}


METHOD = Method(
    name="hybrid",
    summary="FZOO on the adapter without its classifier head, and the head's exact gradient from the features "
            "(one more pass a step, no backward pass); the head's change goes up dense",
    config=HybridConfig,
    optimizer=Hybrid,
    hparams=(SCHEDULE, HEAD_LR),
    default_directions=8,
    passes_per_pair=1,
    passes_per_step=2,  # the shared L(w), and the features at w
    # fzoo's: the master, n directions, the n + 1 vectors of the call; the features pass reads the master
    adapter_copies=lambda n: 2 + 2 * max(1, n),
    dense_span=head_span,
    layout_hparams=layout_hparams,
)
