"""python -m benchmarks.prompt_learning --out DIR: does federated MeZO through a prompt-learning bundle learn?

For each adapter type (prompt tuning initialised from text, P-tuning, prefix tuning) on the real
stories260K and TinyStories: export the bundle (the `.pte` checked against eager peft), run a
federated job (the real coordinator and emulated devices over loopback), and score the final
adapter on the held-out stories against random steps of the same length from the same start (what
chance alone moves the loss by); the final adapter is loaded back with `PeftModel.from_pretrained`.

DIR/results.json holds the figures; `python -m benchmarks.report --prompt-learning DIR` puts them in
docs/BENCHMARKS.md. `mezo_against_chance` is the one-device version the tests run.
"""

from __future__ import annotations

import argparse
import json
import sys
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
    from fwdfed.bundle.manifest import load_bundle
    from fwdfed.directions import direction
    from fwdfed.methods.mezo import Mezo, MezoConfig
    from runtime.data import DataSpec, encode, read_examples, split
    from runtime.engine import ProgramEngine
    from runtime.evaluate import Evaluator, load_tokenizer

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    data = data or DEFAULT_DATA[m.task]
    spec = DataSpec(num_labels=m.model.num_labels)
    engine = ProgramEngine(bundle.program_path, m.inputs.max_perturbations)
    train = encode(load_tokenizer(bundle), split(read_examples(data, spec), "train")[:train_examples], m.task,
                   m.inputs.batch_size, m.inputs.seq_len)
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


# (adapter flags, serve's training flags): one learning rate per adapter type, tuned on the first
# rounds of TinyStories' training stories (the scores are on held-out stories).
CASES = {
    "prompt-tuning": (["--adapter", "prompt-tuning", "--prompt-init", "text", "--prompt-init-text", "Once upon a time",
                       "--num-virtual-tokens", "8"], ["--lr", "1e-2"]),
    "p-tuning": (["--adapter", "p-tuning", "--num-virtual-tokens", "8", "--encoder-hidden-size", "32"],
                 ["--lr", "3e-3"]),
    "prefix-tuning": (["--adapter", "prefix-tuning", "--num-virtual-tokens", "8"], ["--lr", "1e-2"]),
}


def peft_loads(model: Path, adapter: Path) -> str:
    """The peft adapter type `PeftModel.from_pretrained` reads from the job's exported folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), adapter)
    return str(loaded.peft_config["default"].peft_type.value)


def main(argv=None) -> int:
    from benchmarks.job import SHARED, JobSpec, earlier_results, export_bundle, gain_against_chance, run_job

    parser = argparse.ArgumentParser(prog="python -m benchmarks.prompt_learning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "stories260K")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "tinystories" / "train_head.txt")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--directions", type=int, default=4)
    parser.add_argument("--eval-examples", type=int, default=128)
    parser.add_argument("--controls", type=int, default=8, help="random steps of the same length (chance)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    results_path = out / "results.json"
    earlier = earlier_results(out)
    results = {"cases": earlier.get("cases", {}), "commands": earlier.get("commands", [])}
    results["commands"].append("python -m benchmarks.prompt_learning " + " ".join(sys.argv[1:] if argv is None
                                                                                   else argv))
    shape = ["--batch-size", "4", "--seq-len", "64", "--max-perturbations", "8"]
    for case in args.cases:
        adapter_flags, lr = CASES[case]
        bundle = export_bundle(out / case / "bundle", "--model", str(args.model), *adapter_flags, *shape)
        manifest = json.loads((bundle / "manifest.json").read_text())
        training = ["--method", "mezo", *lr, "--eps", "1e-2", "--local-steps", str(args.local_steps),
                    "--directions", str(args.directions)]
        figures = run_job(JobSpec(bundle=bundle, data=args.data, rounds=args.rounds, training=training,
                                  devices=args.devices, eval_examples=args.eval_examples), out / case / "job")
        scores = gain_against_chance(bundle, out / case / "job" / "job.db", args.data, args.eval_examples,
                                     args.controls)
        results["cases"][case] = {"adapter_flags": adapter_flags, "training": training, "shape": shape,
                                  "adapter_dim": figures["adapter_dim"],
                                  "verification": manifest["verification"], "figures": figures, "scores": scores,
                                  "peft_type": peft_loads(args.model, out / case / "job" / "adapter")}
        results_path.write_text(json.dumps(results, indent=2, default=str))
        s = scores
        print(f"{case}: held-out loss {s['heldout_loss_start']:.4f} -> {s['heldout_loss_final']:.4f} (gain "
              f"{s['gain']:.4f}; random steps of the same length {min(s['random_step_gains']):.4f} .. "
              f"{max(s['random_step_gains']):.4f}, bar "
              f"{s['chance_bar']:.4f}); loads in peft as {results['cases'][case]['peft_type']}", flush=True)
    print(f"figures in {results_path}")
    return 0


if __name__ == "__main__":
    quiet_libraries()
    run_main(main)
