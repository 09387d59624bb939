"""MeZO / SPSA: fine-tune the adapter from forward passes only.

One step draws n seeds, evaluates the loss at w + eps*z_k and w - eps*z_k for every k in a
single program call, and moves w along each z_k by -lr_t * (L+ - L-) / (2 eps) / n, with
weight decay as in MeZO: w <- (1 - lr_t * wd) w - lr_t g z. Every step is recorded, so the
local run is `w_final = scale * w_start + sum coef * direction(seed)`: what the device
uploads. The adapter is a float32 master copy; perturbed copies are fresh arrays, never
perturbed and restored in place (which drifts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device_sdk.data import Batch
from device_sdk.estimate import LocalRun, central_differences, draw_seeds, parse_block

SCHEDULES = ("constant", "linear")


@dataclass(frozen=True)
class MezoConfig:
    lr: float = 1e-3
    eps: float = 1e-2
    directions: int = 1  # n: directions per step (P = 2n adapter vectors per program call)
    kind: str = "rademacher"
    weight_decay: float = 0.0
    schedule: str = "constant"  # of the learning rate over the local steps: constant, or linear to 0
    block: tuple[int, int] | None = None  # perturb only this slice of the adapter

    def __post_init__(self):
        if not (self.lr > 0 and self.eps > 0 and self.directions >= 1 and 0 <= self.lr * self.weight_decay < 1):
            raise ValueError(f"MeZO needs lr > 0, eps > 0, directions >= 1 and 0 <= lr*weight_decay < 1, got {self}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")

    @classmethod
    def from_hparams(cls, hparams: dict) -> "MezoConfig":
        return cls(lr=float(hparams["lr"]), eps=float(hparams["eps"]), directions=int(hparams.get("directions", 1)),
                   kind=str(hparams.get("kind", "rademacher")), weight_decay=float(hparams.get("weight_decay", 0.0)),
                   schedule=str(hparams.get("schedule", "constant")), block=parse_block(hparams))


class Mezo:
    def __init__(self, engine, adapter: np.ndarray, config: MezoConfig, rng: np.random.Generator, reference=None):
        self.engine, self.config, self.rng = engine, config, rng
        self.adapter = np.array(adapter, dtype=np.float32)  # the fp32 master copy

    def step(self, batch: Batch, run: LocalRun, lr: float) -> None:
        c = self.config
        seeds = draw_seeds(self.rng, c.directions)
        est = central_differences(self.engine, batch, self.adapter, seeds, c.eps, c.kind, c.block)
        coefs = -lr * est.projected / c.directions
        if not np.all(np.isfinite(coefs)):
            return  # a non-finite loss would poison the adapter: skip the step, record nothing
        factor = 1.0 - lr * c.weight_decay
        self.adapter = (np.float32(factor) * self.adapter + coefs.astype(np.float32) @ est.directions).astype(np.float32)
        run.decay(factor)
        run.add(seeds, coefs)
        run.step_losses.append(est.loss)

    def train(self, batches: list[Batch], steps: int, guard=None) -> LocalRun:
        """`steps` MeZO steps cycling over `batches`; `guard()` runs after each (the memory budget)."""
        run = LocalRun()
        for i in range(steps):
            lr = self.config.lr * (1.0 - i / steps if self.config.schedule == "linear" else 1.0)
            self.step(batches[i % len(batches)], run, lr)
            if guard:
                guard()
        return run

