"""The backprop baseline: AdamW on the adapter through eager PyTorch autograd.

Phones cannot afford it (activations and optimizer state); it is here to compare against,
and it answers a task with a dense update through the same round machinery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fwdfed import task_keys as keys
from fwdfed.batch import Batch
from fwdfed.methods.base import Hparam, Method
from fwdfed.methods.estimate import LocalRun, check_positive, hparam
from fwdfed.progress import progress


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
        return cls(lr=hparam(hparams, keys.LR, float), weight_decay=hparam(hparams, keys.WEIGHT_DECAY, float, 0.0))


class Backprop:
    def __init__(self, engine, adapter: np.ndarray, config: BackpropConfig, rng=None, reference=None):
        self.engine, self.config = engine, config  # an EagerEngine: it has autograd
        self.start = np.array(adapter, dtype=np.float32)

    def train(self, batches: list[Batch], steps: int, guard=None) -> LocalRun:
        import torch  # here, not at the top: the registry of methods is read where torch is absent

        w = torch.tensor(self.start, requires_grad=True)
        optimizer = torch.optim.AdamW([w], lr=self.config.lr, weight_decay=self.config.weight_decay)
        run = LocalRun()
        for i in progress(range(steps), desc="local steps", unit="step"):
            optimizer.zero_grad()
            loss = self.engine.mean_loss(batches[i % len(batches)], w)
            loss.backward()
            optimizer.step()
            run.step_losses.append(float(loss))
            if guard:
                guard()
        run.dense = (w.detach().numpy() - self.start).astype(np.float32)
        return run


METHOD = Method(
    name="backprop",
    summary="the baseline phones cannot afford: local AdamW steps through eager PyTorch autograd, dense updates",
    config=BackpropConfig,
    optimizer=Backprop,
    hparams=(Hparam(keys.WEIGHT_DECAY, float, 0.0, "mezo, backprop: decoupled weight decay"),),
    needs_autograd=True,
    passes_per_step=1,  # and a backward pass each
    adapter_copies=lambda directions: 4,  # weights, gradient and AdamW's two moments
)
