"""python -m benchmarks.tune: choose a forward-only method's settings on a split of the training rows.

The held-out rows of a job (every 10th row of the file, `runtime.data.split`) are never read
here. The training rows are split again the same way: every 10th of them is this command's
validation set, the rest are dealt to the emulated devices. Each setting of the grid runs the
job's shape in one process, through the bundle's ExecuTorch program: for a classifier the class-statistics
head (the same closed form as `--head-init lda`; a causal LM starts from the initial adapter), then rounds in which every device takes its local
steps from the global adapter and the global adapter moves by their example-weighted mean change
(the coordinator's rule at server lr 1). It prints, per setting and round, the validation loss
and accuracy and the forward passes spent, and writes them to --out as JSON: the grid, the
budget it cost and the choice are then on record.

    python -m benchmarks.tune --bundle B --data ../shared/data/ag_news/train_8000.csv --num-labels 4 \
        --method fzoo --grid lr=1e-3,3e-3 eps=1e-3 directions=8 --rounds 3 --local-steps 500 --out tune.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from fwdfed import task_keys as keys
from fwdfed.bundle.tasks import SEQ_CLS
from fwdfed.cli import quiet_libraries, run_main
from fwdfed.errors import UserError
from fwdfed.methods.class_stats import DEFAULT_SHRINKAGE
from fwdfed.tensor_scale import DEFAULT_FLOOR, MODES


def parse_grid(items: list[str]) -> dict[str, list]:
    """NAME=V1,V2 ... -> {name: [values]}; numbers where they parse, strings otherwise."""
    grid = {}
    for item in items:
        name, _, values = item.partition("=")
        if not name or not values:
            raise UserError(f"--grid takes NAME=V1,V2,..., got {item!r}")

        def value(v: str):
            try:
                return int(v) if v.lstrip("-").isdigit() else float(v)
            except ValueError:
                return v

        grid[name.replace("-", "_")] = [value(v) for v in values.split(",")]
    return grid


def settings(grid: dict[str, list]) -> list[dict]:
    names = sorted(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


class TuningSplit:
    """The training rows' own split: validation rows and the devices' shards, encoded, with prefix states."""

    def __init__(self, bundle, data: Path, devices: int, engine, cache: Path, max_validation: int):
        from runtime.data import DataSpec, encode, partition, read_examples, split
        from runtime.evaluate import load_tokenizer
        from runtime.prefix_cache import cache_prefix_states

        m = bundle.manifest
        train = split(read_examples(data, DataSpec(num_labels=m.model.num_labels)), "train")
        validation, rest = split(train, "heldout")[:max_validation], split(train, "train")
        tokenizer, size, length = load_tokenizer(bundle), m.inputs.batch_size, m.inputs.seq_len
        self.validation = encode(tokenizer, validation, m.task, size, length)
        self.shards = [encode(tokenizer, shard, m.task, size, length) for shard in partition(rest, devices)]
        self.examples = [len(shard) for shard in partition(rest, devices)]
        self.prefix_passes = 0
        if getattr(engine, "has_split", False):
            for i, batches in enumerate([self.validation, *self.shards]):
                folder = cache / f"part{i}"
                folder.mkdir(parents=True, exist_ok=True)
                self.prefix_passes += cache_prefix_states(engine, batches, folder).passes


def validate(engine, batches, adapter, classifier: bool) -> dict:
    """The validation loss, and a classifier's accuracy."""
    from fwdfed.methods.estimate import mean_loss

    loss = mean_loss(engine, batches, adapter)
    if not classifier:
        return {"loss": loss}
    correct = sum(float(((engine.logits(b, adapter).argmax(-1) == b.labels.numpy()) * b.weights).sum())
                  for b in batches)
    return {"loss": loss, "accuracy": correct / sum(b.num_examples for b in batches)}


def describe(figures: dict) -> str:
    return f"validation loss {figures['loss']:.4f}" + (f", accuracy {figures['accuracy']:.4f}"
                                                        if "accuracy" in figures else "")


def lda_start(engine, bundle, split: TuningSplit, shrinkage: float) -> np.ndarray:
    """The class-statistics head of the devices' shards written into the initial adapter."""
    from fwdfed.methods.class_stats import ClassStats, ClassStatsConfig, aggregate, round_hparams

    start = bundle.initial_adapter()
    hparams = round_hparams(bundle.manifest.layout, shrinkage)
    config = ClassStatsConfig.from_hparams(hparams)
    dense = [ClassStats(engine, start, config).train(shard, 1).dense for shard in split.shards]
    return aggregate(start, dense, hparams, bundle.manifest.layout)


def base_hparams(method, local_steps: int, layout) -> dict:
    """What a setting leaves unsaid: the method's defaults (its config's lr and eps, its directions and kind),
    and what the coordinator computes from the bundle's layout (hybrid's head)."""
    from dataclasses import MISSING, fields

    defaults = {f.name: f.default for f in fields(method.config)  # the config's fields of the keys' names
                if f.name in (keys.LR, keys.EPS) and f.default is not MISSING}
    fixed = method.layout_hparams(layout) if method.layout_hparams else {}
    return {keys.LOCAL_STEPS: local_steps, keys.KIND: method.default_kind, keys.DIRECTIONS: method.default_directions,
            **defaults, **fixed}


