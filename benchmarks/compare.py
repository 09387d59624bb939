"""python -m benchmarks.compare --task agnews --out DIR: the methods side by side on one task.

Every arm is a whole federated job (benchmarks.job: coordinator, emulated devices, loopback
websockets, SQLite) on the same exported bundle, data, shuffle seed, split and devices; only
the training flags differ. The arms:

    mezo                MeZO (seed-form updates), after a round that sets the head from class
                        statistics (--head-init lda; classification tasks)
    mezo-no-head-init   the same without the head round (classification tasks)
    fwdgrad             FwdLLM's forward gradient, no selection, one wave a round
    fwdgrad-select-var  with FwdLLM's perturbation selection (4 candidates per direction) and
                        variance control (more waves while the estimate's variance is high)
    backprop            the baseline phones cannot afford: LoRA + AdamW through autograd, dense upload
    fzoo                FZOO: one-sided directions, the step divided by the spread of their losses

DIR/<arm>/ holds each job (its database, logs, status and best adapter); DIR/results.json the
figures of all arms, which `python -m benchmarks.report` turns into docs/BENCHMARKS.md.
The classification arms' best adapters are scored again as a user loads them (transformers +
peft, the standard head) on rows no arm trained or selected on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.headline import minilm_folder, score_peft_folder
from benchmarks.job import SHARED, JobSpec, earlier_results, export_bundle, run_job
from fwdfed.cli import quiet_libraries, run_main
from fwdfed.errors import UserError

COMMON_ZO = ["--local-steps", "20", "--eps", "1e-3", "--directions", "4"]
ARMS = {
    "mezo": ["--method", "mezo", "--lr", "1e-4", *COMMON_ZO],
    "mezo-no-head-init": ["--method", "mezo", "--lr", "1e-4", *COMMON_ZO],
    "fwdgrad": ["--method", "fwdgrad", "--lr", "1e-3", *COMMON_ZO],
    # The variance threshold is half the estimate variance the plain fwdgrad arm measured in its last AG News
    # round (0.0158), so that a round asks for a second wave when its first is as noisy as that one was.
    "fwdgrad-select-var": ["--method", "fwdgrad", "--lr", "1e-3", *COMMON_ZO, "--candidates", "4",
                           "--variance-threshold", "0.00792", "--max-waves", "2"],
    "backprop": ["--method", "backprop", "--lr", "1e-3", "--local-steps", "20"],
    # FZOO at about MeZO's passes a step (8 one-sided directions and the shared point: 9, against 2 x 4)
    "fzoo": ["--method", "fzoo", "--lr", "1e-3", "--local-steps", "20", "--eps", "1e-3", "--directions", "8"],
}


@dataclass
class Task:
    """A model, its export and its data: what every arm of a comparison shares."""
    model: Path
    export_flags: list[str]
    data: Path
    test: Path | None  # rows scored after training (None: the coordinator's held-out slice only)
    data_flags: list[str] = field(default_factory=lambda: ["--data-seed", "0"])
    num_labels: int | None = None  # None: a causal LM
    arms: tuple[str, ...] = tuple(ARMS)
    rounds: int = 2
    lr_scale: float = 1.0  # the LM arms take larger steps


def tasks(out: Path) -> dict[str, Task]:
    data = SHARED / "data"
    cls = ["--task", "seq-cls", "--batch-size", "16", "--seq-len", "64", "--lora-rank", "8", "--max-perturbations", "2"]
    return {
        "agnews": Task(model=minilm_folder(), export_flags=[*cls, "--num-labels", "4"],
                       data=data / "ag_news" / "train_8000.csv", test=None, num_labels=4),
        # 4,000 rows of SST-2's train split (a seeded sample: the whole split is 67k), GLUE's dev as the test
        "sst2": Task(model=minilm_folder(), export_flags=[*cls, "--num-labels", "2"], data=out / "sst2_train_4000.tsv",
                     test=data / "sst2" / "dev.tsv", num_labels=2, arms=("mezo", "backprop"), rounds=1),
        "tinystories": Task(model=SHARED / "models" / "stories260K",
                            export_flags=["--batch-size", "8", "--seq-len", "64", "--lora-rank", "8",
                                          "--max-perturbations", "2"],
                            data=data / "tinystories" / "train_head.txt", test=None,
                            arms=("mezo", "fwdgrad", "fzoo", "backprop"), lr_scale=10.0),
    }


def sample_rows(source: Path, out: Path, rows: int, seed: int = 0) -> Path:
    """A seeded sample of a one-row-per-line file's rows, the header kept (the lines copied as they are)."""
    import random

    header, *body = source.read_text(encoding="utf-8").splitlines(keepends=True)
    random.Random(seed).shuffle(body)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + "".join(body[:rows]), encoding="utf-8")
    return out


