"""Differential privacy on the aggregate: DP-FedAvg (McMahan et al. 2018), device level
(`serve --strategy dp-fedavg --dp-clip C --dp-noise-multiplier SIGMA`; --dp-clip alone selects it).

What is protected: one device's whole contribution to a round. Each device's change of the
adapter is clipped to L2 norm C on the server and Gaussian noise of std sigma*C/m (m devices in
the round) is added to their equal-weight mean, so the new global adapter hardly depends on
whether that device sent its real change or no change at all ("zero-out" neighbours, Kairouz et
al. 2021: same devices, one device's change replaced by zero). `gaussian_epsilon` gives the
(epsilon, delta) of that, composed over the rounds. Swapping one device's data for arbitrary
other data moves the mean by up to 2C/m, i.e. it is covered at `gaussian_epsilon(sigma / 2, ...)`.

Threat model: central DP. The coordinator is trusted: it sees every individual update. Devices,
and whoever is shown the adapter versions, see only the noisy global versions.

Limits:
- No amplification by subsampling is claimed: which devices take part in a round is decided by
  who is connected, not by Poisson sampling, so epsilon is an upper bound from composition alone.
- The accounting counts every closed round, whether or not a given device took part in it.
- The clip applies to a device's dense change, so its seed-form pairs are expanded on the server
  (O(pairs * d) work per device and round), and a device that answered several waves of a round
  is clipped once, on the mean of its updates.
- Devices are weighted equally, not by their number of examples: see `DPSeedFedAvg.aggregate`.
- Only the adapter versions are protected. Other things computed from individual updates (train
  loss metrics, the estimate variance and the number of waves it asks for, learning rates of the
  loss- or update-based lr strategies) are not noised.
- The noise comes from numpy's PCG64 with an unpredictable seed, not a cryptographic generator,
  and floating-point rounding is not hardened against side channels (Mironov 2012).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import numpy as np

from coordinator.strategies.base import AcceptedUpdate, Option, StrategySpec, device_change, group_by_device
from coordinator.strategies.fedavg import SeedFedAvg
from fwdfed.directions import KINDS

DEFAULT_DELTA = 1e-5


@dataclass
class DPSeedFedAvg(SeedFedAvg):
    """w' = w + server_lr * (mean_j clip_C(delta_j) + N(0, (sigma C / m)^2)), over the m devices j.

    delta_j = (scale - 1) w + sum_k coef_k direction(seed_k) + dense is device j's change of the
    adapter (the mean of its updates if it answered several waves), restricted to the round's
    block if any; clip_C scales it down to norm C if it is longer. C and sigma are the job's
    `dp_clip` and `dp_noise_multiplier` (its strategy options). Rounds are configured as SeedFedAvg
    configures them.
    """

    seed: int | None = None  # None: unpredictable; an int only for tests and reproducible experiments
    rng: np.random.Generator = field(init=False, repr=False)

    @property
    def clip(self) -> float:  # C: the largest L2 norm of one device's change that reaches the aggregate
        return self.options.strategy_options.get("dp_clip")

    @property
    def noise_multiplier(self) -> float:  # sigma: the noise std in units of C
        return self.options.strategy_options.get("dp_noise_multiplier")

    @property
    def delta(self) -> float:
        return self.options.strategy_options.get("dp_delta", DEFAULT_DELTA)

    def __post_init__(self) -> None:
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"the DP clip bound must be a positive number, got {self.clip}")
        if not (isinstance(self.noise_multiplier, (int, float)) and math.isfinite(self.noise_multiplier)
                and self.noise_multiplier > 0):
            raise ValueError(f"the DP noise multiplier must be a positive number, got {self.noise_multiplier}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown direction kind {self.kind!r}; expected one of {KINDS}")
        # Whoever can predict the noise can subtract it: the default seed must not be guessable.
        self.rng = np.random.default_rng(secrets.randbits(128) if self.seed is None else self.seed)

    def version_sums(self, updates: list[AcceptedUpdate], block: tuple[int, int] | None = None) -> None:
        """None: a noised version is no per-seed sum, so its tasks carry the dense adapter (docs/protocol.md)."""
        return None

    def aggregate(self, global_adapter: np.ndarray, updates: list[AcceptedUpdate],
                  block: tuple[int, int] | None = None) -> np.ndarray:
        if not updates:
            return global_adapter.copy()
        w = global_adapter.astype(np.float64)
        by_device = group_by_device(updates)
        # Equal weights, not num_examples: the count is reported by the device, so weighting by it
        # would let one device scale its own share (and the sensitivity) past C / m.
        m = len(by_device)
        total = np.zeros_like(w)
        for device_updates in by_device.values():
            total += clipped(device_change(w, device_updates, self.kind, block), self.clip)
        mean = total / m
        # Noise only where the round can change the adapter: device changes are zero outside the
        # block, so the released values there are the old ones and need no noise.
        start, stop = block or (0, w.shape[0])
        mean[start:stop] += self.rng.normal(0.0, self.noise_multiplier * self.clip / m, stop - start)
        return (w + self.options.server_lr * mean).astype(np.float32)

    def round_metrics(self, number: int) -> dict[str, float]:
        """The privacy spent after `number` rounds: the epsilon at the job's delta."""
        return {"dp_epsilon": gaussian_epsilon(self.noise_multiplier, number, self.delta)}


