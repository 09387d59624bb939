"""python -m runtime.measure: one training step's peak memory and time, in this fresh process.

    python -m runtime.measure --bundle B --mode batched [--repeats 3]

prints one JSON line: resident memory after the imports of Python and torch (the runtime), what
the mode's libraries add (the ExecuTorch runtime; transformers + peft for a method that needs
autograd), what loading the program (or the eager model) adds, libraries included, the step's
peak (the kernel's VmHWM, reset before the step) and the median time per step. Modes: inference (P = 1), every
method of `fwdfed.methods` at its default directions, and batched (MeZO at the program's
largest P). The profiler (`device_sdk.profile`) and the exporter's memory fit
(`python -m export --mem`) run it in fresh processes, so no mode's memory leaks into another's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fwdfed import methods
from fwdfed import task_keys as keys
from fwdfed.cli import quiet_libraries, run_main
from fwdfed.errors import UserError

MODES = ("inference", "labelling", *methods.names(), "batched")
# labelling: a teacher's predict over one batch (P = 1), the phase a fedkd device runs before training


def directions_of(mode: str, max_perturbations: int) -> int:
    """Directions per step in `mode`: none for inference, the program's largest call for batched."""
    if mode in ("inference", "labelling"):
        return 0
    if mode == "batched":
        return max(1, max_perturbations // 2)
    return methods.get(mode).default_directions


def measure(bundle_dir: str, mode: str, repeats: int) -> dict:
    """One mode in this (fresh) process; returns the figures as a dict."""
    quiet_libraries()
    import numpy as np
    import torch

    from fwdfed.batch import Batch
    from fwdfed.bundle.manifest import load_bundle
    from fwdfed.memory import reset_peak, status_field
    from fwdfed.memory_plan import planned_arena

    runtime = status_field("VmRSS")
    method = methods.get("mezo" if mode in ("inference", "labelling", "batched") else mode)
    # The mode's own libraries (the ExecuTorch runtime, or transformers + peft for autograd) are
    # imported before the model, so that what they take is told apart from what the model takes.
    if method.needs_autograd:
        import runtime.eager  # noqa: F401
    else:
        from runtime.executorch import runtime as executorch_runtime

        executorch_runtime()
    libraries = status_field("VmRSS") - runtime
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    b, length = m.inputs.batch_size, m.inputs.seq_len
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, m.model.vocab_size, (b, length), generator=g)
    labels = ids.clone() if m.task == "causal-lm" else torch.zeros(b, dtype=torch.long)
    batch = Batch(ids, torch.ones(b, length, dtype=torch.long), labels, np.ones(b, np.float32))
    hparams = {keys.LR: 1e-6, keys.EPS: 1e-2, keys.LOCAL_STEPS: 1}
    if method.needs_teacher:  # a teacher's logits of the batch (their values do not change memory or time)
        batch.teacher_logits = np.zeros((b, m.model.num_labels), np.float32)
        hparams[keys.TEACHER_SHA256] = "0" * 64
    if method.layout_hparams:  # what the coordinator computes from the layout (hybrid's head)
        try:
            hparams |= method.layout_hparams(m.layout)
        except ValueError as e:
            raise UserError(f"{mode} on {bundle_dir}: {e}") from None
    w = bundle.initial_adapter()
    n = directions_of(mode, m.inputs.max_perturbations)
    if method.needs_autograd:
        from runtime.eager import EagerEngine

        engine = EagerEngine(bundle)
    else:
        from runtime.engine import ProgramEngine

        engine = ProgramEngine.for_bundle(bundle)
    if mode == "inference":
        step = lambda: engine.losses(batch, w)  # noqa: E731
    elif mode == "labelling":
        step = lambda: engine.logits(batch, w)  # noqa: E731
    else:
        # A tiny lr: memory and time do not depend on it, and every repeat starts near the same point.
        config = method.config.from_hparams(hparams | {keys.DIRECTIONS: n})
        optimizer = method.make_optimizer(engine, w, config, np.random.default_rng(0))
        step = lambda: optimizer.train([batch], 1)  # noqa: E731
    loaded = status_field("VmRSS")
    reset_peak()
    times = []
    for _ in range(repeats + 1):  # the first run also initialises the backends: kept for memory, not time
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = status_field("VmHWM")
    copies = 1 if mode in ("inference", "labelling") else method.adapter_copies(n)
    # Reports group rows by model: a quantized or streamed bundle of the same model is its own group.
    scheme = m.quantization.scheme if m.quantization else None
    label = m.model.source + (f" {scheme}" if scheme else "") + (" streamed" if m.streamed else "")
    record = {"bundle": str(bundle_dir), "model": label, "architecture": m.model.architecture,
              "quantization": scheme,
            "base_parameters": m.model.base_parameters, "adapter_dim": m.adapter_dim, "mode": mode,
            "batch": [b, length], "runtime_bytes": runtime, "libraries_bytes": libraries,
            "weights_bytes": loaded - runtime,
            "work_bytes": max(0, peak - loaded), "peak_bytes": peak,
            "planned_arena_bytes": planned_arena(m.program),
            "adapter_copies_bytes": 4 * m.adapter_dim * copies,
            "step_seconds": statistics.median(times[1:]) if repeats else times[0],
            "directions": n, "program_bytes": int(m.program.bytes)}
    if n:
        record["direction_seconds"] = record["step_seconds"] / n
    if m.streamed:  # what each stage held while loaded, and what was left once it was released
        trace = engine.trace
        record["streamed"] = {
            "stages": len(m.program.stages), "largest_stage_bytes": m.program.largest_stage_bytes,
            "quantization": scheme,
            "max_rss_stage_loaded_bytes": max(r.rss_loaded for r in trace),
            "max_rss_stage_released_bytes": max(r.rss_released for r in trace),
            "max_file_rss_stage_loaded_bytes": max(r.file_rss_loaded for r in trace),
            "max_file_rss_stage_released_bytes": max(r.file_rss_released for r in trace),
            "max_live_programs": engine.max_live_programs}
    return record


def run_fresh(bundle: Path, mode: str, repeats: int) -> dict:
    """`measure` in a fresh process: this process's own memory stays out of the figures."""
    out = subprocess.run([sys.executable, "-m", "runtime.measure", "--mode", mode, "--bundle", str(bundle),
                          "--repeats", str(repeats)], capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"measuring {mode} on {bundle} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.measure", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.repeats < 0:
        parser.error("--repeats must be >= 0")
    print(json.dumps(measure(str(args.bundle), args.mode, args.repeats)))
    return 0


if __name__ == "__main__":
    quiet_libraries()
    run_main(main)