def arm_flags(task: Task, arm: str, lr: float | None = None, local_steps: int | None = None) -> list[str]:
    """The arm's training flags on this task; `lr`, `local_steps`: in place of the arm's own (a setting chosen
    on the training rows' own split, benchmarks.tune; a length matched to another arm's wall time)."""
    flags = list(ARMS[arm])
    i = flags.index("--lr")
    if lr is not None:
        flags[i + 1] = f"{lr:g}"
    elif task.lr_scale != 1.0:
        flags[i + 1] = f"{float(flags[i + 1]) * task.lr_scale:g}"
    if local_steps is not None:
        flags[flags.index("--local-steps") + 1] = str(local_steps)
    if task.num_labels:
        flags += ["--head-init", "none" if arm == "mezo-no-head-init" else "lda"]
    return flags


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("agnews", "sst2", "tinystories"), default="agnews")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arms", nargs="+", choices=tuple(ARMS), help="default: every arm the task has")
    parser.add_argument("--bundle", type=Path, help="an exported bundle of the task's model (default: export one)")
    parser.add_argument("--rounds", type=int, help="training rounds per arm (default: the task's)")
    parser.add_argument("--lr", type=float, help="every arm's learning rate (default: each arm's own)")
    parser.add_argument("--local-steps", type=int, help="every arm's local steps a round (default: each arm's own)")
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1,
                        help="processes the devices share (default 1: they take turns, so that each program call "
                             "has the machine's cores and timings add up; more oversubscribe a small machine)")
    parser.add_argument("--split", choices=("iid", "dirichlet"), default="iid")
    parser.add_argument("--alpha", type=float, default=0.5)
    args = parser.parse_args(argv)
    quiet_libraries()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    task = tasks(out)[args.task]
    if args.task == "sst2":
        sample_rows(SHARED / "data" / "sst2" / "train.tsv", task.data, 4000)
    for path in (task.model, task.data):
        if not path.exists():
            raise UserError(f"{path} does not exist (the shared model and data beside the checkout)")
    # Arms run by an earlier call in the same folder are kept: a comparison can be completed arm by arm.
    earlier, results_path = earlier_results(out), out / "results.json"
    started = time.time()
    bundle = args.bundle or export_bundle(out / "bundle", "--model", str(task.model), *task.export_flags)
    command = "python -m benchmarks.compare " + " ".join(sys.argv[1:] if argv is None else argv)
    results = {"task": args.task, "split": args.split, "alpha": args.alpha, "devices": args.devices,
               "workers": args.workers, "export_seconds": time.time() - started, "arms": earlier.get("arms", {}),
               "commands": [*earlier.get("commands", []), command]}
    for arm in args.arms or task.arms:
        spec = JobSpec(bundle=bundle, data=task.data, rounds=args.rounds or task.rounds,
                       training=arm_flags(task, arm, args.lr, args.local_steps),
                       data_flags=task.data_flags, devices=args.devices, workers=args.workers, split=args.split,
                       alpha=args.alpha)
        figures = run_job(spec, out / arm)
        figures["flags"] = spec.training
        if task.num_labels:
            test = task.test or task.data
            figures["test_accuracy"], figures["test_rows"] = score_peft_folder(
                task.model, out / arm / "adapter", test, num_labels=task.num_labels, seq_len=64,
                rows="all" if task.test else "heldout")
        results["arms"][arm] = figures
        results_path.write_text(json.dumps(results, indent=2, default=str))  # what is done survives a later failure
        print(f"{arm}: done in {figures['job_seconds'] / 60:.1f} min", flush=True)
    print(f"figures of {len(results['arms'])} arms in {results_path}")
    return 0


if __name__ == "__main__":
    run_main(main)
