"""FZOO: one-sided steps normalised by the spread of the perturbed losses (Dang et al., ICLR 2026).

    L_k = L(w + eps z_k)   k = 1..n,   L_0 = L(w),   sigma = std(L_1..L_n)
    w  <- w - lr * sum_k (L_k - L_0) / sigma * z_k / n

One program call evaluates w and the n perturbed copies (P = n + 1), as `onesided` does. Dividing
by sigma instead of eps makes the step's size independent of how steep the loss is along the
directions: MeZO's (L+ - L-) / 2 eps is the derivative, and a classifier head set from class
statistics (weights in the hundreds) makes it so large along the layers below that a learning
rate small enough to be stable moves nothing. Each coefficient is then about lr / sqrt(n) in
size, a sign-like step that behaves the same at every scale of the loss (ZO-EXPERIMENT: the only
forward-only step that beat that head on SST-2). A step whose perturbed losses are all equal
(sigma = 0: the directions do not change the loss) is skipped. The upload is MeZO's: every
step's (seed, -lr (L_k - L_0) / (sigma n)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fwdfed import task_keys as keys
from fwdfed.batch import Batch
from fwdfed.methods.base import Method
from fwdfed.methods.estimate import LocalRun, StepConfig, draw_seeds, hparam, scheduled_steps, weighted_mean
from fwdfed.methods.mezo import SCHEDULE, check_schedule


@dataclass(frozen=True, kw_only=True)
class FzooConfig(StepConfig):
    lr: float = 3e-3
    eps: float = 1e-3
    directions: int = 8  # n >= 2: the spread of one loss is not defined
    schedule: str = "constant"  # of the learning rate over the local steps: constant, or linear to 0

    def __post_init__(self):
        super().__post_init__()
        if self.directions < 2:
            raise ValueError(f"fzoo needs at least 2 directions per step (the spread of their losses), "
                             f"got {self.directions}")
        check_schedule(self.schedule)

    @classmethod
    def from_hparams(cls, hparams: dict) -> "FzooConfig":
        return cls(**cls.step_hparams(hparams), schedule=hparam(hparams, keys.SCHEDULE, str, "constant"))


def normalised_coefficients(losses: np.ndarray, lr: float) -> np.ndarray | None:
    """-lr (L_k - L_0) / (sigma n) for losses [L_0, L_1..L_n]; None when sigma is 0 or not finite."""
    shared, perturbed = float(losses[0]), losses[1:].astype(np.float64)
    sigma = float(np.std(perturbed))
    if not (np.isfinite(sigma) and sigma > 0 and np.isfinite(shared)):
        return None
    return -lr * (perturbed - shared) / (sigma * perturbed.shape[0])


class Fzoo:
    def __init__(self, engine, adapter: np.ndarray, config: FzooConfig, rng: np.random.Generator, reference=None):
        self.engine, self.config, self.rng = engine, config, rng
        self.adapter = np.array(adapter, dtype=np.float32)  # the fp32 master copy

    def step(self, batch: Batch, run: LocalRun, lr: float) -> None:
        c = self.config
        seeds = draw_seeds(self.rng, c.directions)
        z = np.stack([c.direction(s, self.adapter.shape[0]) for s in seeds])
        adapters = np.concatenate([self.adapter[None, :], self.adapter + c.eps * z])  # [n + 1, d]
        losses = weighted_mean(self.engine.losses(batch, adapters), batch.weights)
        coefs = normalised_coefficients(losses, lr)
        if coefs is None:
            return
        self.adapter = (self.adapter + coefs.astype(np.float32) @ z).astype(np.float32)
        run.add(seeds, coefs)
        run.step_losses.append(float(losses[0]))

    def train(self, batches: list[Batch], steps: int, guard=None) -> LocalRun:
        """`steps` FZOO steps cycling over `batches`; `guard()` runs after each (the memory budget)."""
        return scheduled_steps(self.step, batches, steps, self.config.lr, self.config.schedule, guard)


METHOD = Method(
    name="fzoo",
    summary="FZOO: n one-sided directions against a shared L(w) (P = n + 1), the step divided by their losses' spread",
    config=FzooConfig,
    optimizer=Fzoo,
    hparams=(SCHEDULE,),
    default_directions=8,
    passes_per_pair=1,
    passes_per_step=1,
    adapter_copies=lambda n: 2 + 2 * max(1, n),  # the master, n directions, and the n + 1 vectors of the call
)
