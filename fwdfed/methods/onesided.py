"""One-sided MeZO: forward differences against one shared evaluation at w.

    g_k = (L(w + eps z_k) - L(w)) / eps                     k = 1..n
    w  <- w - lr * sum_k g_k z_k / n

One program call evaluates w and the n perturbed copies (P = n + 1 adapter vectors), so n
directions cost n + 1 forward passes instead of MeZO's 2n, at the price of an O(eps) bias
(central differences are O(eps^2)). The estimator of Nesterov & Spokoiny's random
gradient-free method; the upload is MeZO's: every step's (seed, -lr g_k / n).

This module is the worked example of docs/methods.md: a new forward-only method is this
one file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fwdfed.batch import Batch
from fwdfed.methods.base import Method
from fwdfed.methods.estimate import LocalRun, StepConfig, draw_seeds, weighted_mean


@dataclass(frozen=True, kw_only=True)
class OneSidedConfig(StepConfig):
    @classmethod
    def from_hparams(cls, hparams: dict) -> "OneSidedConfig":
        return cls(**cls.step_hparams(hparams))


class OneSided:
    def __init__(self, engine, adapter: np.ndarray, config: OneSidedConfig, rng: np.random.Generator, reference=None):
        self.engine, self.config, self.rng = engine, config, rng
        self.adapter = np.array(adapter, dtype=np.float32)

    def train(self, batches: list[Batch], steps: int, guard=None) -> LocalRun:
        c, run = self.config, LocalRun()
        for i in range(steps):
            batch = batches[i % len(batches)]
            seeds = draw_seeds(self.rng, c.directions)
            z = np.stack([c.direction(s, self.adapter.shape[0]) for s in seeds])
            adapters = np.concatenate([self.adapter[None, :], self.adapter + c.eps * z])  # [n + 1, d]
            losses = weighted_mean(self.engine.losses(batch, adapters), batch.weights)
            coefs = -c.lr * (losses[1:] - losses[0]) / c.eps / c.directions
            if np.all(np.isfinite(coefs)):
                self.adapter = (self.adapter + coefs.astype(np.float32) @ z).astype(np.float32)
                run.add(seeds, coefs)
                run.step_losses.append(float(losses[0]))
            if guard:
                guard()
        return run


METHOD = Method(
    name="onesided",
    summary="MeZO with forward differences: n directions cost n + 1 forward passes (P = n + 1 per call)",
    config=OneSidedConfig,
    optimizer=OneSided,
    passes_per_pair=1,
    passes_per_step=1,
    adapter_copies=lambda n: 2 + 2 * max(1, n),  # the master, n directions, and the n + 1 vectors of the call
)
