"""Class statistics, forward passes only, for a classification head in closed form (FedLDA).

Each device runs its whole shard once through the program's `features` method (what the head
reads) and uploads, per class c, the feature sum S_c and count N_c, and the sum of outer
products M = sum x x^T over its examples: C*H + C + H*H numbers in the update's `dense` field,
in that order, float32. The coordinator adds them up over devices and writes the linear
discriminant analysis head into the adapter's classifier (weight [C, H], bias [C]):

    mu_c = S_c / N_c                       Sigma = (M - sum_c N_c mu_c mu_c^T) / (N - C)
    Sigma' = (1 - s) Sigma + s (tr Sigma / H) I          s: --lda-shrinkage
    W_c = Sigma'^-1 mu_c                   b_c = -mu_c^T Sigma'^-1 mu_c / 2 + log(N_c / N)

On all-MiniLM-L6-v2's pooled features of AG News this head alone reaches 86-87% held-out
accuracy (nearest class mean: 79%; logistic regression by gradient descent: 85%), from one
forward pass per example. The statistics reveal more about a device's data than seeds do
(class means and feature covariance): a privacy cost paid once, at the start of a job.
Used by `python -m coordinator serve --head-init lda`: round 1 collects them.

Without a teacher an example counts towards its label's class, and an unlabelled one not at
all. In a fedkd job the task also names the teacher (`teacher_sha256`, `kd_weight` a,
`kd_temperature` T) and each example counts towards class c by its distillation target
q_c (`fwdfed.methods.fedkd.soft_targets`: (1 - a) onehot(y) + a softmax(teacher / T), the teacher's
softmax alone when unlabelled): S_c = sum q_c x, N_c = sum q_c, and the formulas above hold as
they are. With 10% of SST-2's rows labelled, this is where a teacher's distribution helps most
(docs/BENCHMARKS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fwdfed import task_keys as keys
from fwdfed.batch import Batch
from fwdfed.bundle.layout import AdapterLayout
from fwdfed.bundle.tasks import IGNORE_INDEX
from fwdfed.methods.base import Method
from fwdfed.methods.estimate import LocalRun, hparam
from fwdfed.methods.fedkd import (check_teacher_hash, check_temperature, check_weight, distillation_hparams,
                                  soft_targets)
from fwdfed.progress import progress

MAX_CLASSES = 4096
MAX_FEATURES = 16384
# The covariance shrinkage s: a job's option (`serve --lda-shrinkage`, JobOptions.lda_shrinkage), sent in the
# head round's tasks as `shrinkage`, which the coordinator's aggregate reads back.
DEFAULT_SHRINKAGE = 0.1


@dataclass(frozen=True)
class ClassStatsConfig:
    num_classes: int
    feature_dim: int
    kind: str = "rademacher"  # unused (no directions), kept so every method's config has one
    block: tuple[int, int] | None = None
    directions: int = 0
    kd_weight: float | None = None  # a fedkd job's: examples count by their distillation targets
    kd_temperature: float = 1.0

    def __post_init__(self):
        if not 1 <= self.num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes must be between 1 and {MAX_CLASSES}, got {self.num_classes!r}")
        if not 1 <= self.feature_dim <= MAX_FEATURES:
            raise ValueError(f"feature_dim must be between 1 and {MAX_FEATURES}, got {self.feature_dim!r}")
        if self.kd_weight is not None:
            check_weight(self.kd_weight)
            check_temperature(self.kd_temperature)

    @classmethod
    def from_hparams(cls, hparams: dict) -> "ClassStatsConfig":
        teacher = {}
        if keys.TEACHER_SHA256 in hparams:
            check_teacher_hash(hparam(hparams, keys.TEACHER_SHA256, str))
            teacher = distillation_hparams(hparams)
        return cls(num_classes=hparam(hparams, keys.NUM_CLASSES, int), feature_dim=hparam(hparams, keys.FEATURE_DIM, int),
                   **teacher)

    def targets(self, batch: Batch) -> np.ndarray:
        """How much each example of `batch` counts towards each class, [B, C]: 0 for filler rows."""
        labels = batch.labels.numpy()
        if self.kd_weight is None:
            known = labels != IGNORE_INDEX
            q = np.zeros((len(labels), self.num_classes))
            q[known, labels[known]] = 1.0
        else:
            if batch.teacher_logits is None:
                raise ValueError("these class statistics count examples by a teacher's distribution: the device "
                                 "has not been given a teacher bundle")
            q = soft_targets(labels, batch.teacher_logits, self.kd_weight, self.kd_temperature)
        return q * (batch.weights > 0)[:, None]


def stats_length(hparams: dict) -> int:
    c, h = int(hparams[keys.NUM_CLASSES]), int(hparams[keys.FEATURE_DIM])
    return c * h + c + h * h


class ClassStats:
    def __init__(self, engine, adapter: np.ndarray, config: ClassStatsConfig, rng=None, reference=None):
        self.engine, self.config = engine, config
        self.adapter = np.asarray(adapter, dtype=np.float32)

    def train(self, batches: list[Batch], steps: int, guard=None) -> LocalRun:
        """One pass over every batch (statistics need each example once; `steps` is not used)."""
        c, h = self.config.num_classes, self.config.feature_dim
        sums, counts, outer = np.zeros((c, h)), np.zeros(c), np.zeros((h, h))
        for batch in progress(batches, desc="class statistics", unit="batch"):
            features = self.engine.features(batch, self.adapter).astype(np.float64)
            if features.shape[-1] != h:
                raise ValueError(f"the program's features have {features.shape[-1]} values, the task says {h}")
            q = self.config.targets(batch)
            counted = q.sum(axis=1) > 0  # a row that counts towards no class adds nothing, to M either
            x, q = features[counted], q[counted]
            sums += q.T @ x
            counts += q.sum(axis=0)
            outer += x.T @ x
            if guard:
                guard()
        run = LocalRun()
        run.dense = np.concatenate([sums.ravel(), counts, outer.ravel()]).astype(np.float32)
        return run


def classifier_tensors(layout: AdapterLayout):
    """The classification head's weight [C, H] and bias [C] in the adapter layout, or ValueError."""
    weights = [t for t in layout.tensors if "classifier" in t.name and t.name.endswith(".weight") and len(t.shape) == 2]
    if not weights:
        raise ValueError("the adapter has no trained classifier to initialise (export a classifier with its head "
                         "in the adapter)")
    weight = weights[-1]
    bias = next((t for t in layout.tensors if t.name == weight.name.removesuffix(".weight") + ".bias"), None)
    return weight, bias