def run_setting(engine, method, start, split: TuningSplit, setting: dict, rounds: int, local_steps: int,
                seed: int, log, layout, classifier: bool, options=None) -> list[dict]:
    """The job's rounds at one setting: validation figures after each, and the passes spent. With `options`
    (a job's, coordinator.job.JobOptions) asking for per-tensor scales, each round's tasks carry the ones the
    coordinator would make from the round's base adapter, by the coordinator's own function."""
    hparams = base_hparams(method, local_steps, layout) | setting
    block = (hparams[keys.BLOCK_START], hparams[keys.BLOCK_END]) if keys.BLOCK_START in hparams else None
    adapter, passes, curve = start.copy(), 0, []
    for r in range(1, rounds + 1):
        began = time.perf_counter()
        scales = options.round_scales(adapter, layout, block) if options is not None else None
        config = method.config.from_hparams(hparams if scales is None else hparams | {keys.TENSOR_SCALES: scales})
        changes = []
        for d, batches in enumerate(split.shards):
            offset = (r * local_steps) % len(batches)  # a different slice each round, as the device takes
            rotated = batches[offset:] + batches[:offset]
            optimizer = method.make_optimizer(engine, adapter, config, np.random.default_rng([seed, r, d]))
            run = optimizer.train(rotated, local_steps)
            passes += method.forward_passes(len(run.pairs), hparams)
            # what the coordinator applies: the update (a forward gradient's estimate leaves its optimizer's
            # adapter where it was)
            changes.append(run.update.delta(adapter, config.kind, config.block, config.scales))
        weights = np.array(split.examples, np.float64) / sum(split.examples)
        adapter = (adapter + np.tensordot(weights, np.stack(changes), 1)).astype(np.float32)
        figures = validate(engine, split.validation, adapter, classifier)
        curve.append({"round": r, "forward_passes": passes, "seconds": time.perf_counter() - began, **figures})
        log(f"  {setting} round {r}: {describe(figures)} ({passes:,} passes, {curve[-1]['seconds']:.0f} s)")
    return curve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--method", default="fzoo")
    parser.add_argument("--grid", nargs="+", default=[], metavar="NAME=V1,V2",
                        help="task hyperparameters to try (lr, eps, directions, schedule, ...)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=200)
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--lda-shrinkage", type=float, default=DEFAULT_SHRINKAGE)
    parser.add_argument("--max-validation", type=int, default=720)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensor-scale", choices=MODES, default="none", help="as `coordinator serve --tensor-scale`")
    parser.add_argument("--tensor-scale-floor", type=float, default=DEFAULT_FLOOR,
                        help="as `coordinator serve --tensor-scale-floor`")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of every setting's curve")
    args = parser.parse_args(argv)
    quiet_libraries()
    import tempfile

    from fwdfed import methods
    from fwdfed.bundle.manifest import load_bundle
    from runtime.engine import ProgramEngine

    if args.rounds < 1 or args.local_steps < 1 or args.devices < 1:
        raise UserError("--rounds, --local-steps and --devices must be at least 1")
    if not args.tensor_scale_floor > 0:
        raise UserError(f"--tensor-scale-floor must be a number > 0, got {args.tensor_scale_floor}")
    from coordinator.job import JobOptions

    options = JobOptions(tensor_scale=args.tensor_scale, tensor_scale_floor=args.tensor_scale_floor)
    from fwdfed.methods.estimate import StepConfig

    try:
        method = methods.get(args.method)
    except ValueError as e:
        raise UserError(f"--method: {e}") from None
    def tunable(m) -> bool:  # forward-only steps on the rows' own labels (fedkd's come from a teacher)
        return issubclass(m.config, StepConfig) and not m.needs_teacher

    if not tunable(method):
        others = [n for n in methods.names(selectable_only=True) if tunable(methods.get(n))]
        raise UserError(f"--method {method.name}: this command tunes forward-only steps on labelled rows "
                        f"({', '.join(others)})")
    grid = settings(parse_grid(args.grid))
    bundle = load_bundle(args.bundle)
    for setting in grid:  # every setting checked before any work
        try:
            method.config.from_hparams(base_hparams(method, 1, bundle.manifest.layout) | setting)
        except ValueError as e:
            raise UserError(f"--grid {setting}: {e}") from None
    engine = ProgramEngine.for_bundle(bundle)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fwdfed-tune-") as cache:
        split = TuningSplit(bundle, args.data, args.devices, engine, Path(cache), args.max_validation)
        # A classifier's rounds start from the class-statistics head, as the job's do; a causal LM's from the
        # initial adapter.
        classifier = bundle.manifest.task == SEQ_CLS
        start = lda_start(engine, bundle, split, args.lda_shrinkage) if classifier else bundle.initial_adapter()
        head = validate(engine, split.validation, start, classifier)
        print(f"{f'head alone (LDA, shrinkage {args.lda_shrinkage:g})' if classifier else 'initial adapter'}: "
              f"{describe(head)} ({sum(split.examples)} training rows, "
              f"{sum(b.num_examples for b in split.validation)} validation rows)", flush=True)
        results = []
        for setting in grid:
            curve = run_setting(engine, method, start, split, setting, args.rounds, args.local_steps, args.seed,
                                lambda line: print(line, flush=True), bundle.manifest.layout, classifier,
                                options)
            results.append({"setting": setting, "curve": curve})
    best = max(results, key=lambda r: (r["curve"][-1].get("accuracy", 0.0), -r["curve"][-1]["loss"])) if results else None
    record = {"command": "python -m benchmarks.tune " + " ".join(sys.argv[1:] if argv is None else argv),
              "method": args.method, "tensor_scale": args.tensor_scale,
              "tensor_scale_floor": args.tensor_scale_floor if args.tensor_scale != "none" else None, "rounds": args.rounds, "local_steps": args.local_steps, "devices": args.devices,
              "head": head, "prefix_passes": split.prefix_passes, "results": results,
              "best": best and best["setting"], "seconds": time.perf_counter() - began}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    if best:
        print(f"best by final validation {'accuracy, then ' if classifier else ''}loss: {best['setting']} "
              f"({describe(best['curve'][-1])}); {record['seconds'] / 60:.1f} min in all; {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
