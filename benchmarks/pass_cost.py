"""python -m benchmarks.pass_cost --bundle B [B ...] --data D: one forward-only pass through the top against the whole model.

A split bundle (`python -m export --adapter-blocks top:K`) can score a batch two ways: `forward`,
the whole program, or `top` on the prefix states the device keeps. Both are timed side by side on
the same batches and adapter vectors, interleaved (whole, top, whole, top, ...) so that the
machine's noise falls on both alike, and the median milliseconds per pass (one batch, one adapter
vector) and their ratio are printed; the prefix's own cost, paid once per batch, beside them.
Several bundles (the same model cut at top:1 and top:2) are measured one after another in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fwdfed.cli import quiet_libraries, run_main
from fwdfed.errors import UserError


def measure(bundle_dir: Path, data: Path, repeats: int = 10, batches: int = 4) -> dict:
    from dataclasses import replace

    from fwdfed.bundle.manifest import load_bundle
    from runtime.data import DataSpec, encode, read_examples, split
    from runtime.engine import ProgramEngine
    from runtime.evaluate import load_tokenizer

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    engine = ProgramEngine.for_bundle(bundle)
    if not getattr(engine, "has_split", False):
        raise UserError(f"{bundle_dir} is not split: export it with --adapter-blocks top:K")
    examples = split(read_examples(data, DataSpec(num_labels=m.model.num_labels)), "train")
    size, p = m.inputs.batch_size, m.inputs.max_perturbations
    work = encode(load_tokenizer(bundle), examples[: batches * size], m.task, size, m.inputs.seq_len)
    adapters = (bundle.initial_adapter()[None] + 1e-3 * np.random.default_rng(0).standard_normal((p, m.adapter_dim)))
    adapters = adapters.astype(np.float32)
    prefix_ms, states = [], []
    for b in work:
        began = time.perf_counter()
        states.append(engine.prefix_states(b).astype(np.float16))
        prefix_ms.append(1e3 * (time.perf_counter() - began))
    split_batches = [replace(b, prefix_states=s) for b, s in zip(work, states)]
    whole_ms, top_ms = [], []
    for _ in range(repeats):
        for b, s in zip(work, split_batches):
            for runs, batch in ((whole_ms, b), (top_ms, s)):
                began = time.perf_counter()
                engine.losses(batch, adapters)
                runs.append(1e3 * (time.perf_counter() - began) / p)
    whole, top = statistics.median(whole_ms), statistics.median(top_ms)
    return {"bundle": str(bundle_dir), "batch_size": size, "seq_len": m.inputs.seq_len, "adapters_per_call": p,
            "split": asdict(m.program.split), "whole_ms_per_pass": whole, "top_ms_per_pass": top,
            "whole_over_top": whole / top, "prefix_ms_per_batch": statistics.median(prefix_ms),
            "calls_timed": len(whole_ms)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pass_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, nargs="+", required=True, help="split bundles, measured in turn")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    args = parser.parse_args(argv)
    quiet_libraries()
    if args.repeats < 1:
        raise UserError("--repeats must be at least 1")
    every = []
    for bundle in args.bundle:
        figures = measure(bundle, args.data, args.repeats)
        split = figures["split"]
        print(f"{bundle} ({split['adapted_blocks']} of {split['frozen_blocks'] + split['adapted_blocks']} blocks "
              f"adapted), one pass (batch {figures['batch_size']} x {figures['seq_len']}, "
              f"{figures['adapters_per_call']} adapter vectors a call): whole model {figures['whole_ms_per_pass']:.1f} "
              f"ms, top {figures['top_ms_per_pass']:.2f} ms ({figures['whole_over_top']:.1f}x cheaper); the prefix, "
              f"once per batch: {figures['prefix_ms_per_batch']:.0f} ms", flush=True)
        every.append(figures)
    if args.out:
        args.out.write_text(json.dumps(every[0] if len(every) == 1 else every, indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
