"""Does MeZO through a prompt-learning bundle learn? Held-out loss after MeZO steps on real data,
against random steps of the same length from the same start (what chance alone moves it by).

    python benchmarks/prompt_learning.py --bundle B [--data ../shared/data/tinystories/train_head.txt]
        [--steps 60] [--lr 1e-3] [--eps 1e-2] [--directions 1]

B: a bundle exported with `python -m export --adapter prompt-tuning|p-tuning|prefix-tuning ...`; the
data default to TinyStories for a causal LM and SST-2 for a classifier. One process, one device:
the steps are those a device runs for its update, through the bundle's `.pte`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fwdfed.cli import quiet_libraries, run_main

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_DATA = {"causal-lm": SHARED_DATA / "tinystories" / "train_head.txt",
                "seq-cls": SHARED_DATA / "sst2" / "train.tsv"}


def mezo_against_chance(bundle_dir: Path, data: Path | None = None, steps: int = 60, lr: float = 1e-3,
                        eps: float = 1e-2, directions: int = 1, train_examples: int = 64, heldout_examples: int = 32,
                        controls: int = 8, seed: int = 0) -> dict:
    """{start, final, gain, chance: the gains of `controls` random steps as long as MeZO's}."""
    from device_sdk.data import DataSpec, encode, read_examples, split
    from device_sdk.engine import ProgramEngine
    from device_sdk.evaluate import Evaluator, load_tokenizer
    from fwdfed.bundle.manifest import load_bundle
    from fwdfed.directions import direction
    from fwdfed.methods.mezo import Mezo, MezoConfig

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    data = data or DEFAULT_DATA[m.task]
    spec = DataSpec(num_labels=m.model.get("num_labels"))
    engine = ProgramEngine(bundle.program_path, m.inputs["max_perturbations"])
    train = encode(load_tokenizer(bundle), split(read_examples(data, spec), "train")[:train_examples], m.task,
                   m.inputs["batch_size"], m.inputs["seq_len"])
    evaluate = Evaluator(bundle, data, heldout_examples, engine=engine, spec=spec)
    start = bundle.initial_adapter()
    mezo = Mezo(engine, start, MezoConfig(lr=lr, eps=eps, directions=directions), np.random.default_rng(seed))
    mezo.train(train, steps)
    start_loss, final_loss = evaluate(start)["heldout_loss"], evaluate(mezo.adapter)["heldout_loss"]
    length = float(np.linalg.norm(mezo.adapter - start))
    chance = []
    for k in range(controls):
        z = direction(10_000 + k, start.shape[0])
        control = (start + length * z / np.linalg.norm(z)).astype(np.float32)
        chance.append(start_loss - evaluate(control)["heldout_loss"])
    return {"start": start_loss, "final": final_loss, "gain": start_loss - final_loss, "chance": chance,
            "step_length": length}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, help="default: TinyStories (causal LM) or SST-2 (classifier)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eps", type=float, default=1e-2)
    parser.add_argument("--directions", type=int, default=1)
    parser.add_argument("--train-examples", type=int, default=64)
    parser.add_argument("--heldout-examples", type=int, default=32)
    args = parser.parse_args(argv)
    quiet_libraries()
    r = mezo_against_chance(args.bundle, args.data, args.steps, args.lr, args.eps, args.directions,
                            args.train_examples, args.heldout_examples)
    print(f"held-out loss {r['start']:.4f} -> {r['final']:.4f} (gain {r['gain']:.4f}, step length "
          f"{r['step_length']:.3f}); random steps of the same length: gains {np.round(r['chance'], 4).tolist()}")
    return 0


if __name__ == "__main__":
    run_main(main)
