"""FedMeZO's client learning-rate strategies, computed by the coordinator from what it stored.

With eta0 the job's lr and delta the spread (FedMeZO: 1e-5 and 5e-6):
- frozen:     eta_i = eta0
- random:     eta_i ~ U(eta0 - delta, eta0 + delta), drawn anew for every task
- round-wise: d_i = L_i - mean_j L_j over last round's devices, L = the device's train loss
              in the latest round it took part in; eta_i = eta0 + delta * d_i / max_j |d_j|
- five-round: the same with L averaged over the device's last 5 rounds; eta0 before round 6
- model-diff: m_i = ||dw_i - mean_j dw_j|| over last round's device updates dw;
              d_i = m_i - mean_j m_j; eta_i = eta0 + delta * d_i / max_j |d_j|
A device with no history gets eta0. FedMeZO hard-codes three clients and reads a shared
simulation log; here any number of devices works from the database.
"""

from __future__ import annotations

import random

import numpy as np

STRATEGIES = ("frozen", "random", "round-wise", "five-round", "model-diff")


def _spread(eta0: float, delta: float, score: dict[str, float]) -> dict[str, float]:
    """eta0 + delta * d_i / max|d| with d_i the centred score."""
    if not score:
        return {}
    mean = float(np.mean(list(score.values())))
    d = {k: v - mean for k, v in score.items()}
    top = max(abs(v) for v in d.values())
    return {k: eta0 + (delta * v / top if top > 0 else 0.0) for k, v in d.items()}


def client_lrs(strategy: str, eta0: float, delta: float, devices: list[str],
               losses: dict[str, list[float]], last_deltas: dict[str, np.ndarray], rng: random.Random) -> dict[str, float]:
    """Learning rate for each of `devices`.

    `losses[device]` is its train loss per closed round (oldest first); `last_deltas[device]`
    its dense adapter change in the last closed round it took part in.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown lr strategy {strategy!r}; expected one of {STRATEGIES}")
    if strategy == "frozen":
        return {d: eta0 for d in devices}
    if strategy == "random":
        return {d: rng.uniform(eta0 - delta, eta0 + delta) for d in devices}
    if strategy == "model-diff":
        if len(last_deltas) < 2:
            lrs = {}
        else:
            mean = np.mean(list(last_deltas.values()), axis=0)
            lrs = _spread(eta0, delta, {k: float(np.linalg.norm(v - mean)) for k, v in last_deltas.items()})
    else:
        window = 1 if strategy == "round-wise" else 5
        score = {k: float(np.mean(v[-window:])) for k, v in losses.items() if len(v) >= window}
        lrs = _spread(eta0, delta, score)
    return {d: lrs.get(d, eta0) for d in devices}
