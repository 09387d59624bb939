"""Forward gradient (FwdLLM): K perturbations per batch, summed at the global adapter.

For every local batch, K directions v_k; a finite-difference JVP with step h,
jvp_k = (L(w + h v_k) - L(w - h v_k)) / (2h), all 2K evaluations in one program call; the
gradient estimate is sum_k jvp_k v_k / K, averaged over the batches. The device does not
move w (FedSGD, as FwdLLM): it uploads -lr * estimate in seed form, and the coordinator
averages the devices' estimates.

Perturbation selection (FwdLLM's "discriminative sampling"): draw `candidates` x K seeds
and keep the K whose directions are most aligned, by cosine similarity, with the previous
round's global update (sent with the task). Like FwdLLM's, the selected estimate is biased
towards the previous update (momentum-like); with candidates = 1 it is unbiased. FwdLLM
selects per tensor; a seed here names the whole adapter direction, so selection is on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fwdfed import task_keys as keys
from fwdfed.batch import Batch
from fwdfed.methods.base import Hparam, Method
from fwdfed.methods.estimate import (MAX_CANDIDATES, LocalRun, StepConfig, central_differences, check_count,
                                     draw_seeds, hparam)
from fwdfed.progress import progress


@dataclass(frozen=True, kw_only=True)
class FwdGradConfig(StepConfig):  # eps is FwdLLM's finite-difference step h
    directions: int = 4  # K per batch
    kind: str = "gaussian"  # FwdLLM draws v ~ N(0, I)
    candidates: int = 1  # selection pool: candidates x K seeds; 1 = no selection

    def __post_init__(self):
        super().__post_init__()
        check_count("candidates", self.candidates, MAX_CANDIDATES)

    @classmethod
    def from_hparams(cls, hparams: dict) -> "FwdGradConfig":
        return cls(**cls.step_hparams(hparams), candidates=hparam(hparams, keys.CANDIDATES, int, 1))


class ForwardGradient:
    def __init__(self, engine, adapter: np.ndarray, config: FwdGradConfig, rng: np.random.Generator,
                 reference: np.ndarray | None = None):
        self.engine, self.config, self.rng = engine, config, rng
        self.adapter = np.array(adapter, dtype=np.float32)
        self.reference = reference if reference is not None and np.any(reference) else None

    def select(self) -> list[int]:
        c = self.config
        if self.reference is None or c.candidates <= 1:
            return draw_seeds(self.rng, c.directions)
        pool = draw_seeds(self.rng, c.candidates * c.directions)
        dim = self.adapter.shape[0]
        ref = self.reference / np.linalg.norm(self.reference)
        directions = (c.direction(s, dim) for s in pool)
        cosines = [float(z @ ref) / float(np.linalg.norm(z)) for z in directions]
        best = np.argsort(cosines)[::-1][: c.directions]
        return [pool[i] for i in best]

    def train(self, batches: list[Batch], steps: int, guard=None) -> LocalRun:
        """Estimate the gradient at w over `steps` batches (cycling); the update is -lr * estimate."""
        c, run = self.config, LocalRun()
        for i in progress(range(steps), desc="local steps", unit="step"):
            seeds = self.select()
            est = central_differences(self.engine, batches[i % len(batches)], self.adapter, seeds, c)
            coefs = -c.lr * est.projected / (c.directions * steps)
            if np.all(np.isfinite(coefs)):
                run.add(seeds, coefs)
                run.step_losses.append(est.loss)
            if guard:
                guard()
        return run


METHOD = Method(
    name="fwdgrad",
    summary="FwdLLM's forward gradient at the global adapter: K directions per batch, finite-difference JVPs",
    config=FwdGradConfig,
    optimizer=ForwardGradient,
    hparams=(Hparam(keys.CANDIDATES, int, 1, "fwdgrad: draw this many times the directions and keep the most "
                                          "aligned with the last global update"),),
    default_directions=4,
    default_kind="gaussian",
    uses_reference=True,
    estimates_gradient=True,
)
