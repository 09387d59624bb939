"""Time per direction: P adapter vectors in one program call vs one call per vector, and vs a
MeZO step written the way the MeZO reference code does it (eager PyTorch, every trainable
tensor perturbed in place with a regenerated torch.randn, two forward passes, restore, update).

    python benchmarks/batched_perturbations.py --bundle bundles/llama-25m [--directions 1 2 4] [--repeats 10]

Export a bundle first, e.g. `python -m export --preset llama-25m --out bundles/llama-25m
--seq-len 128 --max-perturbations 8`. Both ways run side by side in one process, interleaved,
on the same batch and the same adapters; the ratio is what to read (this machine is noisy).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from fwdfed.cli import quiet_libraries, run_main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--directions", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    quiet_libraries()
    import torch

    from fwdfed.batch import Batch
    from fwdfed.bundle.manifest import load_bundle
    from fwdfed.directions import direction
    from runtime.engine import ProgramEngine

    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    engine = ProgramEngine(bundle.program_path, m.inputs.max_perturbations)
    b, length = m.inputs.batch_size, m.inputs.seq_len
    ids = torch.randint(4, m.model.vocab_size, (b, length))
    labels = ids if m.task == "causal-lm" else torch.zeros(b, dtype=torch.long)
    batch = Batch(ids, torch.ones(b, length, dtype=torch.long), labels, np.ones(b, np.float32))
    w = bundle.initial_adapter()
    print(f"{m.model.source}: {m.model.base_parameters:,} base parameters, adapter {m.adapter_dim:,}, "
          f"batch {b} x {length} tokens, torch threads {torch.get_num_threads()}")
    print(f"{'directions':>10} {'P':>3} {'batched ms/dir':>15} {'one-by-one ms/dir':>18} {'speed-up':>9}")
    reference_ms = reference_mezo_ms(bundle, batch, args.repeats)
    print(f"MeZO reference-style eager step (in-place perturb/restore, 2 forwards): {reference_ms:.1f} ms/direction")
    for n in args.directions:
        p = 2 * n
        if p > m.inputs.max_perturbations:
            print(f"{n:>10} {p:>3}  skipped: the program takes at most {m.inputs.max_perturbations} per call")
            continue
        z = np.stack([direction(s, m.adapter_dim) for s in range(n)])
        adapters = np.concatenate([w + 1e-2 * z, w - 1e-2 * z]).astype(np.float32)
        engine.losses(batch, adapters)  # warm-up
        batched, single = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            engine.losses(batch, adapters)
            batched.append(time.perf_counter() - t)
            t = time.perf_counter()
            for a in adapters:
                engine.losses(batch, a)
            single.append(time.perf_counter() - t)
        tb, ts = statistics.median(batched) / n * 1e3, statistics.median(single) / n * 1e3
        print(f"{n:>10} {p:>3} {tb:>15.1f} {ts:>18.1f} {ts / tb:>8.2f}x   ({reference_ms / tb:.2f}x the reference-style step)")
    return 0


def reference_mezo_ms(bundle, batch, repeats: int) -> float:
    """One MeZO step as in the reference implementation: z is regenerated from the seed for each
    of perturb(+eps), perturb(-2 eps), restore(+eps) and update, over the peft model's tensors."""
    import torch

    from fwdfed.model.loss import per_example_loss
    from fwdfed.model.peft_adapter import peft_model_with

    model = peft_model_with(bundle, bundle.initial_adapter())
    params = [p for p in model.parameters() if p.requires_grad]
    task, eps, lr = bundle.manifest.task, 1e-2, 1e-3

    def loss() -> float:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return float(per_example_loss(logits, batch.labels, task).mean())

    def perturb(seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            p.data.add_(torch.randn_like(p), alpha=scale)

    times = []
    with torch.no_grad():
        for seed in range(repeats + 1):
            t = time.perf_counter()
            perturb(seed, eps)
            plus = loss()
            perturb(seed, -2 * eps)
            minus = loss()
            perturb(seed, eps)
            perturb(seed, -lr * (plus - minus) / (2 * eps))
            times.append(time.perf_counter() - t)
    return statistics.median(times[1:]) * 1e3


if __name__ == "__main__":
    run_main(main)
