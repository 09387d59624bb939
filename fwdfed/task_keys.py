"""The keys of a task's `hparams` (fwdfed.protocol.Task), each named once: every reader and writer uses these.

The coordinator writes them (the job's, each round's and each wave's), the device reads them (a method's
config, its local steps, the seed pool, the teacher it must hold), and the coordinator reads them back to
check an answer (pairs allowed, `scale` range, seeds of the pool). They are the wire's words: docs/protocol.md
documents the same set for client writers (the `hparams` row of `task`), and tests/fwdfed/test_task_keys.py
checks the two agree and that no module reads or writes a key by its literal.

A module of its own, not fwdfed.methods.estimate (whose `StepConfig` reads the first group): the coordinator
reads these keys without any method's estimator, and some belong to no estimator at all (the wave, the head
round's statistics). It imports nothing, so any module may import it.
"""

from __future__ import annotations

# ---- the step every estimator takes (fwdfed.methods.estimate.StepConfig); backprop reads `lr` alone ----
LR = "lr"  # float: the learning rate (the coordinator's client lr strategy may set it per device)
EPS = "eps"  # float: the perturbation size; the forward gradient's finite-difference step h
DIRECTIONS = "directions"  # int: n directions a local step (FwdLLM: K a batch)
KIND = "kind"  # str: the directions' distribution, rademacher or gaussian (docs/directions.md)
BLOCK_START = "block_start"  # int: with BLOCK_END, the adapter block [start, end) the round perturbs,
BLOCK_END = "block_end"  # int:   absent when it perturbs the whole adapter (--blocks, --perturb-only)
TENSOR_SCALES = "tensor_scales"  # list of [start, stop, scale]: each direction's per-tensor scales (--tensor-scale,
#                                  fwdfed.tensor_scale); absent when directions are unscaled

# ---- the job's round: how much a device does, and which wave of the round it answers ----
LOCAL_STEPS = "local_steps"  # int: local steps (batches, for the forward gradient) a task asks for
WAVE = "wave"  # int: the round's wave, 0 for the first (more waves while a gradient's variance is high)

# ---- a method's own (its `Hparam`s: `coordinator serve --weight-decay` and so on) ----
WEIGHT_DECAY = "weight_decay"  # float: mezo's and backprop's decoupled weight decay (mezo: sent as `scale`)
SCHEDULE = "schedule"  # str: mezo's and fzoo's lr over the local steps, constant or linear to 0
CANDIDATES = "candidates"  # int: fwdgrad draws this many times the directions, keeps the most aligned
HEAD_LR = "head_lr"  # float: hybrid's learning rate of its exact classifier-head step

# ---- the job's seed pool (FedKSeed, `serve --seed-pool K`, docs/directions.md): both or neither ----
SEED_POOL = "seed_pool"  # int: K, the pool's size; every seed of an update must be one of the pool's
SEED_POOL_KEY = "seed_pool_key"  # str: 16 lowercase hex digits, the key the pool's seeds are drawn from

# ---- FedKD's teacher (fedkd's tasks, and the head round of a fedkd job) ----
TEACHER_SHA256 = "teacher_sha256"  # str: the teacher program's sha256; a device holding another declines
KD_WEIGHT = "kd_weight"  # float: a, the teacher distribution's share of the loss, in [0, 1]
KD_TEMPERATURE = "kd_temperature"  # float: T, the softmax temperature
TEACHER = (TEACHER_SHA256, KD_WEIGHT, KD_TEMPERATURE)  # what the head round of a fedkd job carries too

# ---- the class statistics' head round (class-stats, `serve --head-init lda`) ----
NUM_CLASSES = "num_classes"  # int: C, the rows of the classification head
FEATURE_DIM = "feature_dim"  # int: H, the features the head reads
SHRINKAGE = "shrinkage"  # float: in [0, 1], the LDA covariance shrinkage the coordinator will use

# ---- hybrid's head (with NUM_CLASSES and FEATURE_DIM): where it lies in the adapter, from the layout ----
HEAD_START = "head_start"  # int: the head's weight [C, H] then bias [C] fill [head_start, head_start + C (H + 1))

# The task hyperparameters every training method reads (the coordinator's --lr, --eps, --local-steps,
# --directions, --kind); a method's own are declared in its `hparams`.
COMMON = (LR, EPS, LOCAL_STEPS, DIRECTIONS, KIND)

# Every key above: the module's upper-case string constants, so that a key added is a key listed.
TASK_KEYS = frozenset(value for name, value in dict(globals()).items() if name.isupper() and isinstance(value, str))
