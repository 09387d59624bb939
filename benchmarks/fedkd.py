"""python -m benchmarks.fedkd --out DIR: the student with distillation against the same student without.

SST-2 with the real all-MiniLM-L6-v2 encoder. GLUE's train split is shuffled once (seed 0): the
first --device-rows rows are the devices' (dealt IID, every 10th held out by the coordinator), the
next --public-rows rows are the public slice the teacher is trained on, disjoint from them;
GLUE's dev split (872 rows, never trained or selected on) is the test set. With --labelled N
only N of the devices' training rows keep their label (what a phone mostly holds is unlabelled):
the mezo arm trains on those, the fedkd arm on every row, the unlabelled by the teacher alone.

1. the teacher: `python -m export.teacher`, MiniLM fine-tuned whole with AdamW on the public
   slice, exported as an inference-only bundle;
2. the student: MiniLM with a LoRA adapter and its head, exported with `--distillation`;
3. the profiler on both: the teacher's labelling peak against the student's fedkd step peak;
4. two federated jobs with the same student, data, head round (--head-init lda), rounds,
   steps, directions and learning rate, so the same forward-pass budget: `mezo` (plain MeZO on
   the labels) and `fedkd` (MeZO on (1 - a) CE + a T^2 KL to the teacher, which labels each
   device's shard once before training: one extra inference pass per batch of the shard);
5. each arm's final adapter, and the teacher, scored on GLUE's dev split with transformers + peft.

DIR/results.json holds the figures; `python -m benchmarks.report --fedkd DIR` puts them in
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.headline import accuracy, minilm_folder, score_peft_folder
from benchmarks.job import SHARED, JobSpec, earlier_results, export_bundle, run_job
from fwdfed.cli import quiet_libraries, run_main
from fwdfed.demo import python_module, run
from fwdfed.errors import UserError
from fwdfed.methods.class_stats import DEFAULT_SHRINKAGE

STUDENT_EXPORT = ["--task", "seq-cls", "--num-labels", "2", "--batch-size", "16", "--max-perturbations", "2",
                  "--distillation"]


def cut_rows(source: Path, out: Path, device_rows: int, public_rows: int, seed: int = 0) -> tuple[Path, Path]:
    """The devices' rows and the public rows, disjoint, from one seeded shuffle of `source`."""
    import random

    header, *body = source.read_text(encoding="utf-8").splitlines(keepends=True)
    if device_rows + public_rows > len(body):
        raise UserError(f"{source} has {len(body)} rows, fewer than {device_rows} + {public_rows}")
    random.Random(seed).shuffle(body)
    out.mkdir(parents=True, exist_ok=True)
    devices, public = out / "sst2_devices.tsv", out / "sst2_public.tsv"
    devices.write_text(header + "".join(body[:device_rows]), encoding="utf-8")
    public.write_text(header + "".join(body[device_rows : device_rows + public_rows]), encoding="utf-8")
    return devices, public


def keep_labels(data: Path, labelled: int) -> int:
    """Empty the label cell of all but `labelled` of the devices' training rows (the coordinator's
    held-out rows keep theirs): the first in the devices' shuffled order, so every IID shard keeps a
    like share. Returns how many training rows `data` holds."""
    from runtime.data import shuffled, split

    header, *body = data.read_text(encoding="utf-8").splitlines(keepends=True)
    # Row numbers in the order the coordinator and devices read them (data seed 0), cut as they cut it.
    training = split(shuffled(list(range(len(body))), 0), "train")
    for row in training[labelled:]:
        body[row] = "\t" + body[row].split("\t", 1)[1]
    data.write_text(header + "".join(body), encoding="utf-8")
    return len(training)


