"""What an update may hold: the checks of its content that every update passes before it is aggregated.

The protocol's checks (the right task, round and version) are the round machinery's; these are the
content's, the same for a new update and for one stored by an older coordinator or under other
limits: no more pairs than the task allows, seeds from the job's pool, a scale in the method's
range, a dense part of the right length (the adapter's, or the span a method's dense covers) and finite, and the update's size under the bound. Each
refusal has its code (docs/protocol.md).
"""

from __future__ import annotations

import math

import numpy as np

from coordinator.strategies.base import place_dense, span_length
from fwdfed import methods
from fwdfed import task_keys as keys
from fwdfed.methods.estimate import parse_seed_pool

SCALE_TOLERANCE = 1e-6  # an update's scale may pass its method's range by this much (float rounding)


def update_rms(pairs: list[tuple[int, float]], dense: np.ndarray | None) -> float:
    """About the RMS per value by which an update changes the adapter, for the bound: a direction has
    unit RMS per value (Rademacher: exactly), so the seed form's is the norm of its coefficients,
    those of a repeated seed summed first (one direction); a dense change's is its own RMS."""
    by_seed: dict[int, float] = {}
    for seed, coef in pairs:
        by_seed[seed] = by_seed.get(seed, 0.0) + coef
    # math.hypot scales internally: coefficients near the float64 limit give their norm, not infinity.
    seed_rms = math.hypot(*by_seed.values()) if by_seed else 0.0
    dense_rms = 0.0 if dense is None else float(np.sqrt(np.mean(dense.astype(np.float64) ** 2)))
    return math.hypot(seed_rms, dense_rms)


class UpdateChecks:
    def __init__(self, adapter_dim: int, max_update_rms: float | None):
        self.adapter_dim, self.max_update_rms = adapter_dim, max_update_rms
        self._pools: dict[tuple, frozenset[int]] = {}  # a task's seed pool, by (size, key)

    def _pool(self, hparams: dict) -> frozenset[int] | None:
        """The seeds of the pool a task names (FedKSeed), made once per pool; None for a task without one."""
        key = (hparams.get(keys.SEED_POOL), hparams.get(keys.SEED_POOL_KEY))
        if key == (None, None):
            return None
        if key not in self._pools:
            self._pools[key] = frozenset(int(s) for s in parse_seed_pool(hparams))
        return self._pools[key]

    def poisoning(self, pairs: list[tuple[int, float]], scale: float, dense_bytes: bytes | None, hparams: dict,
                   method: methods.Method) -> tuple[str, str] | None:
        """(code, reason) for an update whose content would damage the model if aggregated."""
        if len(pairs) > (allowed := method.allowed_pairs(hparams)):
            return "too_many_pairs", f"{len(pairs)} pairs, the task allows {allowed} (local steps x directions)"
        pool = self._pool(hparams)
        if pool is not None and (outside := next((s for s, _ in pairs if s not in pool), None)) is not None:
            return "outside_pool", f"seed {outside} is not one of the job's pool of {len(pool)} (docs/directions.md)"
        lowest, highest = method.scale_range(hparams)
        lowest, highest = lowest - SCALE_TOLERANCE, highest + SCALE_TOLERANCE
        if not lowest <= scale <= highest:
            return "bad_scale", f"scale {scale:.9g}: this task allows a scale in [{lowest:.9g}, {highest:.9g}]"
        dense = None
        if dense_bytes:
            # The length first: bytes that are not whole float32 values cannot even be read as an adapter.
            length = (method.dense_length(hparams) if method.dense_length else
                      span_length(method.dense_span(hparams)) if method.dense_span else self.adapter_dim)
            if len(dense_bytes) != 4 * length:
                return "wrong_dimension", (f"dense part of {len(dense_bytes)} bytes, this task's has {length} "
                                           f"float32 values ({4 * length} bytes)")
            dense = np.frombuffer(dense_bytes, "<f4")
            if not np.all(np.isfinite(dense)):
                return "non_finite", "the dense part holds non-finite values"
        bound = self.max_update_rms
        # A method's own dense payload (class statistics) is no change of the adapter: only its pairs count.
        change = dense if method.dense_length is None else None
        if change is not None and method.dense_span:  # a span's change, measured per value of the whole adapter
            change = place_dense(change, method.dense_span(hparams), self.adapter_dim)
        if bound is not None and (rms := update_rms(pairs, change)) > bound:
            return "norm_bound", f"the update changes the adapter by RMS {rms:.3g}, past the bound {bound:.3g}"
        return None
