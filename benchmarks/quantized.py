"""python -m benchmarks.quantized --bundle Q --fp32-bundle F --out DIR: a quantized base, measured.

1. The loss of the quantized `.pte`, its eager quantized model (rebuilt from the manifest) and the
   fp32 `.pte` of the same model, on the same held-out TinyStories batches at one adapter.
2. A short federated MeZO job on the quantized bundle (benchmarks.job: coordinator, emulated
   devices, loopback websockets, SQLite), then the held-out loss of its final adapter against
   random steps of the same length from the start: the job learned when its gain beats them.

Figures go to DIR/quantized.json and are printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.job import SHARED, JobSpec, gain_against_chance, run_job
from fwdfed.cli import quiet_libraries, run_main

TRAINING = ["--method", "mezo", "--lr", "1e-3", "--eps", "1e-2", "--local-steps", "100"]


def loss_comparison(quantized: Path, fp32: Path, data: Path, examples: int) -> dict:
    from fwdfed.bundle.manifest import load_bundle
    from runtime.data import encode, read_examples, split
    from runtime.eager import EagerEngine
    from runtime.engine import ProgramEngine
    from runtime.evaluate import load_tokenizer

    q, f = load_bundle(quantized), load_bundle(fp32)
    m = q.manifest
    batches = encode(load_tokenizer(q), split(read_examples(data), "heldout")[:examples], m.task,
                     m.inputs.batch_size, m.inputs.seq_len)
    adapter = q.initial_adapter()
    engines = {"pte_quantized": ProgramEngine.for_bundle(q), "eager_quantized": EagerEngine(q),
               "pte_fp32": ProgramEngine.for_bundle(f)}
    losses = {name: np.concatenate([e.losses(b, adapter)[0] for b in batches]) for name, e in engines.items()}
    return {"examples": int(sum(len(b.input_ids) for b in batches)),
            **{f"mean_loss_{k}": float(v.mean()) for k, v in losses.items()},
            "pte_vs_eager_quantized_max_abs_diff": float(np.abs(losses["pte_quantized"]
                                                                - losses["eager_quantized"]).max()),
            "quantized_vs_fp32_max_abs_diff": float(np.abs(losses["pte_quantized"] - losses["pte_fp32"]).max())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quantized", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle exported with --quantize")
    parser.add_argument("--fp32-bundle", type=Path, required=True, help="the same model exported without it")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "tinystories" / "train_head.txt")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--losses-only", action="store_true", help="only step 1: no federated job")
    args = parser.parse_args(argv)
    quiet_libraries()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    figures = {"losses": loss_comparison(args.bundle, args.fp32_bundle, args.data, args.eval_examples)}
    print(json.dumps(figures["losses"], indent=2), flush=True)
    if args.losses_only:
        (out / "quantized.json").write_text(json.dumps(figures, indent=2, default=str))
        return 0
    spec = JobSpec(bundle=args.bundle.resolve(), data=args.data, rounds=args.rounds, training=TRAINING,
                   eval_examples=args.eval_examples)
    figures["job"] = run_job(spec, out / "job")
    figures["learning"] = gain_against_chance(args.bundle, out / "job" / "job.db", args.data, args.eval_examples)
    print(json.dumps(figures["learning"], indent=2))
    (out / "quantized.json").write_text(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    run_main(main)