def lda_head(updates_dense: list[np.ndarray], num_classes: int, feature_dim: int, shrinkage: float):
    """(W [C, H], b [C]) from the devices' statistics; classes no device saw get None rows."""
    c, h = num_classes, feature_dim
    total = np.sum([d.astype(np.float64) for d in updates_dense], axis=0)
    sums, counts, outer = total[: c * h].reshape(c, h), total[c * h : c * h + c], total[c * h + c :].reshape(h, h)
    seen = counts > 0
    n = counts.sum()
    mu = np.zeros((c, h))
    mu[seen] = sums[seen] / counts[seen, None]
    scatter = outer - (mu.T * counts) @ mu
    sigma = scatter / max(n - seen.sum(), 1.0)
    sigma = (1 - shrinkage) * sigma + shrinkage * np.trace(sigma) / h * np.eye(h)
    w = np.linalg.solve(sigma, mu.T).T
    b = -0.5 * np.einsum("ch,ch->c", w, mu) + np.log(np.where(seen, counts, 1.0) / max(n, 1.0))
    return w, b, seen


def aggregate(global_adapter: np.ndarray, dense: list[np.ndarray], hparams: dict, layout: AdapterLayout) -> np.ndarray:
    """The global adapter with its classifier replaced by the LDA head of the pooled statistics."""
    weight, bias = classifier_tensors(layout)
    w, b, seen = lda_head(dense, int(hparams[keys.NUM_CLASSES]), int(hparams[keys.FEATURE_DIM]),
                          float(hparams.get(keys.SHRINKAGE, DEFAULT_SHRINKAGE)))
    new = global_adapter.astype(np.float32).copy()
    old_w = new[weight.offset : weight.end].reshape(weight.shape)
    old_w[seen] = w[seen]
    if bias is not None:
        new[bias.offset : bias.end][seen] = b[seen]
    if not np.all(np.isfinite(new)):
        raise ValueError("the class statistics gave a non-finite head")
    return new


def round_hparams(layout: AdapterLayout, shrinkage: float) -> dict:
    """What a class-statistics task says: the head's shape, and the shrinkage the coordinator will use."""
    weight, _ = classifier_tensors(layout)
    if not (math.isfinite(shrinkage) and 0 <= shrinkage <= 1):
        raise ValueError(f"the LDA shrinkage must be in [0, 1], got {shrinkage!r}")
    return {keys.NUM_CLASSES: weight.shape[0], keys.FEATURE_DIM: weight.shape[1], keys.SHRINKAGE: shrinkage,
            keys.LOCAL_STEPS: 1, keys.LR: 1.0}


METHOD = Method(
    name="class-stats",
    summary="per-class feature sums, counts and outer products through the program's features method, for a "
            "closed-form (LDA) head: the first round of --head-init lda",
    config=ClassStatsConfig,
    optimizer=ClassStats,
    adapter_copies=lambda directions: 1,
    passes_per_pair=0,
    passes_per_batch=1,
    dense_length=stats_length,
    coordinator_aggregate=aggregate,
    selectable=False,
)