def clipped(change: np.ndarray, bound: float) -> np.ndarray:
    """change * min(1, bound / ||change||)."""
    norm = float(np.linalg.norm(change))
    return change if norm <= bound else change * (bound / norm)


def gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """The epsilon of `rounds` Gaussian mechanisms with sensitivity C and noise std sigma*C, at `delta`.

    Renyi DP (Mironov 2017): one round is (alpha, alpha / (2 sigma^2))-RDP for every alpha > 1,
    rounds compose by adding, and (alpha, rho)-RDP implies (rho + log(1/delta) / (alpha - 1), delta)-DP.
    eps(alpha) = rounds * alpha / (2 sigma^2) + log(1/delta) / (alpha - 1) is convex on alpha > 1;
    its derivative vanishes at alpha* = 1 + sqrt(2 sigma^2 log(1/delta) / rounds), which gives
    eps = rounds / (2 sigma^2) + sqrt(2 rounds log(1/delta)) / sigma. No amplification by
    subsampling is claimed, so this is an upper bound.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"the noise multiplier must be a positive number, got {noise_multiplier!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 0:
        raise ValueError(f"the number of rounds must be a whole number >= 0, got {rounds!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be between 0 and 1 (exclusive), e.g. 1e-5; got {delta!r}")
    if rounds == 0:
        return 0.0
    log_inv_delta = math.log(1.0 / delta)
    alpha = 1.0 + math.sqrt(2.0 * noise_multiplier**2 * log_inv_delta / rounds)
    return rounds * alpha / (2.0 * noise_multiplier**2) + log_inv_delta / (alpha - 1.0)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


STRATEGY = StrategySpec(
    "dp-fedavg", "DP-FedAvg: each device's change clipped, Gaussian noise on their equal-weight mean (docs/privacy.md)",
    DPSeedFedAvg,
    options=(
        Option("dp_clip", float, None, "differential privacy: clip each device's change to this L2 norm",
               positive, "must be a positive number", required=True),
        Option("dp_noise_multiplier", float, None,
               "differential privacy: Gaussian noise of this many times --dp-clip (see docs/privacy.md)",
               positive, "must be a positive number", required=True),
        Option("dp_delta", float, DEFAULT_DELTA, "differential privacy: the delta of (epsilon, delta)",
               lambda d: isinstance(d, (int, float)) and 0 < d < 1, "must be in (0, 1)"),
    ),
)