def score_model_folder(model: Path, data: Path, num_labels: int, seq_len: int) -> tuple[float, int]:
    """Accuracy of a whole fine-tuned classifier (the teacher) on every row of `data`, as transformers loads it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from runtime.data import DataSpec, read_examples

    examples = read_examples(data, DataSpec(num_labels=num_labels))
    net = AutoModelForSequenceClassification.from_pretrained(model, num_labels=num_labels).eval()
    return accuracy(net, AutoTokenizer.from_pretrained(model), examples, seq_len), len(examples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fedkd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arms", nargs="+", choices=("mezo", "fedkd"), default=["mezo", "fedkd"])
    # Small defaults: on 2 shared cores a MiniLM pass of 16 x 32 tokens takes about a second.
    parser.add_argument("--device-rows", type=int, default=900)
    parser.add_argument("--public-rows", type=int, default=1000)
    parser.add_argument("--labelled", type=int, help="how many of the devices' training rows keep their label "
                        "(default: all); the others are unlabelled: the mezo arm leaves them out, fedkd learns them "
                        "from the teacher")
    parser.add_argument("--lda-shrinkage", type=float, default=DEFAULT_SHRINKAGE, help="serve's, for both arms' head round")
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="training rounds after the head round")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--directions", type=int, default=4)
    parser.add_argument("--perturb-only", help="serve's --perturb-only for both arms (e.g. classifier: the head alone)")
    parser.add_argument("--kd-weight", type=float, default=0.5)
    parser.add_argument("--kd-temperature", type=float, default=2.0)
    parser.add_argument("--lora-rank", type=int, default=2, help="a small adapter: MeZO's steps gain as the trained "
                        "dimension shrinks")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per example (SST-2 sentences are short)")
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--teacher", type=Path, help="a folder `python -m export.teacher` wrote (default: train one)")
    parser.add_argument("--student", type=Path, help="an exported student bundle (default: export one)")
    args = parser.parse_args(argv)
    quiet_libraries()
    out = args.out.resolve()
    model, dev = minilm_folder(), SHARED / "data" / "sst2" / "dev.tsv"
    if not dev.is_file():
        raise UserError(f"{dev} does not exist (the shared data beside the checkout)")
    if args.labelled is not None and args.labelled < 0:
        raise UserError(f"--labelled must be a number of rows >= 0, got {args.labelled}")
    earlier, results_path = earlier_results(out), out / "results.json"
    started = time.time()
    devices_data, public = cut_rows(SHARED / "data" / "sst2" / "train.tsv", out, args.device_rows, args.public_rows)
    training_rows = keep_labels(devices_data, args.labelled) if args.labelled is not None else None
    teacher = args.teacher or out / "teacher"
    if args.teacher is None:
        run(python_module("export.teacher", "--model", str(model), "--data", str(public), "--out", str(teacher),
                          "--num-labels", "2", "--epochs", str(args.teacher_epochs), "--batch-size", "16",
                          "--seq-len", str(args.seq_len)))
    student = args.student or export_bundle(out / "student", "--model", str(model), *STUDENT_EXPORT,
                                            "--lora-rank", str(args.lora_rank), "--seq-len", str(args.seq_len))
    prepared = time.time()
    command = "python -m benchmarks.fedkd " + " ".join(sys.argv[1:] if argv is None else argv)
    results = {"device_rows": args.device_rows, "public_rows": args.public_rows, "devices": args.devices,
               "labelled_training_rows": args.labelled, "training_rows": training_rows,
               "commands": [*earlier.get("commands", []), command], "arms": earlier.get("arms", {})}
    teacher_record = json.loads((teacher / "teacher.json").read_text())
    accuracy, rows = score_model_folder(teacher / "model", dev, 2, args.seq_len)
    results["teacher"] = teacher_record | {"test_accuracy": accuracy, "test_rows": rows}
    print(f"teacher: {accuracy:.4f} on {rows} GLUE dev rows", flush=True)
    run(python_module("device_sdk.profile", "--bundle", str(student), "--modes", "inference", "mezo", "fedkd",
                      "--teacher", str(teacher / "bundle"), "--repeats", "1", "--out", str(out / "profile")))
    results["memory"] = json.loads((out / "profile" / "distillation.json").read_text())
    results["memory"]["modes"] = json.loads((out / "profile" / "report.json").read_text())
    common = ["--lr", str(args.lr), "--eps", str(args.eps), "--local-steps", str(args.local_steps),
              "--directions", str(args.directions), "--head-init", "lda", "--lda-shrinkage", str(args.lda_shrinkage),
              *(["--perturb-only", args.perturb_only] if args.perturb_only else [])]
    for arm in args.arms:
        training, device_flags = ["--method", "mezo", *common], []
        if arm == "fedkd":
            training = ["--method", "fedkd", "--teacher-bundle", str(teacher / "bundle"), "--kd-weight",
                        str(args.kd_weight), "--kd-temperature", str(args.kd_temperature), *common]
            device_flags = ["--teacher-bundle", str(teacher / "bundle")]
        spec = JobSpec(bundle=student, data=devices_data, rounds=args.rounds, training=training, devices=args.devices,
                       workers=1, device_flags=device_flags)
        figures = run_job(spec, out / arm)
        figures["flags"] = training
        figures["test_accuracy"], figures["test_rows"] = score_peft_folder(model, out / arm / "adapter", dev,
                                                                           num_labels=2, seq_len=args.seq_len,
                                                                           rows="all")
        if arm == "fedkd":  # the teacher's passes: one per batch of each device's shard, once
            shard = -(-args.device_rows * 9 // 10 // args.devices)
            figures["teacher_passes"] = args.devices * -(-shard // 16)
            figures["device_log"] = [line.strip() for line in (out / arm / "devices.log").read_text().splitlines()
                                     if "labelled" in line or "peak = max" in line]
        results["arms"][arm] = figures
        results_path.write_text(json.dumps(results, indent=2, default=str))
        print(f"{arm}: GLUE dev accuracy {figures['test_accuracy']:.4f} ({figures['test_rows']} rows), "
              f"{figures['job_seconds'] / 60:.1f} min", flush=True)
    results["seconds"] = {"prepare": prepared - started, "total": time.time() - started}
    results_path.write_text(json.dumps(results, indent=2, default=str))
    print(f"figures in {results_path}")
    return 0


if __name__ == "__main__":
    run_main(main)
