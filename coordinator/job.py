"""A job's coordinator-side settings, typed and stored with the job.

Everything that decides how rounds are configured and aggregated lives here and in the job's
row (method, hyperparameters, rounds), so a coordinator restarted on the same database runs
the rest of the job exactly as it started, whatever flags it is given.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fwdfed import task_keys as keys
from fwdfed.methods.class_stats import DEFAULT_SHRINKAGE
from fwdfed.tensor_scale import DEFAULT_FLOOR, ScaleRanges, round_scales

# One update may change the adapter by at most this RMS per value (`serve --max-update-rms`, a limit of the
# server, not of the job): far past any honest update measured here (docs/security.md), and finite, so that
# one coefficient such as 1e30 can neither make the aggregate non-finite nor blow the adapter up.
DEFAULT_MAX_UPDATE_RMS = 10.0

# Options a later coordinator version added: a job stored before them gets these values when it
# is resumed (the flags it was started with were not stored).
ADDED_LATER = ("server_lr", "clip")


@dataclass(frozen=True)
class JobOptions:
    head_init: str = "none"  # lda: round 1 sets the classifier from class statistics (fwdfed.methods.class_stats)
    lda_shrinkage: float = DEFAULT_SHRINKAGE
    fraction: float | None = None  # sample this share of the connected devices (at least min_devices)
    # Over-selection: task ceil(target x (1 + over_select)) devices, take the first target updates; the rest are late.
    over_select: float = 0.0
    # Flower's min_available_clients: a round tasks nobody until this many devices are connected, so that the same
    # fleet, connected, gives the same sample for the same --seed however its devices came.
    min_available: int | None = None
    lr_strategy: str = "frozen"  # FedMeZO's client learning rates (coordinator.lr_strategies)
    lr_delta: float | None = None  # their spread; None: half the job's lr
    blocks: int = 1  # block-cyclic: round r perturbs block (r - 1) mod blocks of the adapter
    perturb_only: str | None = None  # every round perturbs only the adapter tensors whose names contain this
    variance_threshold: float | None = None  # ask for more waves while the estimate variance is above it
    max_waves: int = 3
    server_lr: float = 1.0  # the aggregate moves the adapter by server_lr x the weighted mean change
    clip: float | None = None  # bound on the L2 norm of each device's coefficient vector
    # The aggregation rule (coordinator.strategies) and its own options, name -> value, every one given.
    strategy: str = "fedavg"
    strategy_options: dict = field(default_factory=dict)
    # Offsite tuning: devices train on the job's bundle, an emulator; held-out evaluation and the exported
    # adapter use this bundle, the full model with the same adapter layout (fwdfed.model.emulator).
    eval_bundle: str | None = None
    # FedKSeed (`serve --seed-pool K`): every direction of the job is one of K seeds, the pool of this key
    # (fwdfed.directions.seed_pool; the key, 16 hex digits, is pool_key(job id), fixed when the job is created).
    # Not in ADDED_LATER: a job stored before it cannot have been started with a pool.
    seed_pool: int | None = None
    seed_pool_key: str | None = None
    # Per-tensor perturbation scales (`serve --tensor-scale rms`, fwdfed.tensor_scale): each round's, from its base
    # adapter, sent in its tasks. Not in ADDED_LATER: a job stored before them ran unscaled, and goes on so.
    tensor_scale: str = "none"
    tensor_scale_floor: float = DEFAULT_FLOOR

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def pool_hparams(self) -> dict:
        """What a task says of the job's seed pool: nothing without one."""
        if self.seed_pool is None:
            return {}
        return {keys.SEED_POOL: self.seed_pool, keys.SEED_POOL_KEY: self.seed_pool_key}

    def round_scales(self, base, layout, block: tuple[int, int] | None) -> ScaleRanges | None:
        """The scales of a round of the job's method from its base adapter (None: unscaled): the one function the
        round's tasks and its aggregation both read, so that the two agree, on a resume too."""
        if self.tensor_scale == "none":
            return None
        return round_scales(base, layout, self.tensor_scale_floor, block)

    @classmethod
    def from_json(cls, stored: dict) -> "JobOptions":
        stored = with_strategy(dict(stored or {}))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in stored.items() if k in known})


# Jobs stored before strategies were registered kept differential privacy as three options of their own.
OLD_DP_OPTIONS = ("dp_clip", "dp_noise_multiplier", "dp_delta")


def with_strategy(stored: dict) -> dict:
    """A stored job's options with its strategy named: an older job's DP options become dp-fedavg's."""
    old = {name: stored.pop(name) for name in OLD_DP_OPTIONS if name in stored}
    if "strategy" not in stored:
        if old.get("dp_clip") is not None:
            stored["strategy"], stored["strategy_options"] = "dp-fedavg", old
        else:
            stored["strategy"], stored["strategy_options"] = "fedavg", {}
    return stored


def resumed_options(stored: dict, flags: dict) -> tuple[JobOptions, list[str]]:
    """The options a resumed job runs with: the stored ones. `flags` (name -> value given on the
    command line, None when not given) fill only what an older job did not store; a flag that
    disagrees with the stored value is ignored, with a warning for the operator."""
    stored = dict(stored or {})
    warnings = []
    for name, value in flags.items():
        if value is None:
            continue
        if name not in stored and name in ADDED_LATER:
            stored[name] = value
        elif name in stored and stored[name] != value:
            was = "without it" if stored[name] is None else f"with {stored[name]}"
            warnings.append(f"ignoring --{name.replace('_', '-')} {value:g}: job was created {was}")
    return JobOptions.from_json(stored), warnings


def round_method_name(job_method: str, options: JobOptions, number: int) -> str:
    """The method of round `number`: the job's, but for round 1 of a head-initialised job, which
    gathers the class statistics of the LDA head."""
    return "class-stats" if options.head_init == "lda" and number == 1 else job_method
