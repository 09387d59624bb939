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

from fwdfed import task_keys as keys
from fwdfed.batch import Batch
from fwdfed.methods.base import Hparam, Method
from fwdfed.methods.estimate import LocalRun, StepConfig, central_differences, draw_seeds, hparam, scheduled_steps

SCHEDULES = ("constant", "linear")
SCHEDULE = Hparam(keys.SCHEDULE, str, "constant", "mezo, fzoo: the lr over the local steps", SCHEDULES)


def check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")


@dataclass(frozen=True, kw_only=True)
class MezoConfig(StepConfig):  # n directions a step: P = 2n adapter vectors a program call
    weight_decay: float = 0.0
    schedule: str = "constant"  # of the learning rate over the local steps: constant, or linear to 0

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.lr * self.weight_decay < 1:
            raise ValueError(f"MeZO needs 0 <= lr * weight_decay < 1, got lr {self.lr!r} and weight_decay {self.weight_decay!r}")
        check_schedule(self.schedule)

    @classmethod
    def from_hparams(cls, hparams: dict) -> "MezoConfig":
        return cls(**cls.step_hparams(hparams), weight_decay=hparam(hparams, keys.WEIGHT_DECAY, float, 0.0),
                   schedule=hparam(hparams, keys.SCHEDULE, str, "constant"))


class Mezo:
    def __init__(self, engine, adapter: np.ndarray, config: MezoConfig, rng: np.random.Generator, reference=None):
        self.engine, self.config, self.rng = engine, config, rng
        self.adapter = np.array(adapter, dtype=np.float32)  # the fp32 master copy

    def step(self, batch: Batch, run: LocalRun, lr: float) -> None:
        c = self.config
        seeds = draw_seeds(self.rng, c.directions)
        est = central_differences(self.engine, batch, self.adapter, seeds, c)
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
        return scheduled_steps(self.step, batches, steps, self.config.lr, self.config.schedule, guard)


def scale_range(hparams: dict) -> tuple[float, float]:
    """Weight decay shrinks the adapter by (1 - lr wd) per step (less on a linear schedule)."""
    lr, decay = float(hparams[keys.LR]), float(hparams.get(keys.WEIGHT_DECAY, 0.0))
    lowest = (1.0 - lr * decay) ** int(hparams.get(keys.LOCAL_STEPS, 1))
    return lowest, 1.0


METHOD = Method(
    name="mezo",
    summary="local MeZO/SPSA steps: n directions per step, both signs of all n in one program call",
    config=MezoConfig,
    optimizer=Mezo,
    hparams=(Hparam(keys.WEIGHT_DECAY, float, 0.0, "mezo, backprop: decoupled weight decay (mezo: sent as `scale`)"),
             SCHEDULE),
    scale_range=scale_range,
)
