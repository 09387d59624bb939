"""MeZO / SPSA: fine-tune the adapter from forward passes only.

One step draws n seeds, evaluates the loss at w + eps*z_k and w - eps*z_k for every k in a
single program call (P = 2n adapter vectors), and moves w along each z_k by
-lr * (L+ - L-) / (2 eps) / n. Every step is recorded as (seed, coefficient) pairs, so the
whole local run is `w_final = w_start + sum coef * direction(seed)`: what the device uploads.
The adapter is kept as a float32 master copy and perturbed copies are fresh arrays, never
perturbed and restored in place (which drifts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from device_sdk.data import Batch
from device_sdk.directions import SEED_LIMIT, direction
from device_sdk.engine import ProgramEngine


@dataclass(frozen=True)
class MezoConfig:
    lr: float = 1e-3
    eps: float = 1e-2
    directions: int = 1  # n: directions per step (P = 2n adapter vectors per program call)
    kind: str = "rademacher"

    def __post_init__(self):
        if not (self.lr > 0 and self.eps > 0 and self.directions >= 1):
            raise ValueError(f"MeZO needs lr > 0, eps > 0 and directions >= 1, got {self}")

    @classmethod
    def from_hparams(cls, hparams: dict) -> "MezoConfig":
        return cls(lr=float(hparams["lr"]), eps=float(hparams["eps"]), directions=int(hparams.get("directions", 1)),
                   kind=str(hparams.get("kind", "rademacher")))


@dataclass
class LocalRun:
    """What a device's local training produced: the pairs to upload and how the loss moved."""

    pairs: list[tuple[int, float]] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)


def weighted_mean(losses: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean over the real examples of a batch, for each of the P rows of `losses`."""
    return (losses * weights).sum(axis=-1) / max(float(weights.sum()), 1.0)


class Mezo:
    def __init__(self, engine: ProgramEngine, adapter: np.ndarray, config: MezoConfig, rng: np.random.Generator):
        self.engine, self.config, self.rng = engine, config, rng
        self.adapter = np.array(adapter, dtype=np.float32)  # the fp32 master copy

    def step(self, batch: Batch, run: LocalRun) -> None:
        n, eps, dim = self.config.directions, self.config.eps, self.adapter.shape[0]
        seeds = [int(s) for s in self.rng.integers(0, SEED_LIMIT, size=n, dtype=np.int64)]
        z = np.stack([direction(s, dim, self.config.kind) for s in seeds])
        adapters = np.concatenate([self.adapter + eps * z, self.adapter - eps * z])  # [2n, d]
        losses = weighted_mean(self.engine.losses(batch, adapters), batch.weights)
        projected = (losses[:n] - losses[n:]) / (2.0 * eps)
        coefs = -self.config.lr * projected / n
        if not np.all(np.isfinite(coefs)):
            return  # a non-finite loss would poison the adapter: skip the step, record nothing
        for seed, coef, zk in zip(seeds, coefs, z):
            self.adapter += np.float32(coef) * zk
            run.pairs.append((seed, float(coef)))
        run.step_losses.append(float(losses.mean()))

    def train(self, batches: list[Batch], steps: int) -> LocalRun:
        """`steps` MeZO steps cycling over `batches`."""
        run = LocalRun()
        for i in range(steps):
            self.step(batches[i % len(batches)], run)
        return run


def mean_loss(engine: ProgramEngine, batches: list[Batch], adapter: np.ndarray) -> float:
    """Example-weighted mean loss of `adapter` over `batches`."""
    total = sum(float((engine.losses(b, adapter)[0] * b.weights).sum()) for b in batches)
    count = sum(b.num_examples for b in batches)
    return total / max(count, 1)
