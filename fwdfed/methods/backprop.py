"""The backprop baseline: AdamW on the adapter through eager PyTorch autograd.

Phones cannot afford it (activations and optimizer state); it is here to compare against,
and it answers a task with a dense update through the same round machinery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fwdfed.batch import Batch
from fwdfed.methods.estimate import LocalRun, check_positive, hparam


@dataclass(frozen=True)
class BackpropConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    kind: str = "rademacher"  # unused (no directions), kept so every method's config has one
    block: tuple[int, int] | None = None

    def __post_init__(self):
        check_positive("lr", self.lr)
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")

    @classmethod
    def from_hparams(cls, hparams: dict) -> "BackpropConfig":
        return cls(lr=hparam(hparams, "lr", float), weight_decay=hparam(hparams, "weight_decay", float, 0.0))


class Backprop:
    def __init__(self, engine, adapter: np.ndarray, config: BackpropConfig, rng=None, reference=None):
        self.engine, self.config = engine, config  # an EagerEngine: it has autograd
        self.start = np.array(adapter, dtype=np.float32)

    def train(self, batches: list[Batch], steps: int, guard=None) -> LocalRun:
        w = torch.tensor(self.start, requires_grad=True)
        optimizer = torch.optim.AdamW([w], lr=self.config.lr, weight_decay=self.config.weight_decay)
        run = LocalRun()
        for i in range(steps):
            optimizer.zero_grad()
            loss = self.engine.mean_loss(batches[i % len(batches)], w)
            loss.backward()
            optimizer.step()
            run.step_losses.append(float(loss))
            if guard:
                guard()
        run.dense = (w.detach().numpy() - self.start).astype(np.float32)
        return run
